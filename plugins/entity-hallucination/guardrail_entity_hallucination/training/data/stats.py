"""Counts for the manifest: records, spans and labels per split, kind, source, type and topic."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

from .records import Example

__all__ = ["split_counts"]


def _labels(examples: Sequence[Example]) -> dict[str, int]:
    c = Counter(s.label for ex in examples for s in ex.spans)
    return {"0": c[0], "1": c[1]}


def split_counts(examples: Sequence[Example]) -> dict[str, Any]:
    labels = _labels(examples)
    n_spans = labels["0"] + labels["1"]
    by: dict[str, dict[str, list[Example]]] = {"kind": defaultdict(list),
                                                "source": defaultdict(list)}
    span_types: dict[str, Counter[int]] = defaultdict(Counter)
    for ex in examples:
        by["kind"][str(ex.extra.get("kind", "?"))].append(ex)
        by["source"][ex.source].append(ex)
        for s in ex.spans:
            span_types[s.type][s.label] += 1
    return {
        "records": len(examples),
        "spans": n_spans,
        "labels": labels,
        "fabricated_share": round(labels["1"] / n_spans, 4) if n_spans else 0.0,
        "records_with_fabrication": sum(any(s.label for s in ex.spans) for ex in examples),
        "topics": len({ex.topic for ex in examples}),
        "by_kind": {k: {"records": len(v), "labels": _labels(v)}
                    for k, v in sorted(by["kind"].items())},
        "by_source": {k: {"records": len(v), "labels": _labels(v)}
                      for k, v in sorted(by["source"].items())},
        "by_span_type": {t: {"0": c[0], "1": c[1]} for t, c in sorted(span_types.items())},
        "by_topic": dict(sorted(Counter(ex.topic for ex in examples).items())),
    }
