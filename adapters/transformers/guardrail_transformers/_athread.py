"""Driving a sync iterator from async code, one item per worker-thread call."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Generator, Iterator
from typing import TypeVar

__all__ = ["iterate_in_thread"]

T = TypeVar("T")
_DONE = object()


async def iterate_in_thread(iterator: Iterator[T]) -> AsyncIterator[T]:
    """Yield ``iterator``'s items, each computed by ``next`` in a worker thread. When the
    consumer stops early (break, ``aclose``, cancellation) the item in flight finishes, then the
    iterator is closed, so a generator behind it stops before its next forward pass."""
    pending: asyncio.Future[object] | None = None
    try:
        while True:
            pending = asyncio.ensure_future(asyncio.to_thread(next, iterator, _DONE))
            # shielded: a cancelled consumer must not leave the thread running unowned
            item = await asyncio.shield(pending)
            pending = None
            if item is _DONE:
                return
            yield item  # type: ignore[misc]
    finally:
        if pending is not None and not pending.done():
            await asyncio.wait([pending])
        if isinstance(iterator, Generator):
            iterator.close()
