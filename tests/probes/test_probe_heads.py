"""Probe heads: shapes, the paper's initialisation, configs that rebuild the same head."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from guardrail.probes.heads import LinearProbe, ProbeHead, RouterHead, build_head


def test_linear_probe_initialisation_is_seeded_and_small() -> None:
    a, b = LinearProbe(64, seed=42), LinearProbe(64, seed=42)
    assert torch.equal(a.linear.weight, b.linear.weight)
    assert not torch.equal(a.linear.weight, LinearProbe(64, seed=1).linear.weight)
    assert a.linear.bias.item() == 0.0
    assert 0.005 < a.linear.weight.std().item() < 0.015
    scores = a.score(torch.randn(2, 5, 64))
    assert scores.shape == (2, 5) and bool(((scores > 0) & (scores < 1)).all())


def test_router_head_shapes_and_frozen_embedding() -> None:
    table = torch.randn(50, 12)
    head = RouterHead(16, table, top_k=10, width=32, blocks=2)
    logits = head(torch.randn(3, 7, 16), torch.randint(0, 50, (3, 7)), torch.randn(3, 7, 10))
    assert logits.shape == (3, 7)
    assert "embedding" not in head.state_dict()
    assert all(p is not head.embedding for p in head.parameters())
    with pytest.raises(ValueError, match="10 top logits"):
        head(torch.randn(1, 16), torch.tensor([1]), torch.randn(1, 5))


@pytest.mark.parametrize("make", [
    lambda: LinearProbe(16, seed=3),
    lambda: RouterHead(16, torch.randn(40, 16), top_k=8, width=24, blocks=1),
])
def test_config_rebuilds_an_identical_head(make: Callable[[], ProbeHead]) -> None:
    head = make()
    extra = {"embedding": head.embedding} if isinstance(head, RouterHead) else {}
    again = build_head(head.config, **extra)
    assert type(again) is type(head) and again.config == head.config
    for (name, a), (_, b) in zip(head.state_dict().items(), again.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name


def test_build_head_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="unknown head kind 'mlp'"):
        build_head({"kind": "mlp"})
    with pytest.raises(ValueError, match="lacks 'hidden_size'"):
        build_head({"kind": "linear"})
    with pytest.raises(ValueError, match="embedding table"):
        build_head(RouterHead(4, torch.randn(10, 4), top_k=2, width=8).config)
    with pytest.raises(ValueError, match=r"expects \(10, 4\)"):
        build_head(RouterHead(4, torch.randn(10, 4), top_k=2, width=8).config,
                   embedding=torch.randn(11, 4))
