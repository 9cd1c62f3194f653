"""The span head: one score per entity the monitor finds, from the mean of its tokens' states and
a few statistics of their surprisal and entropy, instead of one score per token.

Why: the monitor already waits until an entity (``spans.find_entities``) can no longer change
before it hands out its tokens' scores, so scoring the entity as a whole costs no latency; and
a logistic regression on the span's mean state ranks fabricated entities better than the max of a
token probe's scores (docs/entity-hallucination.md).

The logit of a span with member tokens ``T`` (the tokens that overlap it) is::

    mean_{t in T}(w . h_t) + b + sum_k v_k * (f_k - mean_k) / std_k

``h_t`` is token ``t``'s state on ``layer``, ``w`` the state weights with the training
standardisation folded in (so the monitor keeps one dot product per token, not its state), and
``f`` the span features of ``SPAN_FEATURES``: max, mean and first value of the members'
surprisal and entropy (unknown values, e.g. the first response token's surprisal, are skipped; a
span with none takes the training mean), the log of the member count and a one-hot of the span's
kind. Every member token gets the span's score.

On disk it is a ``LinearProbe`` over ``hidden_size + len(features)`` inputs (``guardrail.probes.io``
safetensors + JSON); the JSON says ``"unit": "span"`` and holds the feature names with their
training mean and std under ``span_features``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from guardrail.probes.heads import LinearProbe
from guardrail.probes.io import LoadedProbe, ProbeFileError, save_probe

from .spans import EntitySpan

__all__ = ["KINDS", "SPAN_FEATURES", "EntitySpanProbe", "save_span_probe", "span_features",
           "span_from_loaded", "span_members"]

KINDS = ("NAME", "NUMBER", "DATE")
SPAN_FEATURES = ("surprisal_max", "surprisal_mean", "surprisal_first", "entropy_max",
                 "entropy_mean", "entropy_first", "log_tokens",
                 *(f"kind_{k}" for k in KINDS))
STATS = ("surprisal", "entropy")


def span_features(surprisal: Sequence[float], entropy: Sequence[float], kind: str
                  ) -> dict[str, float]:
    """The raw span features of one span from its member tokens' surprisal and entropy (NaN:
    unknown, skipped; all unknown gives NaN, which standardises to 0)."""
    out: dict[str, float] = {}
    for name, values in (("surprisal", surprisal), ("entropy", entropy)):
        known = [float(v) for v in values if math.isfinite(v)]
        out[f"{name}_max"] = max(known) if known else math.nan
        out[f"{name}_mean"] = math.fsum(known) / len(known) if known else math.nan
        out[f"{name}_first"] = float(values[0]) if len(values) else math.nan
    out["log_tokens"] = math.log(max(1, len(surprisal)))
    for k in KINDS:
        out[f"kind_{k}"] = float(kind == k)
    return out


def span_members(offsets: Sequence[Sequence[int]], spans: Sequence[EntitySpan]
                 ) -> list[list[int]]:
    """The token indices of each span, as the monitor assigns them: walking the tokens in order,
    a token belongs to the first span it overlaps that no earlier token closed (a token that
    overlaps two spans counts for the first only)."""
    members: list[list[int]] = [[] for _ in spans]
    k = 0
    i = 0
    n = len(offsets)
    while i < n:
        start, end = int(offsets[i][0]), int(offsets[i][1])
        while k < len(spans) and spans[k].end <= start:
            k += 1
        if k >= len(spans):
            break
        span = spans[k]
        if span.start >= end:
            i += 1
            continue
        while i < n and int(offsets[i][0]) < span.end:
            members[k].append(i)
            i += 1
        k += 1
    return members


def _sigmoid(x: float) -> float:
    return 0.5 + 0.5 * math.tanh(0.5 * x)


@dataclass
class EntitySpanProbe:
    """A span head: folded state weights and span-feature weights in one ``LinearProbe``
    (``hidden_size + len(features)`` inputs), the layer it reads and the threshold."""

    head: LinearProbe
    layer: int
    threshold: float
    features: tuple[str, ...] = SPAN_FEATURES
    mean: torch.Tensor = field(default_factory=lambda: torch.zeros(len(SPAN_FEATURES)))
    std: torch.Tensor = field(default_factory=lambda: torch.ones(len(SPAN_FEATURES)))
    config: dict[str, Any] = field(default_factory=dict)
    unit: ClassVar[str] = "span"

    @property
    def hidden_size(self) -> int:
        return self.head.hidden_size - len(self.features)

    @property
    def reads_stats(self) -> bool:
        """Whether any feature reads surprisal or entropy (the monitor then needs logits)."""
        return any(name.split("_")[0] in STATS for name in self.features)

    @cached_property
    def _weights(self) -> tuple[np.ndarray, list[float], float, list[float], list[float]]:
        return (*self.head.numpy_parts(self.hidden_size), self.mean.tolist(), self.std.tolist())

    def dots(self, hidden: np.ndarray) -> list[float]:
        """Each state's share of a span logit, ``w . h`` for float32 rows ``(n, H)``."""
        return [float(v) for v in (hidden @ self._weights[0]).tolist()]

    def logit(self, dots: Sequence[float], surprisal: Sequence[float],
              entropy: Sequence[float], kind: str) -> float:
        """The span's logit from its members' dot products (``dots``) and their surprisal and
        entropy (as many values as ``dots``)."""
        if not dots:
            raise ValueError("a span needs at least one token with a state")
        _, w_features, bias, mean, std = self._weights
        value = math.fsum(dots) / len(dots) + bias
        raw = span_features(surprisal, entropy, kind)
        for k, name in enumerate(self.features):
            z = (raw[name] - mean[k]) / std[k]
            if math.isfinite(z):  # NaN (unknown): the training mean, 0
                value += w_features[k] * z
        return value

    def score(self, dots: Sequence[float], surprisal: Sequence[float],
              entropy: Sequence[float], kind: str) -> float:
        """The span's sigmoid score (see ``logit``)."""
        return _sigmoid(self.logit(dots, surprisal, entropy, kind))


def save_span_probe(probe: EntitySpanProbe, weights: Path, config: Mapping[str, Any]) -> Path:
    """Write the span head as ``weights`` (.safetensors) with its .json beside it."""
    document = {
        "unit": "span", "layer": probe.layer, "threshold": probe.threshold,
        "rule": {"kind": "span_max"}, "hidden_size": probe.hidden_size,
        "span_features": {"names": list(probe.features), "mean": probe.mean.tolist(),
                          "std": probe.std.tolist()},
        **config,
    }
    return save_probe(weights.parent, probe.head, document, name=weights.stem)


def span_from_loaded(loaded: LoadedProbe) -> EntitySpanProbe:
    """An ``EntitySpanProbe`` from a loaded ``"unit": "span"`` file, checking its keys."""
    where = loaded.path.with_suffix(".json")
    config = loaded.config
    if not isinstance(loaded.head, LinearProbe):
        raise ProbeFileError(f"{where}: key 'head': a span head is a linear head, this is a "
                             f"{loaded.head.kind!r} head")
    if loaded.layer is None:
        raise ProbeFileError(f"{where}: key 'layer' is missing")
    block = config.get("span_features")
    if not isinstance(block, dict) or not isinstance(block.get("names"), list):
        raise ProbeFileError(f"{where}: key 'span_features.names' is missing (a span head lists "
                             f"its features; known: {list(SPAN_FEATURES)})")
    names = tuple(str(n) for n in block["names"])
    unknown = [n for n in names if n not in SPAN_FEATURES]
    if unknown:
        raise ProbeFileError(f"{where}: key 'span_features.names' has {unknown}; known: "
                             f"{list(SPAN_FEATURES)}")
    stats = {}
    for key in ("mean", "std"):
        values = block.get(key)
        if not isinstance(values, list) or len(values) != len(names) or not all(
                isinstance(v, (int, float)) for v in values):
            raise ProbeFileError(f"{where}: key 'span_features.{key}' needs one number per name "
                                 f"in 'span_features.names' ({len(names)})")
        stats[key] = torch.tensor(values, dtype=torch.float32)
    width = loaded.head.hidden_size - len(names)
    declared = config.get("hidden_size")
    if declared is not None and int(declared) != width:
        raise ProbeFileError(f"{where}: key 'hidden_size' says {declared}, but the head reads "
                             f"{loaded.head.hidden_size} inputs for {len(names)} span features, "
                             f"i.e. states of width {width}")
    if width <= 0:
        raise ProbeFileError(f"{where}: key 'head.hidden_size' ({loaded.head.hidden_size}) "
                             f"leaves no room for states beside {len(names)} span features")
    threshold = loaded.threshold if loaded.threshold is not None else 0.5
    return EntitySpanProbe(loaded.head, loaded.layer, threshold, names, stats["mean"],
                           stats["std"].clamp(min=1e-6), dict(config))
