"""Probe heads: shapes, the paper's initialisation, configs that rebuild the same head."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from guardrail.probes.heads import LinearProbe, ProbeHead, build_head


def test_linear_probe_initialisation_is_seeded_and_small() -> None:
    a, b = LinearProbe(64, seed=42), LinearProbe(64, seed=42)
    assert torch.equal(a.linear.weight, b.linear.weight)
    assert not torch.equal(a.linear.weight, LinearProbe(64, seed=1).linear.weight)
    assert a.linear.bias.item() == 0.0
    assert 0.005 < a.linear.weight.std().item() < 0.015
    scores = a.score(torch.randn(2, 5, 64))
    assert scores.shape == (2, 5) and bool(((scores > 0) & (scores < 1)).all())


@pytest.mark.parametrize("make", [
    lambda: LinearProbe(16, seed=3),
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
