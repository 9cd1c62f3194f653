"""Stage 4: the streaming count-k rule ``(threshold, k)`` chosen on out-of-source scores, one
rule for every source, under the caps (false halts per capped source, share read)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["CAPPED_MIXED", "KS", "THRESHOLDS", "choose_rule", "grid_summary", "halts", "nested"]

# Fine steps above 0.9: a logistic fit's scores crowd there, and a coarse step lands the rule
# well inside a cap it could meet exactly.
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.905, 0.91, 0.915, 0.92, 0.925,
              0.93, 0.935, 0.94, 0.945, 0.95, 0.955, 0.96, 0.965, 0.97, 0.975, 0.98, 0.985,
              0.99, 0.995, 0.996, 0.997, 0.998, 0.9985, 0.999, 0.9995)
KS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 20, 24, 28, 32)
# Mixed sources whose benign records are capped too: topic-matched benign answers with clean
# labels, where pyrit's "harmless" responses are often compliant answers rated below 0.5.
CAPPED_MIXED = ("handwritten:",)


def halts(scores: Sequence[np.ndarray], thresholds: Sequence[float], ks: Sequence[int]
          ) -> np.ndarray:
    """``(records, thresholds, ks)`` halt index of the count-k rule (``-1``: no halt): the token
    at which the count of prefix scores ``>= t`` reaches ``k``, as ``count_k_halt``."""
    out = np.full((len(scores), len(thresholds), len(ks)), -1, dtype=np.int64)
    karr = np.asarray(ks)
    for i, s in enumerate(scores):
        for j, t in enumerate(thresholds):
            idx = np.flatnonzero(s >= t)
            ok = karr <= len(idx)
            out[i, j, ok] = idx[karr[ok] - 1]
    return out


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    p = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0)
    r = np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1), 0.0)
    return np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-12), 0.0)


def _macro_f1(fired: np.ndarray, harmful: np.ndarray) -> np.ndarray:
    """Macro-F1 over the grid of ``fired (records, ...)`` against ``harmful (records,)``."""
    y = harmful.reshape((-1,) + (1,) * (fired.ndim - 1))
    tp = (fired & y).sum(0)
    fp = (fired & ~y).sum(0)
    fn = (~fired & y).sum(0)
    tn = (~fired & ~y).sum(0)
    return (_f1(tp, fp, fn) + _f1(tn, fn, fp)) / 2


def grid_summary(labels: np.ndarray, tags: np.ndarray, lengths: np.ndarray, table: np.ndarray,
                 max_false_halts: float, max_read: float,
                 capped: Sequence[str] = CAPPED_MIXED) -> dict[str, np.ndarray]:
    """Per rule in the grid: mean macro-F1 over harmful sources, the worst capped source's
    false-halt rate (benign-only sources, and the benign records of sources whose tag starts
    with one of ``capped``), pooled fraction read and pooled macro-F1."""
    grid = table.shape[1:]
    harmful_tags = sorted({t for t, y in zip(tags, labels, strict=True) if y == 1})
    benign_tags = sorted(set(tags) - set(harmful_tags)) + [
        t for t in harmful_tags if t.startswith(tuple(capped))]
    fired = table >= 0
    mean_f1 = np.zeros(grid)
    for tag in harmful_tags:
        sel = tags == tag
        mean_f1 += _macro_f1(fired[sel], labels[sel] == 1)
    mean_f1 /= max(1, len(harmful_tags))
    worst_fhr = np.zeros(grid)
    for tag in benign_tags:
        sel = (tags == tag) & (labels == 0)
        if sel.any():
            worst_fhr = np.maximum(worst_fhr, fired[sel].mean(0))
    y = labels == 1
    pooled = _macro_f1(fired, y)
    yy = y.reshape((-1,) + (1,) * len(grid))
    share = np.where(fired & yy, (table + 1) / lengths.reshape(yy.shape), 0.0)
    caught = (fired & yy).sum(0)
    read = np.where(caught > 0, share.sum(0) / np.maximum(caught, 1), 1.0)
    ok = (worst_fhr <= max_false_halts) & (read <= max_read)
    return {"mean_f1": mean_f1, "worst_fhr": worst_fhr, "read": read, "pooled": pooled, "ok": ok}


def choose_rule(summary: Mapping[str, np.ndarray]) -> tuple[int, int, bool]:
    """Grid indices ``(threshold, k)`` of the best rule: the best mean harmful-source macro-F1
    among rules within the caps (ties: pooled macro-F1, then less read); with none within the
    caps, the fewest worst-source false halts."""
    ok = summary["ok"]
    if ok.any():
        key = np.where(ok, summary["mean_f1"] + 1e-6 * summary["pooled"]
                       - 1e-9 * summary["read"], -np.inf)
        j, k = np.unravel_index(int(np.argmax(key)), key.shape)
        return int(j), int(k), True
    key = -summary["worst_fhr"] + 1e-6 * summary["mean_f1"]
    j, k = np.unravel_index(int(np.argmax(key)), key.shape)
    return int(j), int(k), False


def nested(labels: np.ndarray, tags: np.ndarray, lengths: np.ndarray, table: np.ndarray,
           max_false_halts: float, max_read: float,
           capped: Sequence[str] = CAPPED_MIXED) -> np.ndarray:
    """Each source's halts under the rule chosen on the other sources' scores."""
    out = np.full(len(labels), -1, dtype=np.int64)
    for tag in sorted(set(tags)):
        rest = tags != tag
        summary = grid_summary(labels[rest], tags[rest], lengths[rest], table[rest],
                               max_false_halts, max_read, capped)
        j, k, _ = choose_rule(summary)
        out[tags == tag] = table[tags == tag, j, k]
    return out
