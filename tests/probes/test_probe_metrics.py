"""Metrics against hand-computed values and brute-force definitions."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guardrail.toolkit.metrics import (
    best_threshold,
    count_k_halt,
    fraction_seen,
    macro_f1,
    recall_at_fpr,
    roc_auc,
    roc_curve,
    span_max,
)

LABELS = [0, 0, 1, 1]
SCORES = [0.1, 0.4, 0.35, 0.8]


def test_roc_auc_hand_computed() -> None:
    # Pairs (pos, neg): 0.35>0.1, 0.35<0.4, 0.8>0.1, 0.8>0.4 -> 3 of 4.
    assert roc_auc(LABELS, SCORES) == pytest.approx(0.75)


def test_roc_auc_counts_ties_as_half() -> None:
    # pos 0.5 vs neg 0.5 ties (1/2); the other three pairs are won.
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]) == pytest.approx(3.5 / 4)


def test_roc_auc_needs_both_classes() -> None:
    with pytest.raises(ValueError, match="both classes"):
        roc_auc([1, 1], [0.2, 0.3])


@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 5)), min_size=2, max_size=30))
def test_roc_auc_equals_pair_counting(rows: list[tuple[int, int]]) -> None:
    labels = [y for y, _ in rows]
    scores = [float(s) for _, s in rows]
    pos = [s for y, s in rows if y == 1]
    neg = [s for y, s in rows if y == 0]
    if not pos or not neg:
        return
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    assert roc_auc(labels, scores) == pytest.approx(wins / (len(pos) * len(neg)))


def test_roc_curve_points() -> None:
    fpr, tpr, thresholds = roc_curve(LABELS, SCORES)
    assert thresholds == [math.inf, 0.8, 0.4, 0.35, 0.1]
    assert fpr == [0.0, 0.0, 0.5, 0.5, 1.0]
    assert tpr == [0.0, 0.5, 0.5, 1.0, 1.0]


def test_recall_at_fpr() -> None:
    assert recall_at_fpr(LABELS, SCORES, 0.1) == 0.5
    assert recall_at_fpr(LABELS, SCORES, fpr=0.5) == 1.0


def test_macro_f1_per_class() -> None:
    # tp=2 fn=1 tn=1 fp=1: class 1 P=R=F1=2/3; class 0 P=R=F1=1/2.
    m = macro_f1([1, 1, 0, 0, 1], [1, 0, 0, 1, 1])
    assert m["precision_1"] == pytest.approx(2 / 3)
    assert m["recall_1"] == pytest.approx(2 / 3)
    assert m["f1_0"] == pytest.approx(0.5)
    assert m["macro_f1"] == pytest.approx(7 / 12)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 1, 1)


def test_macro_f1_without_positive_predictions_is_defined() -> None:
    m = macro_f1([1, 0], [0, 0])
    assert m["f1_1"] == 0.0
    assert m["f1_0"] == pytest.approx(2 / 3)


def test_count_k_halt_is_cumulative_not_consecutive() -> None:
    scores = [0.2, 0.9, 0.1, 0.95, 0.99]
    assert count_k_halt(scores, 0.9, 2) == 3
    assert count_k_halt(scores, 0.9, 3) == 4
    assert count_k_halt(scores, 0.9, 4) is None


def test_fraction_seen_counts_only_halted_positives() -> None:
    assert fraction_seen([1, 1, 0], [3, None, 0], [5, 4, 10]) == pytest.approx(0.8)
    assert fraction_seen([0], [0], [3]) is None


def test_span_max() -> None:
    assert span_max([0.1, 0.7, 0.3, 0.9, 0.2], [-1, 0, 0, 1, -1]) == {0: 0.7, 1: 0.9}


def test_best_threshold_macro_f1() -> None:
    # 0.8 and 0.35 both give macro-F1 11/15; the higher threshold wins the tie.
    t, value = best_threshold(LABELS, SCORES)
    assert t == 0.8
    assert value == pytest.approx(11 / 15)


def test_best_threshold_youden() -> None:
    t, value = best_threshold(LABELS, SCORES, objective="youden")
    assert (t, value) == (0.8, pytest.approx(0.5))


@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 6)), min_size=2, max_size=25))
def test_best_threshold_sweep_equals_brute_force(rows: list[tuple[int, int]]) -> None:
    labels = [y for y, _ in rows]
    scores = [float(s) for _, s in rows]
    if len(set(labels)) < 2:
        return
    _, value = best_threshold(labels, scores)
    brute = max(macro_f1(labels, [int(s >= t) for s in scores])["macro_f1"] for t in scores)
    assert value == pytest.approx(brute)
