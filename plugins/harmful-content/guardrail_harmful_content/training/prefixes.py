"""Partial outputs for training: truncated views of cached records.

SCM's sequence head is applied to every prefix while streaming but its loss only sees whole
responses. Training on prefixes as well teaches it what a partial answer looks like. The backbone
is causal, so a prefix's states are the first rows of the whole response's states: a view needs
no second observer pass. A prefix is harmful when it holds at least one token of a harmful span
(FineHarm's token labels), so a harmful answer's benign opening or disclaimer is labelled 0.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace

from guardrail.toolkit.features import CachedRecord

__all__ = ["prefix_view", "prefix_views"]


def prefix_view(record: CachedRecord, n: int) -> CachedRecord:
    """The first ``n`` tokens of ``record`` as a record of their own, labelled as above."""
    if not 1 <= n <= len(record):
        raise ValueError(f"prefix length {n} outside 1..{len(record)}")
    harmful = int(record.label or 0) == 1 and any(record.token_labels()[:n])
    end = int(record.offsets[n - 1, 1])
    return replace(record, response=record.response[:end], label=int(harmful),
                   offsets=record.offsets[:n], ids=record.ids[:n],
                   hidden={layer: h[:n] for layer, h in record.hidden.items()},
                   top_logits=None, top_ids=None, surprisal=None, entropy=None,
                   _derived={})


def prefix_views(records: Sequence[CachedRecord], per_record: int, seed: int
                 ) -> list[CachedRecord]:
    """``per_record`` prefixes of every record of 2+ tokens, cut at seeded random lengths."""
    rng = random.Random(seed)
    out: list[CachedRecord] = []
    for record in records:
        if len(record) < 2:
            continue
        for _ in range(per_record):
            out.append(prefix_view(record, rng.randint(1, len(record) - 1)))
    return out
