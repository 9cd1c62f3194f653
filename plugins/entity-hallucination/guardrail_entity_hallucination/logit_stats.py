"""Per-token statistics of the observer's next-token distribution, beyond surprisal and entropy:
what the monitor can compute from the logits row it already reads (no extra forward).

For the distribution token ``t`` was read from (max-shifted logits ``z``, ``s = sum(exp z)``):

- ``surprisal``: ``log s - z[t]``; ``entropy``: ``log s - sum(exp(z) z) / s`` (as before);
- ``margin``: ``log p(top) - log p(t) = -z[t]`` (0 when ``t`` is the model's first choice);
- ``rank``: how many tokens the model put above ``t`` (0: its first choice);
- ``top_entity``: 1 when the model's first choice starts a name or a number (a piece that
  starts with a capital letter or a digit, after an optional space) and is not ``t``: the
  model expected another entity here. Needs the tokenizer's vocabulary (``entity_vocab``); NaN
  without it.

Caching them over a data file for training is ``training.logit_stats``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["TOKEN_STATS", "entity_vocab", "token_stats"]

TOKEN_STATS = ("surprisal", "entropy", "margin", "rank", "top_entity")
_ENTITY_PIECE = re.compile(r"^\s?[A-Z0-9\u00c0-\u00de]")


def entity_vocab(tokenizer: Any, size: int) -> np.ndarray:
    """A bool per vocabulary id: whether the piece starts a name or a number (see the module
    docstring). ``tokenizer``: an ``HFTokenizer`` (its ``hf`` is the library tokenizer)."""
    hf = getattr(tokenizer, "hf", tokenizer)
    out = np.zeros(size, dtype=bool)
    pieces = hf.convert_ids_to_tokens(list(range(min(size, len(hf)))))
    for i, piece in enumerate(pieces):
        if piece is None:
            continue
        text = hf.convert_tokens_to_string([piece])
        out[i] = bool(_ENTITY_PIECE.match(text))
    return out


def token_stats(logits: np.ndarray, ids: Sequence[int], vocab: np.ndarray | None = None,
                names: Sequence[str] = TOKEN_STATS) -> dict[str, list[float]]:
    """``names`` of tokens ``ids`` (-1: unknown, NaN) under the row-aligned ``logits (n, V)``.

    Surprisal and entropy are computed exactly as the monitor always did (numpy on the
    max-shifted row, one pass); the others reuse the same shifted row."""
    want = set(names)
    out: dict[str, list[float]] = {name: [] for name in names}
    z = np.empty(logits.shape[-1], dtype=np.float32)
    e = np.empty_like(z)
    for r, token_id in enumerate(ids):
        row = logits[r]
        np.subtract(row, row.max(), out=z)
        np.exp(z, out=e)
        total = float(e.sum())
        log_total = math.log(total)
        known = token_id >= 0
        if "entropy" in want:
            out["entropy"].append(log_total - float(np.dot(e, z)) / total)
        if "surprisal" in want:
            out["surprisal"].append(log_total - float(z[token_id]) if known else math.nan)
        if "margin" in want:
            out["margin"].append(-float(z[token_id]) if known else math.nan)
        if "rank" in want:
            out["rank"].append(float(np.count_nonzero(z > z[token_id])) if known else math.nan)
        if "top_entity" in want:
            top = int(np.argmax(z))
            out["top_entity"].append(
                float(bool(vocab[top]) and top != token_id)
                if vocab is not None and known and top < len(vocab) else math.nan)
    return out
