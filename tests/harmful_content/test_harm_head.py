"""SCM's dual head and its loss, which the plugin owns: shapes, seeding, the seed ensemble, configs
that rebuild the same head, exact round-trips through ``load_probe``, the loss against hand-computed
values, and a training run on a planted signal."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from guardrail_harmful_content.head import DualHead
from guardrail_harmful_content.training.losses import scm_loss, scm_loss_fn

from guardrail.probes.heads import build_head
from guardrail.probes.io import load_probe, save_probe
from guardrail.toolkit.calibrate import calibrate_count_k, streaming_metrics
from guardrail.toolkit.fake import PLANTED_WORDS, PlantedObserver, planted_records, write_jsonl
from guardrail.toolkit.features import extract_features, split_by_prompt
from guardrail.toolkit.train import response_auc_metric, score_records, train_head


def test_seeding_a_head_leaves_the_global_random_state_alone() -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    DualHead(8)
    assert torch.equal(torch.rand(3), expected)


def test_dual_head_sequence_logits_come_from_the_last_real_token() -> None:
    head = DualHead(8, dropout=0.0).eval()
    hidden = torch.randn(2, 4, 8)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    token_logits, sequence_logits = head(hidden, mask)
    assert token_logits.shape == (2, 4, 2)
    assert torch.allclose(sequence_logits[0], head.sequence_head(hidden[0, 1]))
    assert torch.allclose(sequence_logits[1], head.sequence_head(hidden[1, 3]))
    # Streaming: the prefix score at the last real token equals the trained sequence score.
    prefix = head.score(hidden)
    assert prefix.shape == (2, 4)
    assert prefix[0, 1].item() == pytest.approx(torch.softmax(sequence_logits[0], -1)[1].item())
    assert head.sequence_head.bias is None


@pytest.mark.parametrize("sequence_hidden", [0, 3])
def test_an_ensemble_scores_the_mean_of_its_members_logits(sequence_hidden: int) -> None:
    members = [DualHead(8, seed=s, sequence_hidden=sequence_hidden).eval() for s in range(4)]
    with torch.no_grad():  # trained-looking weights: biases away from their initial values
        for m in members:
            for p in m.parameters():
                p.add_(torch.randn_like(p))
    ensemble = DualHead.ensemble(members)
    # one head at inference: an MLP ensemble keeps every member's units side by side
    assert ensemble.sequence_hidden == 4 * sequence_hidden
    hidden = torch.randn(2, 5, 8)
    with torch.inference_mode():
        mean = torch.stack([m.prefix_logits(hidden) for m in members]).mean(0)
        assert torch.allclose(ensemble.prefix_logits(hidden), mean, atol=1e-5)
        token_mean = torch.stack([m(hidden)[0] for m in members]).mean(0)
        assert torch.allclose(ensemble.eval()(hidden)[0], token_mean, atol=1e-5)
        assert not torch.allclose(members[0].prefix_logits(hidden), mean, atol=1e-3)


def test_an_ensemble_of_unlike_heads_is_refused() -> None:
    with pytest.raises(ValueError, match="differ in hidden_size or sequence_hidden"):
        DualHead.ensemble([DualHead(8), DualHead(8, sequence_hidden=2)])
    with pytest.raises(ValueError, match="no heads"):
        DualHead.ensemble([])

@pytest.mark.parametrize("make", [
    lambda: DualHead(16, dropout=0.2),
    lambda: DualHead(16, sequence_hidden=4),
])
def test_config_rebuilds_an_identical_head(make: Callable[[], DualHead]) -> None:
    head = make()
    again = build_head(head.config)
    assert type(again) is DualHead and again.config == head.config
    for (name, a), (_, b) in zip(head.state_dict().items(), again.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name


def test_a_bad_sequence_hidden_is_named() -> None:
    for bad in (-1, 2.5, "64", True):
        with pytest.raises(ValueError, match="'sequence_hidden' must be a whole number"):
            build_head({"kind": "dual", "hidden_size": 8, "sequence_hidden": bad})
    with pytest.raises(ValueError, match="lacks 'hidden_size'"):
        build_head({"kind": "dual"})


@pytest.mark.parametrize("sequence_hidden", [0, 5])
def test_round_trip_is_exact(tmp_path: Path, sequence_hidden: int) -> None:
    head = DualHead(16, sequence_hidden=sequence_hidden)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p))
    weights = save_probe(tmp_path, head, {"layers": [2], "threshold": 0.7}, name="harm")
    loaded = load_probe(weights)
    assert isinstance(loaded.head, DualHead) and loaded.head.config == head.config
    for key, value in head.state_dict().items():
        assert torch.equal(loaded.head.state_dict()[key], value), key
    x = torch.randn(3, 16)
    assert torch.equal(loaded.head.score(x), head.eval().score(x))


def test_scm_loss_hand_computed() -> None:
    # Token probabilities of "harmful": 0.5 and 0.75; sequence probability 0.8.
    token_logits = torch.tensor([[[0.0, 0.0], [0.0, math.log(3)]]])
    sequence_logits = torch.tensor([[0.0, math.log(4)]])
    out = scm_loss(token_logits, sequence_logits, torch.tensor([[0, 1]]), torch.tensor([1]))
    token = (-math.log(0.5) - math.log(0.75)) / 2
    sequence = -math.log(0.8)
    logic = -math.log(1 - 0.8 + 0.8 * 0.75)
    assert out.token.item() == pytest.approx(token, rel=1e-6)
    assert out.sequence.item() == pytest.approx(sequence, rel=1e-6)
    assert out.logic.item() == pytest.approx(logic, rel=1e-6)
    assert out.total.item() == pytest.approx(0.6 * token + 0.4 * sequence + logic, rel=1e-6)


def test_scm_logic_ignores_unlabelled_tokens() -> None:
    # A padded position with a high harm probability must not satisfy the logic term.
    token_logits = torch.tensor([[[0.0, 0.0], [0.0, 10.0]]])
    sequence_logits = torch.tensor([[0.0, math.log(4)]])
    out = scm_loss(token_logits, sequence_logits, torch.tensor([[0, -100]]), torch.tensor([1]))
    assert out.logic.item() == pytest.approx(-math.log(1 - 0.8 + 0.8 * 0.5), rel=1e-6)


def test_scm_dual_head_halts_early_on_planted_harm(tmp_path: Path) -> None:
    # SCM's sequence head learns from each record's last token only, so it needs the causal
    # "memory" of a harmful word (prefix_strength) and more records than the token probes.
    observer = PlantedObserver(hidden_size=8, num_layers=4, signal_words=PLANTED_WORDS,
                               signal_layer=2, strength=4.0, prefix_strength=5.0)
    data = write_jsonl(tmp_path / "d.jsonl", planted_records(160))
    fs = extract_features(observer, data, tmp_path / "cache", layers=[2], progress=False)
    train, val, test = split_by_prompt(fs.records, (0.6, 0.2, 0.2), seed=0)
    result = train_head(DualHead(8), train, val, layer=2, loss_fn=scm_loss_fn(),
                        metric_fn=response_auc_metric(2), epochs=6, lr=5e-2, weight_decay=0.1,
                        progress=False)
    chosen = calibrate_count_k(score_records(result.head, val, 2),
                               [int(r.label or 0) for r in val], ks=range(1, 6))
    on_test = streaming_metrics(score_records(result.head, test, 2),
                                [int(r.label or 0) for r in test], chosen.threshold, chosen.k)
    assert on_test.macro_f1 > 0.9
    # Planted words sit at random places, so a streaming halt reads about half the response.
    assert on_test.fraction_seen is not None and on_test.fraction_seen < 0.8
    assert on_test.false_halt_rate is not None and on_test.false_halt_rate <= 0.1
