"""Per-stream bookkeeping of a bounded KV cache: what is in it and what to drop.

The cache holds ``context`` tokens (the rendered conversation) followed by the most recent
response tokens. When a forward would make it longer than ``window``, the oldest response tokens
are dropped (in blocks of ``window // 8`` so the copy happens rarely, never past the bound).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["KVStore", "StreamState", "context_budget"]


class KVStore(Protocol):
    """A backend's KV cache for one stream."""

    def length(self) -> int: ...

    def drop(self, start: int, count: int) -> None:
        """Remove ``count`` cached positions starting at ``start``."""

    def crop(self, length: int) -> None:
        """Keep only the first ``length`` cached positions."""


def context_budget(window: int) -> int:
    """Most context tokens kept: three quarters of the window, so responses always have room."""
    return window - window // 4


@dataclass
class StreamState:
    """One stream's observer state: its KV cache and where the response stands in it."""

    kv: Any
    window: int
    context_len: int  # context tokens in the cache (read at positions 0..context_len-1)
    rotary: bool  # positions keep counting after a drop (rotary models) or restart at the slot
    context_ids: tuple[int, ...] = ()  # the context's token ids (what the prefix cache keys)
    seen: int = 0  # response tokens read so far
    dropped: int = 0  # response tokens dropped from the front of the cache
    # Needs.context: where the pooled span starts in the context (None: not asked), and the
    # pooled states once the context is read, kept until the first batch hands them over
    pool_from: int | None = None
    context: dict[int, Any] | None = None

    def take_context(self) -> dict[int, Any] | None:
        """The pooled context states, once: later calls give ``None``."""
        context, self.context = self.context, None
        return context

    @property
    def cached_response(self) -> int:
        return self.seen - self.dropped

    def make_room(self, n_new: int) -> None:
        """Drop the oldest response tokens so ``n_new`` more fit in the window."""
        over = self.kv.length() + n_new - self.window
        if over <= 0:
            return
        slack = max(1, self.window // 8)
        count = min(self.cached_response, over + slack)
        if count > 0:
            self.kv.drop(self.context_len, count)
            self.dropped += count

    def positions(self, n_new: int) -> range:
        """Position ids of the next ``n_new`` tokens.

        Rotary models: the true position in the stream (context length + response index), so
        attention sees each kept token at its real distance; dropped tokens leave a gap.
        Absolute-position models: the cache slot, so positions never pass the window.
        """
        first = self.context_len + self.seen if self.rotary else self.kv.length()
        return range(first, first + n_new)

    def truncate(self, n_tokens: int) -> None:
        """Forget response tokens after the first ``n_tokens``."""
        if n_tokens >= self.seen:
            return
        n_tokens = max(0, n_tokens)
        if n_tokens < self.dropped:
            # Some of the kept prefix was already dropped: keep the context only.
            self.kv.crop(self.context_len)
            self.dropped = n_tokens
        else:
            self.kv.crop(self.context_len + n_tokens - self.dropped)
        self.seen = n_tokens
