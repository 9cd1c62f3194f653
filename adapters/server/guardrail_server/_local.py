"""Serve a local model instead of an upstream: its text pieces become OpenAI chunk dicts.

A local model is anything with a ``name`` and ``stream(messages, **params)`` returning an
iterator of text pieces (``str``) or objects with a ``text`` attribute (``StreamStep``). Its
generation runs in a worker thread one piece at a time; closing stops the iterator between
pieces, so a halt or a hang-up stops generation for real. Concurrent requests interleave: one
lock per model lets a single step run at a time (a model is not assumed to be thread-safe).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import Any, Protocol, runtime_checkable

import anyio

__all__ = ["LocalModel", "local_chunks", "local_completion"]

# Request fields handed to the local model when present.
PARAMS = ("max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop")


@runtime_checkable
class LocalModel(Protocol):
    name: str

    def stream(self, messages: list[dict[str, Any]], **params: Any) -> Iterator[Any]: ...


_step_locks: weakref.WeakKeyDictionary[Any, threading.Lock] = weakref.WeakKeyDictionary()
_locks_lock = threading.Lock()


def _step_lock(model: LocalModel) -> threading.Lock:
    with _locks_lock:
        lock = _step_locks.get(model)
        if lock is None:
            lock = _step_locks[model] = threading.Lock()
        return lock


def _params(body: Mapping[str, Any]) -> dict[str, Any]:
    return {k: body[k] for k in PARAMS if body.get(k) is not None}


def _piece_text(piece: Any) -> str:
    return piece if isinstance(piece, str) else str(getattr(piece, "text", ""))


class _Pieces:
    """Pulls pieces from a sync iterator in a worker thread, one at a time."""

    def __init__(self, iterator: Iterator[Any], lock: threading.Lock) -> None:
        self.iterator = iterator
        self.lock = lock
        self.step: asyncio.Future[Any] | None = None
        self.closed = False

    async def next(self) -> Any:
        step = asyncio.to_thread(self._locked, lambda: next(self.iterator, None))
        self.step = asyncio.ensure_future(step)
        return await asyncio.shield(self.step)  # a cancelled wait must not orphan the thread

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.step is not None and not self.step.done():
            await asyncio.wait([self.step])  # the running piece finishes; then it stops
        close = getattr(self.iterator, "close", None)
        if close is not None:
            await asyncio.to_thread(self._locked, close)  # another stream may hold the lock

    def _locked(self, fn: Callable[[], Any]) -> Any:
        with self.lock:
            return fn()


def local_chunks(model: LocalModel, body: Mapping[str, Any], messages: list[dict[str, Any]]
                 ) -> tuple[AsyncIterator[dict[str, Any]], Callable[[], Awaitable[None]]]:
    """Chunk dicts in OpenAI's shape for one streamed request, and the function that stops it."""
    pieces = _Pieces(iter(model.stream(messages, **_params(body))), _step_lock(model))
    ident, created = f"chatcmpl-{uuid.uuid4().hex[:16]}", int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"id": ident, "object": "chat.completion.chunk", "created": created,
                "model": model.name, "choices": [{"index": 0, "delta": delta,
                                                  "finish_reason": finish}]}

    async def chunks() -> AsyncIterator[dict[str, Any]]:
        yield chunk({"role": "assistant", "content": ""})
        while not pieces.closed:
            piece = await pieces.next()
            if piece is None:
                break
            text = _piece_text(piece)
            if text:
                yield chunk({"content": text})
        yield chunk({}, "stop")

    return chunks(), pieces.close


async def local_completion(model: LocalModel, body: Mapping[str, Any],
                           messages: list[dict[str, Any]]) -> dict[str, Any]:
    """A whole chat completion from the local model (cancelling it stops generation)."""
    chunks, close = local_chunks(model, body, messages)
    parts: list[str] = []
    try:
        async for chunk in chunks:
            parts += [c["delta"].get("content") or "" for c in chunk["choices"]]
    finally:
        with anyio.CancelScope(shield=True):
            await close()
    return {"id": f"chatcmpl-{uuid.uuid4().hex[:16]}", "object": "chat.completion",
            "created": int(time.time()), "model": model.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts)},
                         "logprobs": None, "finish_reason": "stop"}]}
