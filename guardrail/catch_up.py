"""Async drivers that fall behind their upstream take what arrived meanwhile in one go.

``catch_up(source, limit)`` pulls ``source`` in a task of its own and yields lists: the next
item, with every item that arrived while the driver was busy with the previous list (at most
``limit`` in all). A driver hands such a list to ``GuardSession.afeed_many`` (or an adapter's
``aon_chunks``), so the observer reads that come due share one forward instead of one per chunk.
The task holds at most ``limit`` items besides the one it is waiting for: it reads no further ahead
of the guard than that, and stops as soon as the driver closes the generator (before the driver
closes the upstream).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterable
from typing import Any, TypeVar

__all__ = ["catch_up"]

T = TypeVar("T")
_END = object()


async def catch_up(source: AsyncIterable[T], limit: int) -> AsyncGenerator[list[T], None]:
    """Lists of 1 to ``limit`` items of ``source``, in order; an error of ``source`` comes after
    the items pulled before it."""
    if limit < 1:
        raise ValueError(f"catch_up: limit must be at least 1, got {limit}")
    queue: asyncio.Queue[tuple[Any, BaseException | None]] = asyncio.Queue(maxsize=limit)

    async def pump() -> None:
        try:
            async for item in source:
                await queue.put((item, None))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the driver gets it in order, after the items
            await queue.put((_END, exc))
            return
        await queue.put((_END, None))

    task = asyncio.ensure_future(pump())
    try:
        while True:
            item, error = await queue.get()
            batch: list[T] = []
            while item is not _END:
                batch.append(item)
                if len(batch) >= limit or queue.empty():
                    break
                item, error = queue.get_nowait()
            if batch:
                yield batch
            if item is _END:
                if error is not None:
                    raise error
                return
    finally:
        await _stop(task)


async def _stop(task: asyncio.Future[None]) -> None:
    """Cancel the pump and wait until it has left ``source``: the driver closes the upstream
    next, which must not race a read still under way. A cancellation of our own (a cancel
    scope that keeps cancelling) does not cut the wait short; it is raised after it."""
    task.cancel()
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            cancelled = True
    if not task.cancelled():
        task.exception()  # retrieved: never "exception was never retrieved"
    if cancelled:
        raise asyncio.CancelledError
