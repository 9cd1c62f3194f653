"""``GuardedStream`` and ``AsyncGuardedStream``: the surface of openai's ``Stream``/``AsyncStream``
(iteration, ``close()``, context manager, ``.response``) over a guarded chunk stream.

A halt ends the stream with a ``content_filter`` chunk and then closes the upstream response:
``close()`` drops the HTTP connection, while merely stopping to iterate (``break``) would leave
the server generating. The same happens when the reader breaks out early and closes us, or leaves
a ``with`` block.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterator
from types import TracebackType
from typing import Any

from openai.types.chat import ChatCompletionChunk

from guardrail import Report
from guardrail.catch_up import catch_up

from ._chunks import ChunkGuard

__all__ = ["AsyncGuardedStream", "GuardedStream"]


class GuardedStream:
    """A guarded ``Stream[ChatCompletionChunk]``."""

    def __init__(self, upstream: Any, chunk_guard: ChunkGuard) -> None:
        self._upstream = upstream
        self._guard = chunk_guard
        self._iterator = self._guarded()

    @property
    def response(self) -> Any:
        """The upstream HTTP response (an httpx/httpx2 ``Response``)."""
        return self._upstream.response

    @property
    def reports(self) -> dict[int, Report]:
        """Guard reports by choice index, for the choices that have ended."""
        return self._guard.reports

    def _guarded(self) -> Generator[ChatCompletionChunk, None, None]:
        try:
            for chunk in self._upstream:
                outs = self._guard.on_chunk(chunk)
                if self._guard.halted_all or self._guard.violation is not None:
                    self._upstream.close()  # stop the server before the reader sees the halt
                yield from outs
                if self._guard.violation is not None:
                    raise self._guard.violation
                if self._guard.halted_all:
                    return
            yield from self._guard.on_end()
            if self._guard.violation is not None:
                raise self._guard.violation
        finally:
            self._guard.abort("stream closed early")
            self._upstream.close()  # idempotent; this is what stops the server generating

    def __next__(self) -> ChatCompletionChunk:
        return next(self._iterator)

    def __iter__(self) -> Iterator[ChatCompletionChunk]:
        # Delegating with ``yield from`` means a ``break`` out of the reader's loop closes the
        # upstream as well (openai's own Stream would keep it open until close()).
        yield from self._iterator

    def close(self) -> None:
        """Close the upstream response and end this stream."""
        self._upstream.close()
        self._iterator.close()

    def __enter__(self) -> GuardedStream:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class AsyncGuardedStream:
    """A guarded ``AsyncStream[ChatCompletionChunk]``.

    The guard's observer reads are awaited (``ChunkGuard.aon_chunks``), so the event loop serves
    other work while they run; when the guard falls behind, the chunks that arrived meanwhile are
    taken together (``guardrail.catch_up``, at most hold-back + 1), their reads sharing one
    forward. With ``offload`` the guard's work per batch of chunks runs in a worker thread
    instead (a guard whose observer cannot be awaited, or slow monitors).
    """

    def __init__(self, upstream: Any, chunk_guard: ChunkGuard, *, offload: bool = False) -> None:
        self._upstream = upstream
        self._guard = chunk_guard
        self._offload = offload
        self._iterator = self._guarded()

    async def _take(self, chunks: list[ChatCompletionChunk]) -> list[ChatCompletionChunk]:
        if self._offload:
            return await asyncio.to_thread(self._guard.on_chunks, chunks)
        return await self._guard.aon_chunks(chunks)

    async def _end(self) -> list[ChatCompletionChunk]:
        if self._offload:
            return await asyncio.to_thread(self._guard.on_end)
        return await self._guard.aon_end()

    @property
    def response(self) -> Any:
        return self._upstream.response

    @property
    def reports(self) -> dict[int, Report]:
        return self._guard.reports

    async def _guarded(self) -> AsyncGenerator[ChatCompletionChunk, None]:
        batches = catch_up(self._upstream, self._guard.catch_up_limit)
        try:
            async for chunks in batches:
                outs = await self._take(chunks)
                if self._guard.halted_all or self._guard.violation is not None:
                    await batches.aclose()  # nothing more is pulled from the upstream
                    await self._upstream.close()
                for out in outs:
                    yield out
                if self._guard.violation is not None:
                    raise self._guard.violation
                if self._guard.halted_all:
                    return
            for out in await self._end():
                yield out
            if self._guard.violation is not None:
                raise self._guard.violation
        finally:
            await batches.aclose()
            self._guard.abort("stream closed early")
            await self._upstream.close()

    async def __anext__(self) -> ChatCompletionChunk:
        return await self._iterator.__anext__()

    async def __aiter__(self) -> AsyncIterator[ChatCompletionChunk]:
        async for chunk in self._iterator:
            yield chunk

    async def close(self) -> None:
        """Close the upstream response and end this stream."""
        await self._upstream.close()
        await self._iterator.aclose()

    async def aclose(self) -> None:
        await self.close()

    async def __aenter__(self) -> AsyncGuardedStream:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()
