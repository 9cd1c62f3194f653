"""The seventh entity pass (issue 23): span features compared within the entity's kind
(docs/entity-hallucination.md, "Seventh pass").

- **Within-kind standardisation**: a feature read "in kind" is ``(x - mean_k) / std_k``, ``k``
  the finder's kind of the entity, ``mean_k`` and ``std_k`` over the *true* entities (label 0)
  of the training rows only, so a LOSO fold's statistics never see its held-out source. A kind
  with fewer than ``MIN_TRUE`` known values, and an entity of no kind, take the statistics of
  every true training entity.
- **Per-kind calibration**: the candidate fitted on each kind's entities alone, where the
  training rows hold at least ``MIN_FABRICATED`` fabricated entities of the kind and (for an
  ensemble) a source with both labels in it; any other kind is scored by the pooled fit.

Either way the fitted head is one ordinary span head per kind (``KindSpanProbe``): the
within-kind standardisation followed by the pooled one is one affine map per kind, folded into
that kind's feature mean and std, so each kind's head is an ``EntitySpanProbe``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from ..span_probe import ALL_FEATURES, KINDS, EntitySpanProbe
from .train_span import SpanRows

__all__ = ["MIN_FABRICATED", "MIN_TRUE", "KindSpanProbe", "KindStats", "calibrated_alone",
           "fit_kind_candidate", "in_kind_aucs", "kind_stats", "row_kinds", "within_kind_rows"]

MIN_TRUE = 10  # true entities of a kind with a known value, for its own mean and std
MIN_FABRICATED = 30  # fabricated entities of a kind, for its own calibration


@dataclasses.dataclass(frozen=True)
class KindStats:
    """Per kind, the mean and std of each feature in ``names`` over true training entities;
    ``pooled``: over every true training entity (the fallback)."""

    names: tuple[str, ...]
    per_kind: Mapping[str, tuple[np.ndarray, np.ndarray]]
    pooled: tuple[np.ndarray, np.ndarray]

    def of(self, kind: str | None) -> tuple[np.ndarray, np.ndarray]:
        return self.per_kind.get(kind or "", self.pooled)


def row_kinds(features: np.ndarray) -> np.ndarray:
    """The finder's kind of each row of raw span features (``ALL_FEATURES`` columns), from
    its ``kind_*`` columns; ``""`` for a row of no kind."""
    out = np.full(len(features), "", dtype=object)
    for kind in KINDS:
        out[features[:, ALL_FEATURES.index(f"kind_{kind}")] == 1.0] = kind
    return out


def _column(values: np.ndarray) -> tuple[int, float, float]:
    known = values[np.isfinite(values)]
    if not known.size:
        return 0, 0.0, 1.0
    std = float(known.std())
    return int(known.size), float(known.mean()), std if std > 1e-6 else 1.0


def kind_stats(rows: SpanRows, names: Sequence[str]) -> KindStats:
    """The within-kind statistics of ``names`` fitted on ``rows``' true entities only."""
    columns = [ALL_FEATURES.index(name) for name in names]
    true = rows.labels == 0
    x = rows.features[:, columns]
    pooled_parts = [_column(x[true, j]) for j in range(len(columns))]
    pooled = (np.array([p[1] for p in pooled_parts]), np.array([p[2] for p in pooled_parts]))
    kinds = row_kinds(rows.features)
    per_kind = {}
    for kind in KINDS:
        mean, std = pooled[0].copy(), pooled[1].copy()
        for j in range(len(columns)):
            count, m, s = _column(x[true & (kinds == kind), j])
            if count >= MIN_TRUE:
                mean[j], std[j] = m, s
        per_kind[kind] = (mean, std)
    return KindStats(tuple(names), per_kind, pooled)


def within_kind_rows(rows: SpanRows, stats: KindStats) -> SpanRows:
    """A copy of ``rows`` with ``stats.names`` standardised within each row's kind (unknown
    values stay unknown)."""
    features = rows.features.copy()
    kinds = row_kinds(rows.features)
    for n, kind in enumerate(kinds):
        mean, std = stats.of(kind)
        for j, name in enumerate(stats.names):
            k = ALL_FEATURES.index(name)
            features[n, k] = (features[n, k] - mean[j]) / std[j]
    return SpanRows(rows.states, features, rows.labels, rows.prev)


def _sigmoid(x: float) -> float:
    return 0.5 + 0.5 * math.tanh(0.5 * x)


@dataclasses.dataclass
class KindSpanProbe:
    """One span head per kind of entity (``heads``; ``fallback`` for any other kind): the
    monitor's interface of ``EntitySpanProbe``, each entity scored by its kind's head. Every
    head reads the same states with the same weights (the pass's candidates read none), so a
    token's state part is one number whatever the kind."""

    heads: dict[str, EntitySpanProbe]
    fallback: EntitySpanProbe
    threshold: float = 0.5
    unit: ClassVar[str] = "span"

    def __post_init__(self) -> None:
        width = self.fallback.hidden_size * len(self.fallback.state_blocks)
        states = self.fallback.head.numpy_parts(width)[0]
        for kind, head in self.heads.items():
            if head.state_blocks != self.fallback.state_blocks or not np.array_equal(
                    head.head.numpy_parts(width)[0], states):
                raise ValueError(f"the {kind} head reads other states than the fallback head")

    def head_for(self, kind: str) -> EntitySpanProbe:
        return self.heads.get(kind, self.fallback)

    @property
    def layers(self) -> tuple[int, ...]:
        return self.fallback.layers

    @property
    def hidden_size(self) -> int:
        return self.fallback.hidden_size

    @property
    def reads_stats(self) -> bool:
        return any(h.reads_stats for h in (self.fallback, *self.heads.values()))

    @property
    def token_needs(self) -> frozenset[str]:
        return frozenset().union(*(h.token_needs for h in (self.fallback,
                                                           *self.heads.values())))

    def token_dots(self, hidden: Mapping[int, np.ndarray]) -> tuple[list[float], list[float]]:
        return self.fallback.token_dots(hidden)

    def logit(self, dots: Sequence[float], surprisal: Sequence[float],
              entropy: Sequence[float], kind: str, prev: float | None = None,
              extras: Mapping[str, Sequence[float]] | None = None,
              prefix: float = math.nan) -> float:
        return self.head_for(kind).logit(dots, surprisal, entropy, kind, prev, extras, prefix)

    def score(self, dots: Sequence[float], surprisal: Sequence[float],
              entropy: Sequence[float], kind: str, prev: float | None = None,
              extras: Mapping[str, Sequence[float]] | None = None,
              prefix: float = math.nan) -> float:
        return _sigmoid(self.logit(dots, surprisal, entropy, kind, prev, extras, prefix))

    def row_logits(self, rows: SpanRows) -> np.ndarray:
        """The logit of each row of raw span features (``ALL_FEATURES`` columns) under its
        kind's head, as ``logit`` gives it for a head without state weights."""
        out = np.zeros(len(rows))
        kinds = row_kinds(rows.features)
        for kind in sorted(set(kinds.tolist())):
            head = self.head_for(kind)
            width = head.hidden_size * len(head.state_blocks)
            states, weights, bias = head.head.numpy_parts(width)
            if np.any(states):
                raise ValueError("row_logits needs heads without state weights")
            mask = kinds == kind
            x = rows.features[mask][:, [ALL_FEATURES.index(n) for n in head.features]]
            z = (x - head.mean.double().numpy()) / head.std.double().numpy()
            out[mask] = np.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0) @ np.asarray(
                weights) + bias
        return out


def fold_stats(probe: EntitySpanProbe, stats: KindStats, kind: str | None) -> EntitySpanProbe:
    """``probe`` (fitted on within-kind standardised features) as a head over the raw
    features of ``kind``: ``((x - m_k) / s_k - mean) / std == (x - (m_k + mean s_k)) /
    (std s_k)``."""
    kind_mean, kind_std = stats.of(kind)
    mean = probe.mean.double().numpy().copy()
    std = probe.std.double().numpy().copy()
    for j, name in enumerate(stats.names):
        k = probe.features.index(name)
        mean[k] = kind_mean[j] + mean[k] * kind_std[j]
        std[k] = std[k] * kind_std[j]
    return dataclasses.replace(probe, mean=torch.tensor(mean, dtype=torch.float32),
                               std=torch.tensor(std, dtype=torch.float32), config={})


def calibrated_alone(labels: np.ndarray, sources: Sequence[str], ensemble: bool) -> bool:
    """Whether a kind's training entities get their own fit: at least ``MIN_FABRICATED``
    fabricated and some true, and for an ensemble a source with both labels."""
    if int(labels.sum()) < MIN_FABRICATED or not (labels == 0).any():
        return False
    tags = np.asarray(sources)
    return not ensemble or any(len(set(labels[tags == t].tolist())) == 2 for t in set(sources))


def fit_kind_candidate(rows: SpanRows, candidate: Any, hidden_size: int,
                       sources: Sequence[str] | None = None) -> KindSpanProbe:
    """Fit a seventh-pass candidate (``combine.Candidate`` with ``within_kind`` or
    ``per_kind``) on ``rows`` as one span head per kind."""
    from .combine import fit_candidate, rows_subset

    base = dataclasses.replace(candidate, within_kind=(), per_kind=False)
    if candidate.within_kind and candidate.per_kind:
        raise ValueError(f"candidate {candidate.name!r}: within_kind or per_kind, not both")
    if candidate.within_kind:
        unread = set(candidate.within_kind) - set(candidate.features)
        if unread:
            raise ValueError(f"candidate {candidate.name!r}: within_kind {sorted(unread)} "
                             "are not among its features")
        stats = kind_stats(rows, candidate.within_kind)
        probe, _, _ = fit_candidate(within_kind_rows(rows, stats), base, hidden_size, sources)
        return KindSpanProbe({k: fold_stats(probe, stats, k) for k in KINDS},
                             fold_stats(probe, stats, None))
    pooled, _, _ = fit_candidate(rows, base, hidden_size, sources)
    kinds = row_kinds(rows.features)
    tags = list(sources) if sources is not None else [""] * len(rows)
    heads = {}
    for kind in KINDS:
        keep = np.flatnonzero(kinds == kind)
        part = [tags[i] for i in keep]
        if calibrated_alone(rows.labels[keep], part, base.ensemble):
            heads[kind] = fit_candidate(rows_subset(rows, keep), base, hidden_size,
                                        part if sources is not None else None)[0]
    return KindSpanProbe(heads, pooled)


def in_kind_aucs(result: Mapping[str, Any], rows: Mapping[str, Any]) -> dict[str, Any]:
    """Per held-out source and kind with both labels: entities, fabricated, span max
    surprisal's AUC and each candidate's out-of-fold entity AUC (``rows``: source -> the
    ``owned_rows`` the fold scored, in the order of its out-of-fold logits)."""
    from guardrail.toolkit.metrics import roc_auc

    column = ALL_FEATURES.index("surprisal_max")
    out: dict[str, Any] = {}
    for source in sorted(rows):
        features, labels = rows[source][0].features, rows[source][0].labels
        kinds = row_kinds(features)
        for kind in KINDS:
            mask = kinds == kind
            if len(set(labels[mask].tolist())) < 2:
                continue
            y = labels[mask].tolist()
            aucs: dict[str, float] = {}
            for name, cand in result["candidates"].items():
                oof = cand["oof"]
                logits = np.asarray(oof["logits"])[np.asarray(oof["sources"]) == source]
                aucs[name] = round(float(roc_auc(y, logits[mask].tolist())), 4)
            out.setdefault(source, {})[kind] = {
                "entities": int(mask.sum()), "fabricated": int(labels[mask].sum()),
                "surprisal_max": round(float(roc_auc(y, np.nan_to_num(
                    features[mask, column], nan=0.0).tolist())), 4), "candidates": aucs}
    return out
