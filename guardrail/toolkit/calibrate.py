"""Choosing decision thresholds on a validation split, in pure Python (``guardrail eval`` and the
trainers use it without numpy).

- ``threshold_for_recall``: R2R's rule: among thresholds whose recall reaches the target, the one
  that predicts the fewest positives (routes the fewest tokens).
- ``threshold_for_fpr``: the threshold with the most recall whose false-positive rate stays under
  a target (recall at a fixed FPR, as the entity-hallucination paper reports).
- ``threshold_for_f1``: the threshold with the best F1 (flags about as often right as the
  positives they catch: an operating point for flags a person reads).
- ``calibrate_count_k``: SCM's streaming rule: a prefix is flagged when its score reaches the
  threshold and the stream halts when ``k`` prefixes have been flagged; choose ``(threshold, k)``
  for the best response-level macro-F1, optionally under a cap on false halts.

Every threshold means "positive when ``score >= threshold``", as the core's rules apply it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .metrics import fraction_seen, macro_f1

__all__ = [
    "DEFAULT_THRESHOLDS",
    "StreamingResult",
    "ThresholdChoice",
    "calibrate_count_k",
    "streaming_metrics",
    "threshold_for_f1",
    "threshold_for_fpr",
    "threshold_for_recall",
]

DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 20))
"""0.05, 0.10, ... 0.95: a superset of SCM's sweep {0.5, ..., 0.9}."""


@dataclass(frozen=True)
class ThresholdChoice:
    """A chosen threshold and what it does on the data it was chosen on. ``met`` is False when no
    candidate reached the target (the closest one is returned)."""

    threshold: float
    recall: float
    fpr: float
    positive_rate: float
    met: bool = True

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sweep(
    labels: Sequence[int], scores: Sequence[float], candidates: Sequence[float] | None
) -> list[ThresholdChoice]:
    """One ThresholdChoice per candidate, thresholds descending (one sorted pass)."""
    if len(labels) != len(scores):
        raise ValueError(f"labels and scores differ in length: {len(labels)} != {len(scores)}")
    n_pos = sum(1 for y in labels if y == 1)
    n_neg = len(labels) - n_pos
    if n_pos == 0:
        raise ValueError("no positive examples to calibrate on")
    pool = sorted(set(scores if candidates is None else candidates), reverse=True)
    pairs = sorted(zip(scores, labels, strict=True), key=lambda p: -p[0])
    out: list[ThresholdChoice] = []
    tp = fp = i = 0
    for t in pool:
        while i < len(pairs) and pairs[i][0] >= t:
            tp += pairs[i][1] == 1
            fp += pairs[i][1] != 1
            i += 1
        out.append(ThresholdChoice(t, tp / n_pos, fp / n_neg if n_neg else 0.0,
                                   (tp + fp) / len(labels)))
    return out


def threshold_for_recall(
    labels: Sequence[int],
    scores: Sequence[float],
    target: float = 0.95,
    candidates: Sequence[float] | None = None,
) -> ThresholdChoice:
    """Among thresholds with recall ``>= target``, the one with the fewest predicted positives.

    Candidates default to every distinct score (R2R sweeps ``linspace(0.01, 0.99, 100)``; pass that
    as ``candidates`` to copy it). If no candidate reaches the target, the one with the highest
    recall is returned with ``met=False``."""
    points = _sweep(labels, scores, candidates)
    reaching = [p for p in points if p.recall >= target]
    if reaching:
        return min(reaching, key=lambda p: (p.positive_rate, -p.threshold))
    best = max(points, key=lambda p: (p.recall, p.threshold))
    return ThresholdChoice(best.threshold, best.recall, best.fpr, best.positive_rate, met=False)


def threshold_for_f1(
    labels: Sequence[int],
    scores: Sequence[float],
    candidates: Sequence[float] | None = None,
) -> ThresholdChoice:
    """The threshold with the best F1 of the positive class (ties: the higher threshold, fewer
    positives). Candidates default to every distinct score."""
    n_pos = sum(1 for y in labels if y == 1)

    def f1(p: ThresholdChoice) -> float:
        predicted = p.positive_rate * len(labels)
        tp = p.recall * n_pos
        return 2 * tp / (predicted + n_pos) if predicted + n_pos else 0.0

    return max(_sweep(labels, scores, candidates), key=lambda p: (f1(p), p.threshold))


def threshold_for_fpr(
    labels: Sequence[int],
    scores: Sequence[float],
    target: float = 0.1,
    candidates: Sequence[float] | None = None,
) -> ThresholdChoice:
    """Among thresholds with false-positive rate ``<= target``, the one with the highest recall
    (ties: the higher threshold). If none qualifies, the one with the lowest FPR, ``met=False``."""
    points = _sweep(labels, scores, candidates)
    allowed = [p for p in points if p.fpr <= target + 1e-12]
    if allowed:
        return max(allowed, key=lambda p: (p.recall, p.threshold))
    best = min(points, key=lambda p: (p.fpr, -p.recall))
    return ThresholdChoice(best.threshold, best.recall, best.fpr, best.positive_rate, met=False)


@dataclass(frozen=True)
class StreamingResult:
    """Response-level outcome of the count-k rule over a set of streams.

    ``fraction_seen``: mean share of a harmful response's tokens read before a correct halt
    (``None`` when none halted); ``false_halt_rate``: share of benign responses halted.
    ``constraint_met`` is False when a false-halt cap was asked for and no setting met it."""

    threshold: float
    k: int
    macro_f1: float
    precision: float
    recall: float
    fraction_seen: float | None
    false_halt_rate: float | None
    records: int
    constraint_met: bool = True

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _flag_positions(scores: Sequence[float], threshold: float) -> list[int]:
    return [i for i, s in enumerate(scores) if s >= threshold]


def _result(
    labels: Sequence[int],
    positions: Sequence[Sequence[int]],
    lengths: Sequence[int],
    threshold: float,
    k: int,
) -> StreamingResult:
    halts = [p[k - 1] if len(p) >= k else None for p in positions]
    predictions = [int(h is not None) for h in halts]
    m = macro_f1(labels, predictions)
    benign = [pred for y, pred in zip(labels, predictions, strict=True) if y == 0]
    return StreamingResult(
        threshold=threshold,
        k=k,
        macro_f1=m["macro_f1"],
        precision=m["precision_1"],
        recall=m["recall_1"],
        fraction_seen=fraction_seen(labels, halts, lengths),
        false_halt_rate=sum(benign) / len(benign) if benign else None,
        records=len(labels),
    )


def _validate(token_scores: Sequence[Sequence[float]], labels: Sequence[int]) -> None:
    if len(token_scores) != len(labels):
        raise ValueError(
            f"token_scores and labels differ in length: {len(token_scores)} != {len(labels)}"
        )
    bad = [y for y in labels if y not in (0, 1)]
    if bad:
        raise ValueError(f"labels must be 0 or 1, got {bad[0]!r}")


def streaming_metrics(
    token_scores: Sequence[Sequence[float]], labels: Sequence[int], threshold: float, k: int
) -> StreamingResult:
    """The count-k rule at ``(threshold, k)`` applied to each record's per-token (per-prefix)
    scores, scored against the response labels."""
    _validate(token_scores, labels)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    positions = [_flag_positions(s, threshold) for s in token_scores]
    return _result(labels, positions, [len(s) for s in token_scores], threshold, k)


def calibrate_count_k(
    token_scores: Sequence[Sequence[float]],
    labels: Sequence[int],
    thresholds: Iterable[float] = DEFAULT_THRESHOLDS,
    ks: Iterable[int] = range(1, 51),
    max_false_halt_rate: float | None = None,
    max_fraction_seen: float | None = None,
) -> StreamingResult:
    """Choose ``(threshold, k)`` for SCM's count-k rule: the best macro-F1 (ties: smaller
    ``fraction_seen``, then fewer false halts, then the smaller k and higher threshold).

    With ``max_false_halt_rate`` (and ``max_fraction_seen``: the mean share of a harmful response
    read before its halt) only settings within the caps compete; if none is, the setting with the
    fewest false halts (then the least read) is returned, ``constraint_met=False``.
    """
    _validate(token_scores, labels)
    ks = list(ks)
    if not ks or min(ks) < 1:
        raise ValueError("ks must be a non-empty range of integers >= 1")
    lengths = [len(s) for s in token_scores]
    results: list[StreamingResult] = []
    for t in sorted(set(thresholds), reverse=True):
        positions = [_flag_positions(s, t) for s in token_scores]
        results.extend(_result(labels, positions, lengths, t, k) for k in ks)

    def rank(r: StreamingResult) -> tuple[float, ...]:
        seen = r.fraction_seen if r.fraction_seen is not None else 1.0
        false_halts = r.false_halt_rate or 0.0
        return (-r.macro_f1, seen, false_halts, r.k, -r.threshold)

    def read(r: StreamingResult) -> float:
        return r.fraction_seen if r.fraction_seen is not None else 1.0

    if max_false_halt_rate is not None or max_fraction_seen is not None:
        allowed = [r for r in results
                   if (max_false_halt_rate is None
                       or (r.false_halt_rate or 0.0) <= max_false_halt_rate)
                   and (max_fraction_seen is None or read(r) <= max_fraction_seen)]
        if not allowed:
            fewest = min(results, key=lambda r: ((r.false_halt_rate or 0.0), read(r), *rank(r)))
            return StreamingResult(**{**fewest.as_dict(), "constraint_met": False})
        results = allowed
    return min(results, key=rank)
