"""Drive guardrail-openai's ``ChunkGuard`` from an async source of chunk dicts and emit SSE.

The translation of chunks (hold-back, re-chunking, halt chunk, ``guardrail`` event field) is the
openai adapter's; this module adds the server's duties: close the upstream before the client sees
a halt, turn upstream failures into an SSE error event, end every session with a report, and
always finish with ``data: [DONE]`` unless the client is gone. Guard work runs in a worker thread
(or, with a batched observer, on the event loop with its reads awaited), and a monitor that
raises ``SystemExit`` or another ``BaseException`` ends its stream with an error event, not the
server.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor
from functools import partial
from typing import Any, TypeVar

import anyio
from guardrail_openai import ChunkGuard
from openai.types.chat import ChatCompletionChunk
from pydantic import ValidationError

from guardrail import Report
from guardrail.catch_up import catch_up

from ._sse import DONE, sse_data
from ._upstream import UpstreamError

__all__ = ["GuardCrashed", "ReportHook", "acontained", "contained", "guarded_sse"]

log = logging.getLogger("guardrail.server")

ReportHook = Callable[[list[Report]], None]
T = TypeVar("T")


class GuardCrashed(Exception):
    """Guard work raised a ``BaseException`` that is not an ``Exception`` (``SystemExit``,
    ``KeyboardInterrupt``): it must end the request, not the event loop."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(f"{type(exc).__name__}: {exc}")
        self.what = type(exc).__name__


def contained(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, with a ``BaseException`` turned into ``GuardCrashed``."""
    try:
        return fn(*args)
    except Exception:
        raise
    except BaseException as exc:  # a monitor's SystemExit must not stop the server
        raise GuardCrashed(exc) from exc


async def acontained(work: Awaitable[T]) -> T:
    """``contained`` for guard work awaited on the event loop (a cancellation passes)."""
    try:
        return await work
    except (Exception, asyncio.CancelledError):
        raise
    except BaseException as exc:  # a monitor's SystemExit must not stop the server
        raise GuardCrashed(exc) from exc


def to_chunk(data: dict[str, Any]) -> ChatCompletionChunk:
    """Validate (fast) and fall back to openai's lenient construction for upstreams whose
    chunks bend the schema (missing ``created``, odd ``finish_reason`` values)."""
    try:
        return ChatCompletionChunk.model_validate(data)
    except ValidationError:
        return ChatCompletionChunk.construct(**data)


class _GuardWork:
    """Runs the chunk guard's work: in ``executor`` with ``offload``, else awaited on the event
    loop. Remembers the worker-thread job so the stream's end can wait for it."""

    def __init__(self, chunk_guard: ChunkGuard, offload: bool, executor: Executor | None) -> None:
        self.chunk_guard, self.offload, self.executor = chunk_guard, offload, executor
        self.in_flight: asyncio.Future[list[ChatCompletionChunk]] | None = None

    async def _run(self, fn: Callable[..., list[ChatCompletionChunk]], *args: Any
                   ) -> list[ChatCompletionChunk]:
        work = partial(contained, fn, *args)
        self.in_flight = asyncio.ensure_future(
            asyncio.get_running_loop().run_in_executor(self.executor, work))
        return await asyncio.shield(self.in_flight)  # the worker thread cannot be cancelled

    async def take(self, batch: list[ChatCompletionChunk]) -> list[ChatCompletionChunk]:
        if self.offload:
            return await self._run(self.chunk_guard.on_chunks, batch)
        return await acontained(self.chunk_guard.aon_chunks(batch))

    async def end(self) -> list[ChatCompletionChunk]:
        if self.offload:
            return await self._run(self.chunk_guard.on_end)
        return await acontained(self.chunk_guard.aon_end())

    async def settle(self) -> None:
        """Wait for a worker-thread job still running: it still holds the sessions."""
        if self.in_flight is not None and not self.in_flight.done():
            await asyncio.wait([self.in_flight])


def _proxy_error(exc: Exception) -> tuple[str, dict[str, Any]]:
    """How a bug of ours (or a crashed monitor) ends the stream: the report's reason and the
    client's error event."""
    what = exc.what if isinstance(exc, GuardCrashed) else type(exc).__name__
    log.error("stream failed inside the proxy: %s: %s", type(exc).__name__, exc)
    return f"proxy error: {what}", {"error": {
        "message": f"guardrail-server failed: {what}", "type": "server_error",
        "code": "internal_error", "param": None}}


def _end_sessions(chunk_guard: ChunkGuard, ended: str, on_report: ReportHook | None) -> None:
    """End the sessions still open (client gone, error) with ``ended`` and hand on the
    reports."""
    try:
        contained(chunk_guard.abort, ended)
    except Exception as exc:  # noqa: BLE001 - a session broken by a crash cannot report
        log.error("ending the stream's sessions failed: %s: %s", type(exc).__name__, exc)
    if on_report is not None:
        on_report([r for _, r in sorted(chunk_guard.reports.items())])


async def guarded_sse(
    chunks: AsyncIterator[dict[str, Any]],
    chunk_guard: ChunkGuard,
    *,
    close_upstream: Callable[[], Awaitable[None]],
    offload: bool = False,
    executor: Executor | None = None,
    on_report: ReportHook | None = None,
) -> AsyncGenerator[bytes, None]:
    """SSE bytes for the guarded stream. ``close_upstream`` stops the upstream (idempotent).
    With ``offload`` the guard runs in ``executor`` (default: the loop's own pool); without, its
    observer reads are awaited. Either way, the chunks that arrived while the guard was busy
    (at most hold-back + 1) are judged in one go (``guardrail.catch_up``)."""
    work = _GuardWork(chunk_guard, offload, executor)
    batches = catch_up(chunks, chunk_guard.catch_up_limit)
    ended = "client went away"
    try:
        try:
            async for batch in batches:
                outs = await work.take([to_chunk(data) for data in batch])
                if chunk_guard.halted_all:
                    await batches.aclose()  # nothing more is pulled from the upstream
                    await close_upstream()  # stop the model before the client sees the halt
                for out in outs:
                    yield sse_data(out.to_dict(mode="json"))
                if chunk_guard.halted_all:
                    break
            else:
                for out in await work.end():
                    yield sse_data(out.to_dict(mode="json"))
            ended = "stream ended"
        except UpstreamError as exc:
            ended = f"upstream error: {exc.code}"
            log.warning("stream ended by an upstream error: %s", exc.message)
            await close_upstream()
            yield sse_data(exc.payload())
        except Exception as exc:  # noqa: BLE001 - a bug of ours still ends the stream cleanly
            ended, event = _proxy_error(exc)
            await close_upstream()
            yield sse_data(event)
        yield DONE
    finally:
        with anyio.CancelScope(shield=True):
            await batches.aclose()
            await close_upstream()
            await work.settle()
        _end_sessions(chunk_guard, ended, on_report)
