"""Stage 2: the pool's records as the data build holds them (its splits, its relabels)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..context import context_key, record_conversation
from ..pooled import PoolRecord

__all__ = ["reconcile"]

Key = tuple[str, str]  # (the context's key, context.context_key; the response)
Where = tuple[str, str, int]  # (split, source tag, label)


def _index(build: Path) -> tuple[dict[Key, Where], dict[Key, list[dict[str, Any]]]]:
    """Every record of ``build`` by (its context's key, its response), and the spans of the
    relabelled ones."""
    from ..loso import read_pool_records

    where: dict[Key, Where] = {}
    relabelled: dict[Key, list[dict[str, Any]]] = {}
    for row in read_pool_records(build):
        key = (context_key(record_conversation(row)), row["response"])
        where[key] = (row["split"], row["source_tag"], int(row["label"]))
        if row.get("relabel"):
            relabelled[key] = list(row.get("spans") or [])
    return where, relabelled


def _relabel(r: PoolRecord, label: int, spans: Sequence[dict[str, Any]]) -> None:
    """Give ``r`` the build's label, its first harmful token from the build's spans."""
    from guardrail.toolkit.features import token_labels
    from guardrail.toolkit.records import SpanLabel

    r.label = label
    r.first_harm = None
    if r.label == 1:
        labs = token_labels(np.asarray(r.extra["offsets"]).tolist(),
                            [SpanLabel(int(s["start"]), int(s["end"]), 1) for s in spans])
        r.first_harm = next((j for j, v in enumerate(labs) if v == 1), 0)


def reconcile(records: Sequence[PoolRecord], build: Path) -> list[PoolRecord]:
    """The records of ``records`` that ``build`` holds (a pool part read before a source's file
    was final can hold answers since dropped or edited), each with its split in ``build``; a
    record cut for the pool is found by its response's opening. A record the build relabelled
    (``data/relabel.py``) takes the build's label, its first harmful token from the build's
    spans. Records of a source the build does not hold at all (a set read as a part of its
    own) are kept as they are."""
    where, relabelled = _index(build)
    by_context: dict[str, list[tuple[str, Where]]] = {}
    for (context, response), value in where.items():
        by_context.setdefault(context, []).append((response, value))
    tags = {v[1] for v in where.values()}
    out = []
    for r in records:
        if r.tag not in tags:
            out.append(r)
            continue
        context, response = r.extra["key"]
        full: str | None = response if (context, response) in where else next(
            (f for f, _ in by_context.get(context, []) if f.startswith(response)), None)
        found = None if full is None else where[(context, full)]
        if found is None or found[1] != r.tag:
            continue
        if found[2] != r.label:
            assert full is not None
            if (context, full) not in relabelled or "offsets" not in r.extra:
                continue
            _relabel(r, found[2], relabelled[(context, full)])
        r.split = found[0]
        out.append(r)
    return out
