"""The calibration stage: SCM's count-k rule ``(threshold, k)`` chosen for the best macro-F1 with
false halts (and optionally the share of a harmful answer read) capped."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import numpy as np

from guardrail.probes.heads import ProbeHead
from guardrail.toolkit.calibrate import StreamingResult, calibrate_count_k
from guardrail.toolkit.features import CachedRecord
from guardrail.toolkit.metrics import fraction_seen, macro_f1
from guardrail.toolkit.train import MetricFn

from ..head import DualHead
from .crossfit import count_k_grid
from .inputs import label
from .scoring import (
    BENIGN_QUANTILES,
    calibration_thresholds,
    full_report,
    full_threshold,
    prefix_scores,
    streaming_report,
)

__all__ = ["MAX_K", "THRESHOLDS", "calibrate", "grid_choice", "halt_summary", "holdout_decision",
           "streaming_metric"]

# The grid: these fixed steps plus quantiles of the benign prefix scores. On SmolLM2 benign
# prefixes pass 0.95 often enough that a 3% false-halt budget needs thresholds near 1.
THRESHOLDS = (*(round(0.05 * i, 2) for i in range(1, 20)), 0.96, 0.97, 0.98, 0.99, 0.995,
              0.998, 0.999)
MAX_K = 100


def calibrate(scores: Sequence[Sequence[float]], labels: Sequence[int],
              max_false_halt_rate: float, max_fraction_seen: float | None = None,
              ) -> StreamingResult:
    """SCM's ``(threshold, k)``: the best macro-F1 on these records with false halts (and,
    optionally, the mean share of a harmful answer read) capped."""
    return calibrate_count_k(scores, labels, thresholds=calibration_thresholds(
                                 scores, labels, THRESHOLDS),
                             ks=range(1, MAX_K + 1), max_false_halt_rate=max_false_halt_rate,
                             max_fraction_seen=max_fraction_seen)


def grid_choice(scores: Sequence[np.ndarray], labels: Sequence[int],
                max_false_halt_rate: float) -> StreamingResult:
    """``calibrate`` (without a read cap) in numpy, for the many choices of cross-fitting."""
    grid = calibration_thresholds(cast(list[Sequence[float]], scores), labels, THRESHOLDS)
    return count_k_grid(scores, labels, grid, range(1, MAX_K + 1), max_false_halt_rate)


def grid_record(max_false_halt_rate: float) -> dict[str, Any]:
    """How the grid was searched, as the weights' ``calibration`` records it."""
    return {"max_k": MAX_K, "thresholds": list(THRESHOLDS),
            "benign_quantiles": list(BENIGN_QUANTILES),
            "max_false_halt_rate": max_false_halt_rate}


def streaming_metric(max_false_halt_rate: float, max_fraction_seen: float | None = None,
                     ) -> MetricFn:
    """Epoch selection: the calibrated streaming macro-F1 on validation (the shipped decision)."""

    def metric(head: ProbeHead, records: Sequence[CachedRecord]) -> float:
        assert isinstance(head, DualHead)
        scores = prefix_scores(head, records)
        return calibrate(scores, [label(r) for r in records], max_false_halt_rate,
                         max_fraction_seen).macro_f1

    return metric


def holdout_decision(scores: Sequence[Sequence[float]], labels: Sequence[int],
                     max_false_halt_rate: float, max_fraction_seen: float | None
                     ) -> dict[str, Any]:
    """The shipped rule chosen on validation scores under the caps, as the weights' JSON
    records it: threshold, rule, full-detection threshold, calibration and metrics."""
    choice = calibrate(scores, labels, max_false_halt_rate, max_fraction_seen)
    full_t = full_threshold(scores, labels)
    grid = grid_record(max_false_halt_rate)
    return {
        "threshold": choice.threshold,
        "rule": {"kind": "count", "k": choice.k},
        "full_detection_threshold": full_t,
        "calibration": {"objective": "macro_f1", "split": "val", "max_k": grid["max_k"],
                        "thresholds": grid["thresholds"],
                        "benign_quantiles": grid["benign_quantiles"],
                        "max_false_halt_rate": max_false_halt_rate,
                        "max_fraction_seen": max_fraction_seen,
                        "constraint_met": choice.constraint_met},
        "metrics": {"val": {"streaming": streaming_report(scores, labels, choice.threshold,
                                                          choice.k),
                            "full": full_report(scores, labels, full_t)}},
    }


def halt_summary(halts: Sequence[int | None], labels: Sequence[int], lengths: Sequence[int]
                 ) -> dict[str, Any]:
    """Macro-F1, precision, recall, share read and false halts of given halts."""
    predictions = [int(h is not None) for h in halts]
    m = macro_f1(labels, predictions)
    benign = [p for p, y in zip(predictions, labels, strict=True) if y == 0]
    return {"macro_f1": m["macro_f1"], "precision": m["precision_1"], "recall": m["recall_1"],
            "fraction_seen": fraction_seen(labels, halts, lengths),
            "false_halt_rate": sum(benign) / len(benign) if benign else None,
            "records": len(labels)}
