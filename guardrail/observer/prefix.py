"""Reuse of a shared conversation prefix's KV cache across streams.

Streams that begin with the same rendered conversation (a system prompt, a fixed preamble) would
each recompute the same keys and values: a position's keys and values depend only on the tokens
up to it, so they can be copied from an earlier stream instead. ``PrefixCache`` keeps the context
KV of the most recent streams (least recently used first out, bounded in tokens) and hands a new
stream the longest prefix of its context that one of them shares; the rest is read as usual.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

__all__ = ["DEFAULT_PREFIX_TOKENS", "PrefixCache"]

# Context tokens kept across all entries (SmolLM2 at 16 blocks: about 25 KB per token).
DEFAULT_PREFIX_TOKENS = 2048


class PrefixCache:
    """Context KV of recent streams, keyed by their token ids; at most ``max_tokens`` in all."""

    def __init__(self, max_tokens: int = DEFAULT_PREFIX_TOKENS) -> None:
        self.max_tokens = max(0, int(max_tokens))
        # (depth, first int8 block, ids) -> per block and kind, the keys or values
        # (1, kv_heads, len(ids), dim); a cache's int8 blocks (q4_1_tail_q8) must match
        self._entries: OrderedDict[tuple[int, int | None, tuple[int, ...]], list[Any]] = \
            OrderedDict()
        self._lock = threading.Lock()  # streams read on their own threads share the cache
        self.hits = 0  # streams that reused a prefix
        self.reused_tokens = 0  # positions copied instead of computed

    def __len__(self) -> int:
        return len(self._entries)

    def tokens(self) -> int:
        """Context positions held, over all entries."""
        return sum(len(ids) for _, _, ids in list(self._entries))

    def nbytes(self) -> int:
        return sum(_nbytes(t) for tensors in list(self._entries.values()) for t in tensors)

    def restore(self, kv: Any, depth: int, ids: Sequence[int]) -> int:
        """Fill the empty ``kv`` (``depth`` blocks) with the longest cached prefix of ``ids``;
        return its length (0: nothing reused)."""
        if not self.max_tokens or not ids or kv.length():
            return 0
        best, best_key = 0, None
        integer_from = getattr(kv, "integer_from", None)
        with self._lock:
            for key in self._entries:
                got_depth, got_from, cached = key
                if got_depth < depth or got_from != integer_from:
                    continue
                n = _common(cached, ids)
                if n > best:
                    best, best_key = n, key
            if best_key is None:
                return 0
            self._entries.move_to_end(best_key)
            tensors = self._entries[best_key][: 2 * depth]
        kv.append([t[:, :, :best] for t in tensors])
        self.hits += 1
        self.reused_tokens += best
        return best

    def store(self, kv: Any, depth: int, ids: Sequence[int]) -> None:
        """Keep a copy of the context KV just read (``ids``, the first positions of ``kv``)."""
        n = len(ids)
        if not self.max_tokens or not n or n > self.max_tokens or kv.length() < n:
            return
        key = (depth, getattr(kv, "integer_from", None), tuple(ids))
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return
        copies = [_copy(t[:, :, :n]) for t in kv.tensors[: 2 * depth]]
        with self._lock:
            self._entries[key] = copies
            while self.tokens() > self.max_tokens:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _copy(t: Any) -> Any:
    return t.copy() if hasattr(t, "copy") and not hasattr(t, "clone") else t.clone()


def _nbytes(t: Any) -> int:
    return int(t.nbytes) if hasattr(t, "nbytes") else int(t.numel() * t.element_size())
