"""The observer's logit statistics (``logit_stats.token_stats``) cached over a JSON Lines file,
for the LOSO candidates that read them: ``cache_logit_stats`` runs the observer as
``extract_features`` does (prompt as a user message, response in chunks of 64) and caches the
rows per record; ``attach`` puts them on cached records, ``record_extras`` reads them back."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..logit_stats import TOKEN_STATS, entity_vocab, token_stats
from ..span_probe import TOKEN_EXTRAS

__all__ = ["attach", "cache_logit_stats", "record_extras"]

_EXTRAS = ("margin", "rank", "top_entity")  # span_probe.TOKEN_EXTRAS
_VERSION = 1


def attach(records: Sequence[Any], arrays: Sequence[np.ndarray]) -> None:
    """Put each record's ``cache_logit_stats`` rows in ``extra["token_stats"]`` (the extras
    ``span_rows`` and ``span_probe_scorer`` read), checking they cover its tokens."""
    if len(records) != len(arrays):
        raise ValueError(f"{len(arrays)} rows of logit statistics for {len(records)} records")
    for record, rows in zip(records, arrays, strict=True):
        if rows.shape[0] != len(record):
            raise ValueError(f"record {record.index}: {rows.shape[0]} rows of logit statistics "
                             f"for {len(record)} tokens")
        record.extra.setdefault("token_stats", {}).update(
            {name: rows[:, k].tolist() for k, name in enumerate(TOKEN_STATS)
             if name in _EXTRAS})


def record_extras(record: Any) -> dict[str, list[float]]:
    """A cached record's extras per token (``attach``, and ``token_prior.attach_priors``),
    else none: the features that read them are then NaN (standardised to 0)."""
    stats = record.extra.get("token_stats") if hasattr(record, "extra") else None
    return {name: list(stats[name]) for name in TOKEN_EXTRAS if name in stats} if stats else {}


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cache_logit_stats(observer: Any, data: Path, cache_dir: Path, *, chunk_size: int = 64,
                      progress: bool = True) -> list[np.ndarray]:
    """Per record of ``data`` (JSON Lines), a ``(tokens, len(TOKEN_STATS))`` float32 array of
    the response tokens' statistics in observer mode (row ``i - 1``'s distribution for token
    ``i``; the first token's are NaN), cached under ``cache_dir`` by the file's hash."""
    import torch
    from safetensors.numpy import load_file, save_file
    from tqdm.auto import tqdm

    from guardrail.monitor import Needs
    from guardrail.toolkit.records import read_records

    key = hashlib.sha256(f"{_VERSION}:{observer.name}:{chunk_size}:{_file_hash(data)}"
                         .encode()).hexdigest()[:16]
    target = cache_dir / f"logitstats-{data.stem}-{key}.safetensors"
    records = list(read_records(data))
    if target.exists():
        loaded = load_file(str(target))
        return [loaded[str(i)] for i in range(len(records))]
    vocab_size = int(observer.model.config.vocab_size) if hasattr(observer, "model") else None
    vocab = entity_vocab(observer.tokenizer, vocab_size or len(observer.tokenizer.hf))
    needs = Needs(logits=True)
    out: list[np.ndarray] = []
    for record in tqdm(records, desc=f"logit stats {data.name}", disable=not progress):
        state = observer.start([{"role": "user", "content": record.prompt}], needs)
        tokens = list(observer.tokenizer.tokenize(record.response))
        previous: np.ndarray | None = None
        rows: list[np.ndarray] = []
        for i in range(0, len(tokens), chunk_size):
            chunk = tokens[i:i + chunk_size]
            batch = observer.extend(state, chunk, needs)
            logits = torch.as_tensor(batch.logits).float().numpy()
            ids = [-1 if t.id is None else t.id for t in chunk]
            before = logits[:-1] if previous is None else np.concatenate(
                [previous[None], logits[:-1]])
            stats = token_stats(before, ids[len(ids) - len(before):], vocab)
            part = np.asarray([stats[n] for n in TOKEN_STATS], dtype=np.float32).T
            if len(before) < len(ids):
                part = np.concatenate([np.full((1, len(TOKEN_STATS)), np.nan, np.float32),
                                       part.reshape(-1, len(TOKEN_STATS))])
            rows.append(part.reshape(-1, len(TOKEN_STATS)))
            previous = logits[-1].copy()
        out.append(np.concatenate(rows) if rows else np.zeros((0, len(TOKEN_STATS)),
                                                              np.float32))
    cache_dir.mkdir(parents=True, exist_ok=True)
    # C order: the stacked columns are a transposed view, which safetensors would write as is
    save_file({str(i): np.ascontiguousarray(a) for i, a in enumerate(out)}, str(target))
    return out


def main(argv: list[str] | None = None) -> int:
    """Cache the statistics of every file given (``--features`` folder)."""
    import argparse

    import torch

    from guardrail.observer.hf import FLOAT32_PRODUCTS, load_smollm2
    from guardrail.policy import ObserverSpec
    from guardrail.toolkit.sources import cache_dir

    parser = argparse.ArgumentParser(
        prog="python -m guardrail_entity_hallucination.training.logit_stats")
    parser.add_argument("files", type=Path, nargs="+")
    parser.add_argument("--features", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    observer = load_smollm2(ObserverSpec(options=FLOAT32_PRODUCTS))
    for path in args.files:
        cache_logit_stats(observer, path, args.features or cache_dir() / "entity-features")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
