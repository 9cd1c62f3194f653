"""Stage 1: the pool's records with the observer's cached states (a finished
``extract_features`` folder, the shards of a cut run, or a fresh read with SmolLM2)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...pooling import normalise_tokens
from ..context import context_key, record_conversation
from ..pooled import PoolRecord

__all__ = ["extract", "load_parts", "load_pool", "normalise_records"]


def _first_harm(row: dict[str, Any], offsets: np.ndarray) -> int | None:
    """The first token of a harmful record inside its spans (0 without spans); None if benign."""
    from guardrail.toolkit.features import token_labels
    from guardrail.toolkit.records import SpanLabel

    if int(row["label"]) != 1:
        return None
    spans = [SpanLabel(int(s["start"]), int(s["end"]), int(s.get("label", 1)))
             for s in row.get("spans") or []]
    labs = token_labels(offsets.tolist(), spans)
    return next((j for j, v in enumerate(labs) if v == 1), 0)


def load_pool(pool: Path, features: Path, layers: Sequence[int]) -> list[PoolRecord]:
    """The pool's records with their cached states: a finished ``extract_features`` folder, or
    the shards a cut run left (the records of whole shards only). Each record's
    ``extra["key"]`` is (its context's ``context_key``: the prompt, or the conversation as JSON;
    its response)."""
    from safetensors.numpy import load_file

    rows = [json.loads(x) for x in pool.read_text(encoding="utf-8").splitlines() if x.strip()]
    out: list[PoolRecord] = []
    for shard in sorted(features.glob("shard-*.safetensors")):
        tensors = load_file(str(shard))
        indices = sorted({int(k.split("/")[0]) for k in tensors})
        for i in indices:
            if i >= len(rows):  # a run over a longer file: its tail is another part's
                continue
            row = rows[i]
            hidden = {layer: tensors[f"{i}/hidden.{layer}"] for layer in layers}
            if next(iter(hidden.values())).shape[0] == 0:
                continue
            offsets = tensors[f"{i}/offsets"]
            out.append(PoolRecord(str(row["source_tag"]), int(row["label"]), hidden,
                                  _first_harm(row, offsets),
                                  str(row.get("split", "")), str(row.get("kind", "")),
                                  {"index": i, "key": (context_key(record_conversation(row)),
                                                       str(row["response"])),
                                   "offsets": offsets}))
    return out


def extract(pool: Path, layers: Sequence[int]) -> Path:
    """Read a pool part with the embedded SmolLM2 once (``extract_features`` cache); the
    cache folder."""
    from guardrail.toolkit.features import extract_features
    from guardrail.toolkit.sources import cache_dir

    from ..train import load_observer

    work = cache_dir() / "harmful-content" / "features"
    found = extract_features(load_observer(None), pool, work, layers, dtype="float16",
                             chunk_size=512)
    if found.path is None:
        raise FileNotFoundError(f"no feature cache for {pool} in {work}")
    return found.path


def load_parts(pools: Sequence[Path], features: Sequence[Path], layers: Sequence[int]
               ) -> list[PoolRecord]:
    """``load_pool`` of each (pool part, feature folder) pair, concatenated."""
    return [r for pool, folder in zip(pools, features, strict=True)
            for r in load_pool(pool, folder, layers)]


def normalise_records(records: Sequence[PoolRecord], token_norm: str) -> None:
    """Normalise every record's states token by token (``pooling.normalise_tokens``, as the
    monitor does for a head whose config names ``token_norm``), in place, keeping each array's
    dtype (the float16 caches stay float16: the pool is read into memory whole)."""
    if token_norm == "none":
        normalise_tokens(np.zeros((1, 1)), token_norm)  # still names a bad value
        return
    for r in records:
        r.hidden = {layer: normalise_tokens(h, token_norm).astype(h.dtype)
                    for layer, h in r.hidden.items()}
