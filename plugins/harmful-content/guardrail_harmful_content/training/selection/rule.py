"""Stage 4: the streaming count-k rule ``(threshold, k)`` chosen on out-of-source scores, one
rule for every source, under the caps (false halts per capped source, share read).

Rule families (``FAMILIES``): ``count`` on the prefix scores themselves; ``ema`` and ``cusum``,
the count rule on the scores after one of the runtime's transforms (``evidence.py``: the
exponentially weighted mean of the scores, or cumulative evidence above a drift). Each family
has a two-axis grid (``family_grid``) whose halt table ``family_halts`` gives, so
``grid_summary`` and ``choose_rule`` serve every family alike."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ...evidence import cusum_threshold, transform

__all__ = ["CAPPED_MIXED", "CUSUM_CLIP", "CUSUM_DRIFTS", "CUSUM_HEIGHTS", "EMA_HALFLIVES",
           "FAMILIES", "KS", "THRESHOLDS", "choose_rule", "family_grid", "family_halts",
           "grid_summary", "halts", "nested", "rule_of"]

# Fine steps above 0.9: a logistic fit's scores crowd there, and a coarse step lands the rule
# well inside a cap it could meet exactly.
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.905, 0.91, 0.915, 0.92, 0.925,
              0.93, 0.935, 0.94, 0.945, 0.95, 0.955, 0.96, 0.965, 0.97, 0.975, 0.98, 0.985,
              0.99, 0.995, 0.996, 0.997, 0.998, 0.9985, 0.999, 0.9995)
KS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 20, 24, 28, 32)
# Mixed sources whose benign records are capped too: topic-matched benign answers with clean
# labels, where pyrit's "harmless" responses are often compliant answers rated below 0.5.
CAPPED_MIXED = ("handwritten:",)

FAMILIES = ("count", "ema", "cusum")
EMA_HALFLIVES = (4.0, 8.0, 16.0)  # tokens; the family's parameter
CUSUM_DRIFTS = (0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995)
CUSUM_HEIGHTS = (0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0)  # logit units
CUSUM_CLIP = 8.0  # one prefix adds at most this much evidence


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


def family_grid(family: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The two axes of a family's grid: ``(thresholds, ks)`` for ``count`` and ``ema``,
    ``(drifts, heights)`` for ``cusum``."""
    if family in ("count", "ema"):
        return THRESHOLDS, tuple(float(k) for k in KS)
    if family == "cusum":
        return CUSUM_DRIFTS, CUSUM_HEIGHTS
    raise ValueError(f"rule family must be one of {FAMILIES}, got {family!r}")


def family_halts(scores: Sequence[np.ndarray], family: str, param: float | None = None
                 ) -> np.ndarray:
    """``(records, *family_grid(family))`` halt index (``-1``: no halt) of a family's rules:
    ``count`` as ``halts``; ``ema`` the count rule on the scores' weighted mean (half-life
    ``param``); ``cusum`` the first token whose evidence reaches each height, per drift."""
    if family == "count":
        return halts(scores, THRESHOLDS, KS)
    if family == "ema":
        if param is None:
            raise ValueError("the ema family needs its half-life")
        spec = {"kind": "ema", "halflife": float(param)}
        return halts([transform(s, spec) for s in scores], THRESHOLDS, KS)
    if family != "cusum":
        raise ValueError(f"rule family must be one of {FAMILIES}, got {family!r}")
    cuts = np.asarray([cusum_threshold(h) for h in CUSUM_HEIGHTS])
    out = np.full((len(scores), len(CUSUM_DRIFTS), len(CUSUM_HEIGHTS)), -1, dtype=np.int64)
    for j, drift in enumerate(CUSUM_DRIFTS):
        spec = {"kind": "cusum", "drift": drift, "clip": CUSUM_CLIP}
        for i, s in enumerate(scores):
            peak = np.maximum.accumulate(transform(s, spec))
            if peak.size == 0:
                continue
            first = np.searchsorted(peak, cuts, side="left")
            ok = first < peak.size
            out[i, j, ok] = first[ok]
    return out


def rule_of(family: str, param: float | None, j: int, k: int) -> dict[str, Any]:
    """The rule at grid indices ``(j, k)`` of a family: ``threshold``, ``k`` as the count rule
    reads them at runtime, and the ``score_transform`` (None for ``count``) the monitor applies
    first."""
    a, b = family_grid(family)
    if family == "count":
        return {"family": "count", "threshold": a[j], "k": int(b[k]), "score_transform": None}
    if family == "ema":
        return {"family": "ema", "threshold": a[j], "k": int(b[k]),
                "score_transform": {"kind": "ema", "halflife": float(param or 0.0)}}
    return {"family": "cusum", "threshold": cusum_threshold(b[k]), "k": 1, "height": b[k],
            "score_transform": {"kind": "cusum", "drift": a[j], "clip": CUSUM_CLIP}}


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
                 capped: Sequence[str] = CAPPED_MIXED,
                 objective: Sequence[str] | None = None,
                 groups: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Per rule in the grid: mean macro-F1 over harmful sources (those named in ``objective``
    only, when given: a pass that compares pools keeps one set of sources), the worst capped
    source's false-halt rate (benign-only sources, and the benign records of sources whose tag
    starts with one of ``capped``; every capped source, whatever ``objective`` says), pooled
    fraction read and pooled macro-F1. ``groups`` (name -> mask over the records, e.g.
    ``groups.harmful_prompt_groups``) are capped too, each pooled over its sources: their
    false-halt rates are ``group:NAME``, the worst ``worst_group_fhr``."""
    grid = table.shape[1:]
    harmful_tags = sorted({t for t, y in zip(tags, labels, strict=True) if y == 1})
    benign_tags = sorted(set(tags) - set(harmful_tags)) + [
        t for t in harmful_tags if t.startswith(tuple(capped))]
    fired = table >= 0
    mean_f1 = np.zeros(grid)
    scored = [t for t in harmful_tags if objective is None or t in set(objective)]
    for tag in scored:
        sel = tags == tag
        mean_f1 += _macro_f1(fired[sel], labels[sel] == 1)
    mean_f1 /= max(1, len(scored))
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
    out = {"mean_f1": mean_f1, "worst_fhr": worst_fhr, "read": read, "pooled": pooled}
    worst_group = np.zeros(grid)
    for name, mask in (groups or {}).items():
        rate = fired[mask].mean(0) if mask.any() else np.zeros(grid)
        out[f"group:{name}"] = rate
        worst_group = np.maximum(worst_group, rate)
    out["worst_group_fhr"] = worst_group
    out["ok"] = ok & (worst_group <= max_false_halts)
    return out


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
           capped: Sequence[str] = CAPPED_MIXED,
           objective: Sequence[str] | None = None,
           groups: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
    """Each source's halts under the rule chosen on the other sources' scores (and the
    ``groups``' records of the other sources)."""
    out = np.full(len(labels), -1, dtype=np.int64)
    for tag in sorted(set(tags)):
        rest = tags != tag
        summary = grid_summary(labels[rest], tags[rest], lengths[rest], table[rest],
                               max_false_halts, max_read, capped, objective,
                               {k: v[rest] for k, v in (groups or {}).items()})
        j, k, _ = choose_rule(summary)
        out[tags == tag] = table[tags == tag, j, k]
    return out
