"""Detection metrics in pure Python (no numpy): the core's ``guardrail eval`` imports them.

Labels are 0/1 (1 = the positive class: harmful, hallucinated, divergent); scores are floats,
higher meaning more positive. Functions that need both classes raise ``ValueError`` when one is
missing, so a caller can report the metric as undefined.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

__all__ = [
    "best_threshold",
    "confusion",
    "count_k_halt",
    "fraction_seen",
    "macro_f1",
    "recall_at_fpr",
    "roc_auc",
    "roc_curve",
    "span_max",
]


def _check(labels: Sequence[int], scores: Sequence[float]) -> tuple[int, int]:
    if len(labels) != len(scores):
        raise ValueError(f"labels and scores differ in length: {len(labels)} != {len(scores)}")
    n_pos = sum(1 for y in labels if y == 1)
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"need both classes, got {n_pos} positive and {n_neg} negative")
    return n_pos, n_neg


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Area under the ROC curve: the probability that a random positive scores above a random
    negative, ties counting one half (Mann-Whitney U with average ranks)."""
    n_pos, n_neg = _check(labels, scores)
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    rank_sum = 0.0
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        average_rank = (i + j) / 2 + 1  # ranks are 1-based; ties share their mean rank
        rank_sum += average_rank * sum(1 for k in order[i : j + 1] if labels[k] == 1)
        i = j + 1
    u = rank_sum - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def roc_curve(
    labels: Sequence[int], scores: Sequence[float]
) -> tuple[list[float], list[float], list[float]]:
    """ROC points ``(fpr, tpr, thresholds)``, thresholds descending. Point ``i`` predicts positive
    when ``score >= thresholds[i]``; the first point (threshold ``inf``) predicts nothing."""
    n_pos, n_neg = _check(labels, scores)
    pairs = sorted(zip(scores, labels, strict=True), key=lambda p: -p[0])
    fpr, tpr, thresholds = [0.0], [0.0], [math.inf]
    tp = fp = 0
    for i, (score, label) in enumerate(pairs):
        if label == 1:
            tp += 1
        else:
            fp += 1
        if i + 1 == len(pairs) or pairs[i + 1][0] != score:
            fpr.append(fp / n_neg)
            tpr.append(tp / n_pos)
            thresholds.append(score)
    return fpr, tpr, thresholds


def recall_at_fpr(labels: Sequence[int], scores: Sequence[float], fpr: float = 0.1) -> float:
    """The highest recall (TPR) of any threshold whose false-positive rate is at most ``fpr``
    (no interpolation between ROC points)."""
    fprs, tprs, _ = roc_curve(labels, scores)
    return max(t for f, t in zip(fprs, tprs, strict=True) if f <= fpr + 1e-12)


def confusion(labels: Sequence[int], predictions: Sequence[int]) -> dict[str, int]:
    """Counts ``tp``, ``fp``, ``tn``, ``fn`` of 0/1 predictions."""
    if len(labels) != len(predictions):
        raise ValueError(
            f"labels and predictions differ in length: {len(labels)} != {len(predictions)}"
        )
    out = {"tp": 0, "fp": 0, "tn": 0, "fn": 0}
    for y, p in zip(labels, predictions, strict=True):
        key = ("t" if y == p else "f") + ("p" if p == 1 else "n")
        out[key] += 1
    return out


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def macro_f1(labels: Sequence[int], predictions: Sequence[int]) -> dict[str, float]:
    """Per-class precision, recall and F1 (``precision_0`` ... ``f1_1``), their macro mean
    ``macro_f1`` (mean of ``f1_0`` and ``f1_1``, as SCM reports), ``accuracy`` and the counts.
    A class with no predictions (or no examples) scores 0 where the ratio is undefined."""
    c = confusion(labels, predictions)
    out: dict[str, float] = {k: float(v) for k, v in c.items()}
    # Class 1 is the positive class; class 0's "positives" are the negatives.
    per_class = {1: (c["tp"], c["fp"], c["fn"]), 0: (c["tn"], c["fn"], c["fp"])}
    for cls, (tp, fp, fn) in per_class.items():
        precision = _ratio(tp, tp + fp)
        recall = _ratio(tp, tp + fn)
        out[f"precision_{cls}"] = precision
        out[f"recall_{cls}"] = recall
        out[f"f1_{cls}"] = _ratio(2 * precision * recall, precision + recall)
    out["macro_f1"] = (out["f1_0"] + out["f1_1"]) / 2
    out["accuracy"] = _ratio(c["tp"] + c["tn"], len(labels))
    return out


def count_k_halt(scores: Sequence[float], threshold: float, k: int) -> int | None:
    """SCM's delay-k rule on one stream: the index of the token at which the cumulative count of
    scores ``>= threshold`` reaches ``k`` (where the stream halts), or ``None``."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    count = 0
    for i, score in enumerate(scores):
        if score >= threshold:
            count += 1
            if count >= k:
                return i
    return None


def fraction_seen(
    labels: Sequence[int], halts: Sequence[int | None], lengths: Sequence[int]
) -> float | None:
    """Mean share of a positive response's tokens read before a correct halt: ``(halt + 1) /
    length`` over responses with label 1 that halted. ``None`` when none did."""
    if not len(labels) == len(halts) == len(lengths):
        raise ValueError("labels, halts and lengths differ in length")
    seen = [
        (h + 1) / n
        for y, h, n in zip(labels, halts, lengths, strict=True)
        if y == 1 and h is not None and n > 0
    ]
    return sum(seen) / len(seen) if seen else None


def span_max(token_scores: Sequence[float], span_ids: Sequence[int]) -> dict[int, float]:
    """The maximum score of each span: ``span_ids[i]`` names token ``i``'s span (``-1``: none)."""
    if len(token_scores) != len(span_ids):
        raise ValueError("token_scores and span_ids differ in length")
    out: dict[int, float] = {}
    for score, span in zip(token_scores, span_ids, strict=True):
        if span >= 0 and (span not in out or score > out[span]):
            out[span] = score
    return out


def _macro_f1_counts(tp: int, fp: int, tn: int, fn: int) -> float:
    f1_1 = _ratio(2 * tp, 2 * tp + fp + fn)
    f1_0 = _ratio(2 * tn, 2 * tn + fn + fp)
    return (f1_0 + f1_1) / 2


def _youden_counts(tp: int, fp: int, tn: int, fn: int) -> float:
    return _ratio(tp, tp + fn) - _ratio(fp, fp + tn)


_OBJECTIVES: dict[str, Callable[[int, int, int, int], float]] = {
    "macro_f1": _macro_f1_counts,
    "youden": _youden_counts,
}


def best_threshold(
    labels: Sequence[int],
    scores: Sequence[float],
    objective: str = "macro_f1",
    candidates: Sequence[float] | None = None,
) -> tuple[float, float]:
    """The threshold (predict positive at ``score >= t``) that maximises ``objective``
    (``"macro_f1"`` or ``"youden"``: TPR - FPR) and its value. Candidates default to every
    distinct score; ties go to the higher threshold (fewer positives). One sorted sweep."""
    n_pos, n_neg = _check(labels, scores)
    if objective not in _OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose from {sorted(_OBJECTIVES)}")
    fn = _OBJECTIVES[objective]
    pool = sorted(set(scores if candidates is None else candidates), reverse=True)
    if not pool:
        raise ValueError("no candidate thresholds")
    pairs = sorted(zip(scores, labels, strict=True), key=lambda p: -p[0])
    best_t, best_v = pool[0], -math.inf
    tp = fp = 0
    i = 0
    for t in pool:
        while i < len(pairs) and pairs[i][0] >= t:
            tp += pairs[i][1] == 1
            fp += pairs[i][1] != 1
            i += 1
        v = fn(tp, fp, n_neg - fp, n_pos - tp)
        if v > best_v:
            best_t, best_v = t, v
    return best_t, best_v
