"""Losses against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from guardrail.toolkit.losses import (
    anneal_weight,
    annealed_loss,
    positive_weight,
    span_max_bce,
    token_bce,
    weighted_bce,
)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_token_bce_weights_and_ignores() -> None:
    logits = torch.tensor([0.0, 2.0, 5.0])
    labels = torch.tensor([1, 0, -100])
    weights = torch.tensor([10.0, 1.0, 1.0])
    # token 0: 10 * log 2; token 1: log(1 + e^2); token 2 ignored.
    expected = (10 * math.log(2) + softplus(2.0)) / 2
    assert token_bce(logits, labels, weights).item() == pytest.approx(expected, rel=1e-6)


def test_token_bce_all_ignored_is_zero_and_differentiable() -> None:
    logits = torch.zeros(3, requires_grad=True)
    loss = token_bce(logits, torch.full((3,), -100))
    loss.backward()
    assert loss.item() == 0.0


def test_span_max_bce_hand_computed() -> None:
    logits = torch.tensor([[0.5, 2.0, -1.0, 3.0]])
    span_ids = torch.tensor([[0, 0, -1, 1]])
    span_labels = torch.tensor([[1, 0]])
    # span 0: max 2.0 against 1 -> log(1 + e^-2); span 1: max 3.0 against 0 -> log(1 + e^3).
    expected = (softplus(-2.0) + softplus(3.0)) / 2
    assert span_max_bce(logits, span_ids, span_labels).item() == pytest.approx(expected, rel=1e-6)


def test_span_max_bce_skips_ignored_and_empty_spans() -> None:
    logits = torch.tensor([[0.5, 2.0, -1.0, 3.0]])
    span_ids = torch.tensor([[0, 0, -1, -1]])
    span_labels = torch.tensor([[1, -100, 0]])  # span 1 ignored, span 2 has no tokens
    assert span_max_bce(logits, span_ids, span_labels).item() == pytest.approx(softplus(-2.0))


def test_span_max_gradient_reaches_only_the_max_token() -> None:
    logits = torch.tensor([[0.5, 2.0, -1.0]], requires_grad=True)
    span_max_bce(logits, torch.tensor([[0, 0, 0]]), torch.tensor([[1]])).backward()
    assert logits.grad is not None
    assert logits.grad[0, 0] == 0 and logits.grad[0, 2] == 0 and logits.grad[0, 1] < 0


def test_annealing_schedule() -> None:
    assert anneal_weight(0.0) == 0.0
    assert anneal_weight(0.25, warmup=0.5) == 0.5
    assert anneal_weight(0.9, warmup=0.5) == 1.0
    mixed = annealed_loss(torch.tensor(2.0), torch.tensor(4.0), progress=0.25, warmup=0.5)
    assert mixed.item() == pytest.approx(3.0)


def test_positive_weighted_bce() -> None:
    labels = torch.tensor([1, 0, 0, 0, -100])
    assert positive_weight(labels) == 3.0
    loss = weighted_bce(torch.zeros(5), labels, positive_weight(labels))
    assert loss.item() == pytest.approx((3 * math.log(2) + 3 * math.log(2)) / 4, rel=1e-6)
