"""Client proxies: ``wrap(client, guard=...)`` guards ``chat.completions`` and delegates the rest.

``chat.completions.create`` (streamed or not) and the ``chat.completions.stream`` helper are
guarded; every other attribute is the real client's. ``with_raw_response`` and
``with_streaming_response`` are the real, unguarded resources: use ``create`` for guarded output.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
from functools import partial
from typing import Any

import openai

from guardrail import Guard, GuardrailError, normalize_messages

from ._chunks import ChunkGuard, guard_completion, request_messages
from ._stream import AsyncGuardedStream, GuardedStream

__all__ = ["AsyncGuardedCompletions", "GuardedClient", "GuardedCompletions", "wrap"]


class _Options:
    """What every proxy of one wrapped client shares."""

    def __init__(self, guard: Guard, raise_on_halt: bool | None,
                 offload: bool | None = None) -> None:
        self.guard = guard
        self.raise_on_halt = raise_on_halt
        # Async clients await the observer's reads; a guard whose reads cannot be awaited
        # (an observer that does not batch) runs in a worker thread instead.
        self.offload = guard.blocks_event_loop if offload is None else offload
        # A whole completion is one sync feed: with an observer it goes to a worker thread.
        self.offload_whole = guard.observer is not None if offload is None else offload

    def prepare(self, kwargs: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        messages = request_messages(kwargs.get("messages"))
        normalize_messages(messages)  # an unreadable message fails here, before the upstream call
        metadata = {"adapter": "openai", "model": kwargs.get("model")}
        return messages, metadata

    def chunk_guard(self, kwargs: dict[str, Any], messages: list[dict[str, Any]],
                    metadata: dict[str, Any]) -> ChunkGuard:
        """The stream's guard, made before the request goes upstream: the observer starts
        reading the conversation while the upstream works on its first token."""
        n = kwargs.get("n")
        return ChunkGuard(self.guard, messages, choices=n if isinstance(n, int) else 1,
                          raise_on_halt=self.raise_on_halt, metadata=metadata,
                          prepared=self.guard.prepare(messages))


class _Proxy:
    """Attribute access falls through to the wrapped object."""

    _target: Any

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)


class GuardedCompletions(_Proxy):
    """``client.chat.completions`` of a wrapped sync client."""

    def __init__(self, target: Any, options: _Options) -> None:
        self._target = target
        self._options = options

    def create(self, **kwargs: Any) -> Any:
        """Like ``Completions.create``; a stream comes back as a ``GuardedStream``."""
        messages, metadata = self._options.prepare(kwargs)
        kwargs["messages"] = messages
        if kwargs.get("stream"):
            chunk_guard = self._options.chunk_guard(kwargs, messages, metadata)
            try:
                result = self._target.create(**kwargs)
            except BaseException:
                chunk_guard.close()
                raise
            return GuardedStream(result, chunk_guard)
        result = self._target.create(**kwargs)
        return guard_completion(self._options.guard, result, messages,
                                raise_on_halt=self._options.raise_on_halt, metadata=metadata)

    def stream(self, **kwargs: Any) -> Any:
        """The ``.stream()`` helper (events, ``get_final_completion``) over guarded chunks."""
        return _helper_resource(self._target, self.create).stream(**kwargs)


class AsyncGuardedCompletions(_Proxy):
    """``client.chat.completions`` of a wrapped async client."""

    def __init__(self, target: Any, options: _Options) -> None:
        self._target = target
        self._options = options

    async def create(self, **kwargs: Any) -> Any:
        """Like ``AsyncCompletions.create``; a stream comes back as an ``AsyncGuardedStream``."""
        messages, metadata = self._options.prepare(kwargs)
        kwargs["messages"] = messages
        if kwargs.get("stream"):
            chunk_guard = self._options.chunk_guard(kwargs, messages, metadata)
            try:
                result = await self._target.create(**kwargs)
            except BaseException:
                chunk_guard.close()
                raise
            return AsyncGuardedStream(result, chunk_guard, offload=self._options.offload)
        result = await self._target.create(**kwargs)
        guarded = partial(guard_completion, self._options.guard, result, messages,
                          raise_on_halt=self._options.raise_on_halt, metadata=metadata)
        return await asyncio.to_thread(guarded) if self._options.offload_whole else guarded()

    def stream(self, **kwargs: Any) -> Any:
        return _helper_resource(self._target, self.create).stream(**kwargs)


def _helper_resource(target: Any, create: Any) -> Any:
    """A copy of the real resource whose ``create`` is the guarded one: the SDK's ``.stream()``
    helper builds its request through ``resource.create``, so it streams guarded chunks."""
    resource = copy.copy(target)
    resource.create = create
    return resource


class _GuardedChat(_Proxy):
    def __init__(self, target: Any, completions: Any) -> None:
        self._target = target
        self.completions = completions


class GuardedClient(_Proxy):
    """A wrapped ``OpenAI``/``AsyncOpenAI``: ``chat.completions`` is guarded, the rest is the
    real client's. ``.unwrapped`` is the real client."""

    def __init__(self, client: Any, guard: Guard, *, raise_on_halt: bool | None = None,
                 offload: bool | None = None, is_async: bool | None = None) -> None:
        self._target = client
        self._options = _Options(guard, raise_on_halt, offload)
        self.is_async = _is_async(client) if is_async is None else is_async
        completions_cls = AsyncGuardedCompletions if self.is_async else GuardedCompletions
        real_chat = client.chat
        self.chat = _GuardedChat(real_chat, completions_cls(real_chat.completions, self._options))

    @property
    def unwrapped(self) -> Any:
        return self._target

    @property
    def guard(self) -> Guard:
        return self._options.guard

    def with_options(self, **kwargs: Any) -> GuardedClient:
        """The real client's ``with_options``, wrapped with the same guard."""
        return GuardedClient(self._target.with_options(**kwargs), self.guard,
                             raise_on_halt=self._options.raise_on_halt,
                             offload=self._options.offload, is_async=self.is_async)

    def copy(self, **kwargs: Any) -> GuardedClient:
        return GuardedClient(self._target.copy(**kwargs), self.guard,
                             raise_on_halt=self._options.raise_on_halt,
                             offload=self._options.offload, is_async=self.is_async)

    def __enter__(self) -> GuardedClient:
        self._target.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._target.__exit__(*exc)

    async def __aenter__(self) -> GuardedClient:
        await self._target.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self._target.__aexit__(*exc)

    def __repr__(self) -> str:
        return f"GuardedClient({self._target!r}, guard={self.guard!r})"


def _is_async(client: Any) -> bool:
    if isinstance(client, openai.AsyncOpenAI):
        return True
    if isinstance(client, openai.OpenAI):
        return False
    try:
        create = client.chat.completions.create
    except AttributeError:
        raise GuardrailError(
            f"cannot wrap {type(client).__name__}: it has no chat.completions.create"
        ) from None
    return inspect.iscoroutinefunction(create)


def wrap(client: Any, *, guard: Guard, raise_on_halt: bool | None = None,
         offload: bool | None = None) -> GuardedClient:
    """Guard an ``openai.OpenAI`` or ``openai.AsyncOpenAI`` client (or one shaped like them).

    ``raise_on_halt`` overrides the policy's setting: raise ``GuardrailViolation`` on halt instead
    of ending with a ``content_filter`` chunk (or message). ``offload`` (async clients): run the
    guard in a worker thread. By default streams await the observer's reads on the event loop
    (a thread only for an observer whose reads cannot be awaited) and whole completions go to a
    thread when the guard has an observer model.
    """
    if isinstance(client, GuardedClient):
        raise GuardrailError("this client is already guarded; wrap the unwrapped client")
    return GuardedClient(client, guard, raise_on_halt=raise_on_halt, offload=offload)
