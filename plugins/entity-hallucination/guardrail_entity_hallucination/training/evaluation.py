"""Metrics of the entity probe and its baselines on cached features (the paper's three levels).

For any per-token scorer: ``span_auc`` (each labelled span scored by the max, or mean, of its
tokens' scores, against the span's label: the paper's span-max), ``token_auc`` (every token, those
in a span taking its label and the rest 0, as ``guardrail eval`` counts), ``span_token_auc``
(tokens inside spans only) and ``recall_at_10fpr`` (span level). Baselines read the observer's
own surprisal (negative log-probability of the token) and entropy of the distribution it came
from; the first response token has neither and is left out of every scorer's numbers.

A span head (``span_probe``) is scored as the monitor scores it: the entities the monitor's finder
sees in the whole response (``find_entities(response, final=True)``), each scored as a unit, and
every token of an entity given the entity's score; tokens outside them have no score. A head with
``prev`` blocks reads the token before the entity's first member (none for an entity that starts
the response). A labelled span's score is then the max over its tokens, as for any scorer.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from guardrail.probes.arrays import float32_rows
from guardrail.toolkit.features import CachedRecord
from guardrail.toolkit.metrics import recall_at_fpr, roc_auc, roc_curve

from ..probe import AnyEntityProbe
from ..span_probe import EntitySpanProbe, prefix_surprisal, span_members
from ..spans import EntitySpan, find_entities
from .logit_stats import record_extras

if TYPE_CHECKING:
    from .kinds import KindSpanProbe

__all__ = ["BASELINES", "Scorers", "TokenScorer", "entity_tokens_only", "evaluate_by_type",
           "evaluate_records", "probe_scorer", "roc_points", "score_tokens", "span_auc",
           "span_probe_scorer", "span_scores", "span_types", "stat_scorer", "type_prior",
           "within_type"]

TokenScorer = Callable[[CachedRecord], list[float]]
"""Per-token scores of one cached record (``nan``: no score)."""

BASELINES = ("surprisal", "entropy")


def span_probe_scorer(probe: EntitySpanProbe | KindSpanProbe,
                      finder: Callable[[str], Sequence[EntitySpan]] | None = None) -> TokenScorer:
    """Per-token scores of a span head, the monitor's way (see the module docstring);
    ``finder``: the entities of a whole response (default: ``find_entities(text, final=True)``;
    another finder, to compare finders under one head)."""
    def score(record: CachedRecord) -> list[float]:
        for layer in probe.layers:
            if layer not in record.hidden:
                raise KeyError(f"record {record.index} has no cached layer {layer}")
        if probe.reads_stats and (record.surprisal is None or record.entropy is None):
            raise ValueError("this span head reads surprisal and entropy: extract features "
                             "with stats=True")
        values = [math.nan] * len(record)
        spans = (finder(record.response) if finder is not None
                 else find_entities(record.response, 0, final=True))
        members = span_members(record.offsets.tolist(), spans)
        if not any(members):
            return values
        dots, prevs = probe.token_dots({layer: float32_rows(record.hidden[layer])
                                        for layer in probe.layers})
        nan = [math.nan] * len(record)
        surprisal = record.surprisal.tolist() if record.surprisal is not None else nan
        entropy = record.entropy.tolist() if record.entropy is not None else nan
        extras = record_extras(record)
        needs = probe.token_needs
        missing = needs - set(extras) - {"prefix"}
        if missing:
            raise ValueError(f"this span head reads {sorted(missing)}: attach the records' "
                             "logit statistics (logit_stats.attach)")
        for span, rows in zip(spans, members, strict=True):
            if not rows:
                continue
            value = probe.score([dots[i] for i in rows], [surprisal[i] for i in rows],
                                [entropy[i] for i in rows], span.kind,
                                prevs[rows[0] - 1] if rows[0] > 0 else None,
                                {k: [v[i] for i in rows] for k, v in extras.items()},
                                prefix_surprisal(surprisal, rows[0]) if "prefix" in needs
                                else float("nan"))
            for i in rows:
                values[i] = value
        if record.surprisal is not None and len(record) and math.isnan(float(record.surprisal[0])):
            values[0] = math.nan  # the first token is left out for every scorer alike
        return values

    return score


def probe_scorer(probe: AnyEntityProbe) -> TokenScorer:
    """Per-token scores of a token probe, or of a span head (``span_probe_scorer``)."""
    if isinstance(probe, EntitySpanProbe):
        return span_probe_scorer(probe)

    def score(record: CachedRecord) -> list[float]:
        if probe.layer not in record.hidden:
            raise KeyError(f"record {record.index} has no cached layer {probe.layer}")
        extras = None
        if probe.features:
            if record.surprisal is None or record.entropy is None:
                raise ValueError("this probe reads surprisal and entropy: extract features "
                                 "with stats=True")
            extras = {"surprisal": record.surprisal, "entropy": record.entropy}
        values = probe.score(record.hidden[probe.layer].float(), extras).tolist()
        if record.surprisal is not None and len(record) and math.isnan(float(record.surprisal[0])):
            values[0] = math.nan  # the first token is left out for every scorer alike
        return [float(v) for v in values]

    return score


def entity_tokens_only(scorer: TokenScorer) -> TokenScorer:
    """``scorer`` with the tokens outside the monitor's entities left unscored: a token probe
    scored on the tokens the monitor hands out (``find_entities(response, final=True)``)."""
    def score(record: CachedRecord) -> list[float]:
        values = scorer(record)
        members = span_members(record.offsets.tolist(),
                               find_entities(record.response, 0, final=True))
        keep = {i for rows in members for i in rows}
        return [v if i in keep else math.nan for i, v in enumerate(values)]

    return score


def stat_scorer(name: str) -> TokenScorer:
    def score(record: CachedRecord) -> list[float]:
        value = getattr(record, name)
        if value is None:
            raise ValueError(f"the {name} baseline needs features extracted with stats=True")
        return [float(v) for v in value.tolist()]

    return score


def score_tokens(scorer: TokenScorer, records: Sequence[CachedRecord]) -> list[list[float]]:
    return [scorer(r) for r in records]


def span_auc(records: Sequence[CachedRecord], scorer: TokenScorer) -> float | None:
    """Span-max ROC AUC of ``scorer`` over the labelled spans of ``records`` (None when it is
    undefined, e.g. one label only)."""
    labels, scores, _ = span_scores(records, score_tokens(scorer, records), "max")
    try:
        value = float(roc_auc(labels, scores))
    except (ValueError, ZeroDivisionError):
        return None
    return None if math.isnan(value) else value


def span_scores(records: Sequence[CachedRecord], token_scores: Sequence[Sequence[float]],
                reduce: str = "max") -> tuple[list[int], list[float], list[int]]:
    """(labels, scores, record index) of each labelled span with at least one scored token."""
    labels: list[int] = []
    scores: list[float] = []
    owners: list[int] = []
    for n, (record, values) in enumerate(zip(records, token_scores, strict=True)):
        ids = record.token_span_ids()
        for k, span in enumerate(record.spans):
            inside = [v for v, sid in zip(values, ids, strict=True)
                      if sid == k and not math.isnan(v)]
            if not inside:
                continue
            labels.append(int(span.label))
            scores.append(max(inside) if reduce == "max" else sum(inside) / len(inside))
            owners.append(n)
    return labels, scores, owners


def _safe(fn: Callable[..., float], *args: Any) -> float | None:
    try:
        value = float(fn(*args))
    except (ValueError, ZeroDivisionError):
        return None
    return None if math.isnan(value) else round(value, 4)


def _metrics(records: Sequence[CachedRecord], values: Sequence[Sequence[float]],
             reduce: str) -> dict[str, Any]:
    labels, scores, _ = span_scores(records, values, reduce)
    tok_labels: list[int] = []
    tok_scores: list[float] = []
    in_labels: list[int] = []
    in_scores: list[float] = []
    for record, row in zip(records, values, strict=True):
        ids = record.token_span_ids()
        for y, v, sid in zip(record.token_labels(0), row, ids, strict=True):
            if math.isnan(v):
                continue
            tok_labels.append(y)
            tok_scores.append(v)
            if sid >= 0:
                in_labels.append(y)
                in_scores.append(v)
    return {
        "span_auc": _safe(roc_auc, labels, scores),
        "token_auc": _safe(roc_auc, tok_labels, tok_scores),
        "span_token_auc": _safe(roc_auc, in_labels, in_scores),
        "recall_at_10fpr": _safe(recall_at_fpr, labels, scores, 0.1),
        "spans": len(labels),
        "fabricated_spans": sum(labels),
    }


Scorers = Mapping[str, tuple[TokenScorer, str]]
"""Named token scorers, each with its span reduction (``max`` or ``mean``)."""


def _scorers(probe: AnyEntityProbe, extra: Scorers | None = None
             ) -> dict[str, tuple[TokenScorer, str]]:
    scorers: dict[str, tuple[TokenScorer, str]] = {"probe": (probe_scorer(probe), "max")}
    scorers.update(extra or {})
    for name in BASELINES:
        scorers[f"{name}_max"] = (stat_scorer(name), "max")
        scorers[f"{name}_mean"] = (stat_scorer(name), "mean")
    return scorers


def span_types(data_file: Path) -> list[list[str]]:
    """The fact type of each span of each record of a JSON Lines file (the feature cache keeps
    spans without their type); ``"?"`` where a span has none."""
    out = []
    for line in data_file.read_text(encoding="utf-8").splitlines():
        if line.strip():
            out.append([str(s.get("type", "?")) for s in json.loads(line).get("spans") or []])
    return out


def type_prior(train_file: Path, test_file: Path) -> dict[str, Any]:
    """A baseline that reads no model: each test span scored by the share of wrong spans of its
    fact type in ``train_file`` (the pooled share for a type training never saw). It measures
    how much of a pooled AUC the mix of types alone gives."""
    counts: dict[str, list[int]] = {}
    for line in train_file.read_text(encoding="utf-8").splitlines():
        for span in json.loads(line).get("spans") or [] if line.strip() else []:
            row = counts.setdefault(str(span.get("type", "?")), [0, 0])
            row[0] += 1
            row[1] += int(span["label"])
    total = sum(n for n, _ in counts.values())
    pooled = sum(w for _, w in counts.values()) / total if total else 0.5
    labels: list[int] = []
    scores: list[float] = []
    for line in test_file.read_text(encoding="utf-8").splitlines():
        for span in json.loads(line).get("spans") or [] if line.strip() else []:
            n, w = counts.get(str(span.get("type", "?")), (0, 0))
            labels.append(int(span["label"]))
            scores.append(w / n if n else pooled)
    return {"span_auc": _safe(roc_auc, labels, scores),
            "recall_at_10fpr": _safe(recall_at_fpr, labels, scores, 0.1),
            "spans": len(labels), "fabricated_spans": sum(labels)}


def evaluate_by_type(probe: AnyEntityProbe, records: Sequence[CachedRecord],
                     types: Sequence[Sequence[str]], min_spans: int = 1,
                     extra: Scorers | None = None) -> dict[str, Any]:
    """Span metrics of the probe, the ``extra`` scorers and the baselines per fact type: each
    type's spans alone (the other spans of a record are left out); ``types[i]`` lists record
    ``i``'s span types. Types with fewer than ``min_spans`` spans are skipped."""
    if len(types) != len(records):
        raise ValueError(f"{len(types)} type lists for {len(records)} records")
    scorers = _scorers(probe, extra)
    cache = {name: score_tokens(fn, records) for name, (fn, _) in scorers.items()}
    out: dict[str, Any] = {}
    for kind in sorted({t for row in types for t in row}):
        subset, rows = [], []
        for n, (record, row) in enumerate(zip(records, types, strict=True)):
            if len(row) != len(record.spans):
                raise ValueError(f"record {n}: {len(row)} span types for {len(record.spans)} "
                                 "spans")
            keep = tuple(s for s, t in zip(record.spans, row, strict=True) if t == kind)
            if keep:
                subset.append(dataclasses.replace(record, spans=keep, _derived={}))
                rows.append(n)
        spans = sum(len(r.spans) for r in subset)
        if spans < min_spans:
            continue
        out[kind] = {name: {k: v for k, v in _metrics(subset, [cache[name][n] for n in rows],
                                                       reduce).items()
                            if k in ("span_auc", "recall_at_10fpr", "spans", "fabricated_spans")}
                     for name, (_, reduce) in scorers.items()}
    return out


def within_type(by_type: Mapping[str, Any], min_each: int = 5) -> dict[str, Any]:
    """Per scorer, the span-weighted mean of the per-type span AUCs (``evaluate_by_type``) over
    the types with at least ``min_each`` spans of each label: how well a scorer ranks wrong
    against right values of the same type, which a type's base rate cannot do."""
    kept = {t: b for t, b in by_type.items()
            if min(b["probe"]["fabricated_spans"],
                   b["probe"]["spans"] - b["probe"]["fabricated_spans"]) >= min_each}
    out: dict[str, Any] = {"types": sorted(kept), "min_each": min_each}
    if not kept:
        return out
    for name in next(iter(kept.values())):
        pairs = [(b[name]["spans"], b[name]["span_auc"]) for b in kept.values()
                 if b[name]["span_auc"] is not None]
        weight = sum(n for n, _ in pairs)
        out[name] = round(sum(n * a for n, a in pairs) / weight, 4) if weight else None
    return out


def evaluate_records(probe: AnyEntityProbe, records: Sequence[CachedRecord],
                     by: str | None = "kind", extra: Scorers | None = None) -> dict[str, Any]:
    """Metrics of the probe (span max), the ``extra`` scorers (e.g. another probe to compare)
    and the baselines (span max and mean) on ``records``; with ``by``, also per value of
    ``record.extra[by]`` (long-form texts vs garak claims)."""
    scorers = _scorers(probe, extra)
    cache = {name: score_tokens(fn, records) for name, (fn, _) in scorers.items()}
    out: dict[str, Any] = {"records": len(records),
                           "all": {name: _metrics(records, cache[name], reduce)
                                   for name, (_, reduce) in scorers.items()}}
    if by is not None:
        groups = sorted({str(r.extra.get(by)) for r in records})
        if len(groups) > 1:
            out["by_" + by] = {}
            for g in groups:
                rows = [n for n, r in enumerate(records) if str(r.extra.get(by)) == g]
                subset = [records[n] for n in rows]
                out["by_" + by][g] = {
                    "records": len(subset),
                    **{name: _metrics(subset, [cache[name][n] for n in rows], reduce)
                       for name, (_, reduce) in scorers.items()}}
    return out


def roc_points(records: Sequence[CachedRecord], scorers: Mapping[str, TokenScorer]
               ) -> dict[str, tuple[list[float], list[float]]]:
    """Span-max ROC curve (FPR, TPR) of each scorer, for plots."""
    curves = {}
    for name, fn in scorers.items():
        labels, scores, _ = span_scores(records, score_tokens(fn, records), "max")
        fpr, tpr, _ = roc_curve(labels, scores)
        curves[name] = ([float(x) for x in fpr], [float(x) for x in tpr])
    return curves
