"""Drive guardrail-openai's ``ChunkGuard`` from an async source of chunk dicts and emit SSE.

The translation of chunks (hold-back, re-chunking, halt chunk, ``guardrail`` event field) is the
openai adapter's; this module adds the server's duties: close the upstream before the client sees
a halt, turn upstream failures into an SSE error event, end every session with a report, and
always finish with ``data: [DONE]`` unless the client is gone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from guardrail_openai import ChunkGuard
from openai.types.chat import ChatCompletionChunk
from pydantic import ValidationError

from guardrail import Report

from ._sse import DONE, sse_data
from ._upstream import UpstreamError

__all__ = ["ReportHook", "guarded_sse"]

log = logging.getLogger("guardrail.server")

ReportHook = Callable[[list[Report]], None]


def to_chunk(data: dict[str, Any]) -> ChatCompletionChunk:
    """Validate (fast) and fall back to openai's lenient construction for upstreams whose
    chunks bend the schema (missing ``created``, odd ``finish_reason`` values)."""
    try:
        return ChatCompletionChunk.model_validate(data)
    except ValidationError:
        return ChatCompletionChunk.construct(**data)


async def guarded_sse(
    chunks: AsyncIterator[dict[str, Any]],
    chunk_guard: ChunkGuard,
    *,
    close_upstream: Callable[[], Awaitable[None]],
    offload: bool = False,
    on_report: ReportHook | None = None,
) -> AsyncGenerator[bytes, None]:
    """SSE bytes for the guarded stream. ``close_upstream`` stops the upstream (idempotent)."""

    async def run(fn: Callable[..., list[ChatCompletionChunk]], *args: Any
                  ) -> list[ChatCompletionChunk]:
        return await asyncio.to_thread(fn, *args) if offload else fn(*args)

    ended = "client went away"
    try:
        try:
            async for data in chunks:
                outs = await run(chunk_guard.on_chunk, to_chunk(data))
                if chunk_guard.halted_all:
                    await close_upstream()  # stop the model before the client sees the halt
                for out in outs:
                    yield sse_data(out.to_dict(mode="json"))
                if chunk_guard.halted_all:
                    break
            else:
                for out in await run(chunk_guard.on_end):
                    yield sse_data(out.to_dict(mode="json"))
        except UpstreamError as exc:
            ended = f"upstream error: {exc.code}"
            log.warning("stream ended by an upstream error: %s", exc.message)
            await close_upstream()
            chunk_guard.abort(ended)
            yield sse_data(exc.payload())
        ended = "stream ended"
        yield DONE
    finally:
        with anyio.CancelScope(shield=True):
            await close_upstream()
        chunk_guard.abort(ended)  # sessions still open (client gone) end with a report
        if on_report is not None:
            on_report([r for _, r in sorted(chunk_guard.reports.items())])
