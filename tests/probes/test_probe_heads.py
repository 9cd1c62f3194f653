"""Probe heads: shapes, the paper's initialisation, configs that rebuild the same head."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from guardrail.probes.heads import DualHead, LinearProbe, ProbeHead, build_head


def test_linear_probe_initialisation_is_seeded_and_small() -> None:
    a, b = LinearProbe(64, seed=42), LinearProbe(64, seed=42)
    assert torch.equal(a.linear.weight, b.linear.weight)
    assert not torch.equal(a.linear.weight, LinearProbe(64, seed=1).linear.weight)
    assert a.linear.bias.item() == 0.0
    assert 0.005 < a.linear.weight.std().item() < 0.015
    scores = a.score(torch.randn(2, 5, 64))
    assert scores.shape == (2, 5) and bool(((scores > 0) & (scores < 1)).all())


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
    lambda: LinearProbe(16, seed=3),
    lambda: DualHead(16, dropout=0.2),
    lambda: DualHead(16, sequence_hidden=4),
])
def test_config_rebuilds_an_identical_head(make: Callable[[], ProbeHead]) -> None:
    head = make()
    again = build_head(head.config)
    assert type(again) is type(head) and again.config == head.config
    for (name, a), (_, b) in zip(head.state_dict().items(), again.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name


def test_build_head_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="unknown head kind 'mlp'"):
        build_head({"kind": "mlp"})
    with pytest.raises(ValueError, match="lacks 'hidden_size'"):
        build_head({"kind": "linear"})
    for bad in (-1, 2.5, "64", True):
        with pytest.raises(ValueError, match="'sequence_hidden' must be a whole number"):
            build_head({"kind": "dual", "hidden_size": 8, "sequence_hidden": bad})
