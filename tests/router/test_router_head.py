"""The router plugin's head: shapes, configs and files that rebuild it, training it with the
toolkit's loop, and its registration as head kind ``router``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from guardrail_router.head import RouterHead
from guardrail_router.training.loss import router_loss_fn

from guardrail.probes.heads import HEADS, LinearProbe, ProbeHead, build_head, register_head
from guardrail.probes.io import ProbeFileError, load_probe, save_probe
from guardrail.toolkit.fake import PlantedObserver, planted_records, write_jsonl
from guardrail.toolkit.features import extract_features, split_by_prompt
from guardrail.toolkit.losses import positive_weight
from guardrail.toolkit.train import collate, score_records, token_auc_metric, train_head


def test_router_head_shapes_and_frozen_embedding() -> None:
    table = torch.randn(50, 12)
    head = RouterHead(16, table, top_k=10, width=32, blocks=2)
    logits = head(torch.randn(3, 7, 16), torch.randint(0, 50, (3, 7)), torch.randn(3, 7, 10))
    assert logits.shape == (3, 7)
    assert "embedding" not in head.state_dict()
    assert all(p is not head.embedding for p in head.parameters())
    with pytest.raises(ValueError, match="10 top logits"):
        head(torch.randn(1, 16), torch.tensor([1]), torch.randn(1, 5))


def test_config_rebuilds_an_identical_router() -> None:
    head = RouterHead(16, torch.randn(40, 16), top_k=8, width=24, blocks=1)
    again = build_head(head.config, embedding=head.embedding)
    assert type(again) is RouterHead and again.config == head.config
    for (name, a), (_, b) in zip(head.state_dict().items(), again.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name


def test_router_config_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="embedding table"):
        build_head(RouterHead(4, torch.randn(10, 4), top_k=2, width=8).config)
    with pytest.raises(ValueError, match=r"expects \(10, 4\)"):
        build_head(RouterHead(4, torch.randn(10, 4), top_k=2, width=8).config,
                   embedding=torch.randn(11, 4))


def test_router_round_trip_takes_the_embedding_from_the_caller(tmp_path: Path) -> None:
    table = torch.randn(30, 16)
    head = RouterHead(16, table, top_k=5, width=8, blocks=1)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p))
    save_probe(tmp_path, head, {"layer": 2})
    loaded = load_probe(tmp_path, embedding=table)
    args = (torch.randn(4, 16), torch.tensor([0, 3, 29, 7]), torch.randn(4, 5))
    assert torch.equal(loaded.head.eval()(*args), head.eval()(*args))
    assert (tmp_path / "probe.safetensors").stat().st_size < 20_000  # no table inside
    with pytest.raises(ProbeFileError, match="embedding"):
        load_probe(tmp_path)


def test_the_shipped_router_loads_as_the_plugins_head() -> None:
    from guardrail_router.monitor import DEFAULT_WEIGHTS

    config = json_of(DEFAULT_WEIGHTS.with_suffix(".json"))
    table = torch.zeros(config["head"]["vocab_size"], config["head"]["embed_dim"])
    loaded = load_probe(DEFAULT_WEIGHTS, embedding=table)
    assert type(loaded.head) is RouterHead and loaded.head.config == config["head"]


def json_of(path: Path) -> dict[str, object]:
    import json

    data = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def test_a_head_kind_is_registered_once() -> None:
    assert HEADS["router"] is RouterHead

    class Impostor(LinearProbe):
        kind = "router"

    with pytest.raises(ValueError, match="head kind 'router' is taken by guardrail_router"):
        register_head(Impostor)
    assert HEADS["router"] is RouterHead

    class Nameless(ProbeHead):
        pass

    with pytest.raises(ValueError, match="Nameless has no kind"):
        register_head(Nameless)


def test_router_head_trains_with_the_toolkit_loop(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "planted.jsonl", planted_records(120))
    observer = PlantedObserver(hidden_size=16, num_layers=4, signal_words=("bad", "worse"),
                               signal_layer=3, strength=3.0)
    fs = extract_features(observer, data, tmp_path / "cache", layers=[3], top_k=8,
                          progress=False)
    train, val, test = split_by_prompt(fs.records, (0.6, 0.2, 0.2), seed=0)
    labels = collate(train, 3).token_labels.flatten()
    head = RouterHead(16, observer.embedding, top_k=8, width=32, blocks=1)
    result = train_head(head, train, val, layer=3, loss_fn=router_loss_fn(positive_weight(labels)),
                        metric_fn=token_auc_metric(3), epochs=4, lr=1e-2, progress=False)
    assert token_auc_metric(3)(result.head, test) > 0.9
    scores = score_records(result.head, test, 3)  # through the head's own score_batch
    assert [len(s) for s in scores] == [len(r) for r in test]
