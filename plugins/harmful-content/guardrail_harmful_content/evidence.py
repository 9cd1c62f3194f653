"""Streaming transforms of the head's prefix scores, read by the count rule in their place.

The count rule halts once ``k`` prefix scores reach a threshold: a prefix at 0.971 counts as much
as one at 0.9999, and a burst of a few tokens as much as a sustained run. A head's config may name
one transform (``score_transform``) that the monitor applies to the probabilities before the rule
sees them; each is causal (the value after token ``i`` reads tokens ``0..i`` only), so the rule
still halts at the token it fires on.

- ``ema``: the exponentially weighted mean of the prefix scores, weight ``2 ** (-(i - j) / h)`` on
  token ``j``, normalised so the weights sum to one (a short burst is damped, a sustained run is
  not).
- ``cusum``: cumulative evidence ``S_i = max(0, S_{i-1} + min(logit p_i, clip) - logit drift)``
  (a prefix far above the drift counts more than one just above it; evidence drains over benign
  stretches), emitted as ``S / (1 + S)`` so the value stays in ``[0, 1)``; a height ``h`` is the
  threshold ``h / (1 + h)`` with ``k = 1``.

``transform`` is the array form (the selection's), ``ScoreTransform`` the streaming one (the
monitor's); they agree to float64 rounding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["KINDS", "ScoreTransform", "check_spec", "cusum_threshold", "transform"]

KINDS = ("ema", "cusum")


def check_spec(spec: Any) -> dict[str, Any]:
    """``spec`` as a checked mapping (``ValueError`` naming the field otherwise)."""
    if not isinstance(spec, Mapping):
        raise ValueError(f"score_transform must be a mapping, got {spec!r}")
    kind = spec.get("kind")
    if kind == "ema":
        _positive(spec, "halflife")
        return {"kind": "ema", "halflife": float(spec["halflife"])}
    if kind == "cusum":
        drift = spec.get("drift")
        if not isinstance(drift, (int, float)) or isinstance(drift, bool) or not 0 < drift < 1:
            raise ValueError(f"score_transform.drift must be a probability in (0, 1), got "
                             f"{drift!r}")
        _positive(spec, "clip")
        return {"kind": "cusum", "drift": float(drift), "clip": float(spec["clip"])}
    raise ValueError(f"score_transform.kind must be one of {list(KINDS)}, got {kind!r}")


def _positive(spec: Mapping[str, Any], key: str) -> None:
    value = spec.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"score_transform.{key} must be a number > 0, got {value!r}")


def _logit(p: np.ndarray | float) -> Any:
    q = np.clip(p, 1e-12, 1 - 1e-12)
    return np.log(q) - np.log1p(-q)


def cusum_threshold(height: float) -> float:
    """The threshold on the emitted ``S / (1 + S)`` that a height ``h`` on ``S`` means."""
    return height / (1.0 + height)


def transform(scores: np.ndarray, spec: Mapping[str, Any]) -> np.ndarray:
    """The transformed values after every token of one answer's prefix scores (float64)."""
    spec = check_spec(spec)
    p = np.asarray(scores, dtype=np.float64)
    if p.size == 0:
        return p.copy()
    if spec["kind"] == "ema":
        d = 2.0 ** (-1.0 / spec["halflife"])
        out = np.empty_like(p)
        total = weight = 0.0
        for i, v in enumerate(p.tolist()):
            total = d * total + v
            weight = d * weight + 1.0
            out[i] = total / weight
        return out
    # Lindley's recursion in closed form: S_i = C_i - min(0, min_{j<=i} C_j), C the running sum
    steps = np.minimum(_logit(p), spec["clip"]) - float(_logit(spec["drift"]))
    c = np.cumsum(steps)
    s = np.maximum(c - np.minimum(0.0, np.minimum.accumulate(c)), 0.0)
    return s / (1.0 + s)


class ScoreTransform:
    """The streaming form of ``transform`` for one answer: ``update`` each prefix score in turn;
    ``truncate`` drops the values after a cut (a rolled-back stream)."""

    __slots__ = ("_history", "_spec", "_step")

    def __init__(self, spec: Mapping[str, Any]) -> None:
        self._spec = check_spec(spec)
        if self._spec["kind"] == "ema":
            self._step = 2.0 ** (-1.0 / self._spec["halflife"])
        else:
            self._step = float(_logit(self._spec["drift"]))
        # per token: (total, weight) for ema, (S, 0) for cusum
        self._history: list[tuple[float, float]] = []

    def update(self, p: float) -> float:
        last = self._history[-1] if self._history else (0.0, 0.0)
        if self._spec["kind"] == "ema":
            total, weight = self._step * last[0] + p, self._step * last[1] + 1.0
            self._history.append((total, weight))
            return total / weight
        q = min(max(p, 1e-12), 1 - 1e-12)
        s = max(0.0, last[0] + min(math.log(q) - math.log1p(-q), self._spec["clip"])
                - self._step)
        self._history.append((s, 0.0))
        return s / (1.0 + s)

    def truncate(self, n_tokens: int) -> None:
        del self._history[n_tokens:]
