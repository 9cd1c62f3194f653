"""Threshold calibration against hand-computed choices."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guardrail.toolkit.calibrate import (
    calibrate_count_k,
    streaming_metrics,
    threshold_for_f1,
    threshold_for_fpr,
    threshold_for_recall,
)

LABELS = [0, 0, 1, 1]
SCORES = [0.1, 0.4, 0.35, 0.8]


def test_threshold_for_recall_picks_fewest_positives() -> None:
    choice = threshold_for_recall(LABELS, SCORES, target=0.95)
    assert choice.threshold == 0.35
    assert choice.recall == 1.0
    assert choice.positive_rate == 0.75
    assert choice.met
    assert threshold_for_recall(LABELS, SCORES, target=0.5).threshold == 0.8


def test_threshold_for_recall_reports_an_unreachable_target() -> None:
    choice = threshold_for_recall(LABELS, SCORES, target=0.95, candidates=[0.9, 0.5])
    assert not choice.met
    assert (choice.threshold, choice.recall) == (0.5, 0.5)


def test_threshold_for_f1() -> None:
    # F1 at 0.8: 2/3; at 0.4: 1/2; at 0.35: 4/5; at 0.1: 2/3
    choice = threshold_for_f1(LABELS, SCORES)
    assert (choice.threshold, choice.recall, choice.positive_rate) == (0.35, 1.0, 0.75)
    # ties go to the higher threshold: 0.9 and 0.3 both give F1 2/3 here
    assert threshold_for_f1([1, 0, 0, 1], [0.9, 0.5, 0.4, 0.3],
                            candidates=[0.9, 0.3]).threshold == 0.9


def test_threshold_for_fpr() -> None:
    assert threshold_for_fpr(LABELS, SCORES, target=0.1).threshold == 0.8
    choice = threshold_for_fpr(LABELS, SCORES, target=0.5)
    assert (choice.threshold, choice.recall, choice.fpr) == (0.35, 1.0, 0.5)


STREAMS = [
    [0.1, 0.9, 0.9, 0.9],  # harmful: second flag at index 2 -> 3/4 seen
    [0.9, 0.9, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1],  # harmful: second flag at index 1 -> 2/8
    [0.9, 0.1, 0.1, 0.1],  # benign with one flagged prefix
    [0.1, 0.1, 0.1],  # benign
]
STREAM_LABELS = [1, 1, 0, 0]


def test_calibrate_count_k_finds_the_separating_k() -> None:
    best = calibrate_count_k(STREAMS, STREAM_LABELS, thresholds=[0.5], ks=[1, 2, 3])
    assert (best.threshold, best.k) == (0.5, 2)
    assert best.macro_f1 == 1.0
    assert best.fraction_seen == pytest.approx((3 / 4 + 2 / 8) / 2)
    assert best.false_halt_rate == 0.0


def test_streaming_metrics_at_k1() -> None:
    # k=1 halts the benign stream too: tp=2 fp=1 tn=1 -> F1_1 = 4/5, F1_0 = 2/3.
    r = streaming_metrics(STREAMS, STREAM_LABELS, 0.5, 1)
    assert r.macro_f1 == pytest.approx((4 / 5 + 2 / 3) / 2)
    assert r.false_halt_rate == 0.5
    assert r.fraction_seen == pytest.approx((2 / 4 + 1 / 8) / 2)


CAP_STREAMS = [[0.9] * 5, [0.9, 0.9, 0.1, 0.1], [0.9, 0.1, 0.1], [0.9, 0.9, 0.1], [0.1]]
CAP_LABELS = [1, 1, 1, 0, 0]


def test_calibrate_count_k_respects_a_false_halt_cap() -> None:
    free = calibrate_count_k(CAP_STREAMS, CAP_LABELS, thresholds=[0.5], ks=[1, 2, 3])
    assert free.k == 1
    assert free.false_halt_rate == 0.5
    capped = calibrate_count_k(CAP_STREAMS, CAP_LABELS, thresholds=[0.5], ks=[1, 2, 3],
                               max_false_halt_rate=0.0)
    assert capped.k == 3
    assert capped.false_halt_rate == 0.0
    assert capped.macro_f1 == pytest.approx((0.5 + 2 / 3) / 2)
    assert capped.constraint_met


def test_calibrate_count_k_says_when_no_setting_meets_the_cap() -> None:
    r = calibrate_count_k(CAP_STREAMS, CAP_LABELS, thresholds=[0.5], ks=[1],
                          max_false_halt_rate=0.0)
    assert not r.constraint_met
    assert r.false_halt_rate == 0.5


READ_STREAMS = [[0.9] * 10, [0.9] * 10, [0.9, 0.9] + [0.1] * 8, [0.1] * 10]
READ_LABELS = [1, 1, 0, 0]


def test_calibrate_count_k_respects_a_read_cap() -> None:
    # k 3 separates the streams (macro-F1 1) but reads 30% of each harmful one; k 1 and 2 also
    # halt the benign stream that flags twice.
    free = calibrate_count_k(READ_STREAMS, READ_LABELS, thresholds=[0.5], ks=[1, 2, 3])
    assert (free.k, free.macro_f1, free.fraction_seen) == (3, 1.0, pytest.approx(0.3))
    capped = calibrate_count_k(READ_STREAMS, READ_LABELS, thresholds=[0.5], ks=[1, 2, 3],
                               max_fraction_seen=0.2)
    assert (capped.k, capped.false_halt_rate) == (1, 0.5)
    assert capped.fraction_seen == pytest.approx(0.1)
    assert capped.constraint_met
    both = calibrate_count_k(READ_STREAMS, READ_LABELS, thresholds=[0.5], ks=[1, 2, 3],
                             max_false_halt_rate=0.0, max_fraction_seen=0.2)
    assert not both.constraint_met
    assert (both.k, both.false_halt_rate) == (3, 0.0)  # the fewest false halts


def test_calibrate_rejects_mismatched_inputs() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        calibrate_count_k(STREAMS, [1, 0])


def test_metrics_and_calibration_import_without_numpy_or_torch() -> None:
    # guardrail eval imports these in the core, which must not pull in the heavy extras.
    import subprocess
    import sys

    code = ("import sys, guardrail.toolkit.metrics, guardrail.toolkit.calibrate; "
            "print(sorted({'numpy', 'torch'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@settings(deadline=None)  # no timed unit tests: a busy machine is not a failure
@given(st.lists(st.tuples(st.integers(0, 1),
                          st.lists(st.sampled_from([0.1, 0.4, 0.6, 0.9]), max_size=8)),
                min_size=2, max_size=12))
def test_calibrate_count_k_is_the_best_of_its_grid(rows: list[tuple[int, list[float]]]) -> None:
    labels = [y for y, _ in rows]
    streams = [s for _, s in rows]
    best = calibrate_count_k(streams, labels, thresholds=[0.3, 0.5, 0.8], ks=range(1, 5))
    every = [streaming_metrics(streams, labels, t, k).macro_f1
             for t in (0.3, 0.5, 0.8) for k in range(1, 5)]
    assert best.macro_f1 == max(every)
    again = streaming_metrics(streams, labels, best.threshold, best.k)
    assert again == best
