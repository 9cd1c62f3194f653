"""``GuardRunnable``: a LangChain Runnable that guards a stream, ``prompt | model | guard``.

Streaming goes through ``transform``/``atransform`` so text reaches the reader as the policy
releases it. On halt the reader gets the halt message as the last chunk (``finish_reason``
``content_filter`` in its ``response_metadata``), and the upstream is stopped for real: the halt
is thrown into the upstream generator (a chat model closes its HTTP response on it) and the
transform raises, which keeps LangChain from draining the rest of the input for tracing. The
exception is caught at this Runnable's edge, so the consumer's stream ends cleanly, unless the
policy (or ``raise_on_halt=True``) asks for ``GuardrailViolation``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Iterator
from typing import Any, Union, cast

from langchain_core.callbacks import (
    AsyncCallbackManagerForChainRun,
    CallbackManagerForChainRun,
    adispatch_custom_event,
    dispatch_custom_event,
)
from langchain_core.messages import BaseMessage
from langchain_core.runnables import RunnableConfig, RunnableSerializable
from langchain_core.runnables.config import ensure_config
from pydantic import ConfigDict, Field

from guardrail import Guard, GuardrailViolation, Prepared

from ._conversation import current_catcher, start_catching, stop_catching
from ._translate import StreamTranslator, guard_whole, session_messages

__all__ = ["GuardRunnable", "StreamHalted"]

GuardIO = Union[str, BaseMessage]  # noqa: UP007 - a runtime alias LangChain reads for schemas

MESSAGES_KEY = "guardrail_messages"
CLOSE_TURNS = 8  # loop turns granted to pending upstream closes after a halt


class StreamHalted(GuardrailViolation):
    """Raised inside the transform (and thrown into the upstream) when the guard halts. It never
    reaches the consumer: ``GuardRunnable`` ends the stream cleanly after the halt chunk."""


class GuardRunnable(RunnableSerializable[GuardIO, GuardIO]):
    """Guards a stream of ``str`` or chat message chunks; the output has the input's type.

    Guard events (flags, routes, errors, the halt) are dispatched as custom events named
    ``guardrail.flag`` and so on (``astream_events`` shows them as ``on_custom_event``) and are
    added to the chunk's ``response_metadata["guardrail"]``. The conversation the guard reads as
    context is ``messages`` or, per call, ``config["metadata"]["guardrail_messages"]``.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    guard: Guard = Field(exclude=True)
    messages: list[Any] | None = None
    raise_on_halt: bool | None = None
    offload: bool | None = None
    """Async: run the guard in a worker thread so it never stalls the event loop. Default:
    ``astream`` awaits a batched observer's reads (a thread only for an observer whose reads
    cannot be awaited); ``ainvoke`` uses a thread when the guard has an observer model."""
    name: str | None = "guardrail"

    @classmethod
    def is_lc_serializable(cls) -> bool:
        return False

    # -- helpers ---------------------------------------------------------------------------

    def _translator(self, config: RunnableConfig | None) -> StreamTranslator:
        """The conversation is ``guardrail_messages`` in the call's metadata, else ``messages``,
        else what the model feeding this stream was asked (caught as it starts)."""
        messages = self._named_messages(config)
        if messages is None:
            catcher = current_catcher()
            if catcher is not None:
                return StreamTranslator(self.guard, lambda: session_messages(catcher.messages),
                                        raise_on_halt=self.raise_on_halt,
                                        prepared=catcher.take_prepared)
        return StreamTranslator(self.guard, session_messages(messages),
                                raise_on_halt=self.raise_on_halt)

    def _preparer(self, config: RunnableConfig | None
                  ) -> Callable[[list[BaseMessage]], Prepared] | None:
        """What begins the guard's read of the conversation a model starts on, when that is the
        stream's conversation (the call names none itself, see ``_translator``)."""
        if self._named_messages(config) is not None:
            return None
        return lambda messages: self.guard.prepare(session_messages(messages))

    def _named_messages(self, config: RunnableConfig | None) -> Any:
        """The conversation the call names: ``guardrail_messages`` in its metadata, else
        ``messages`` (None: the chain's model's, caught as it starts)."""
        metadata = ensure_config(config).get("metadata") or {}
        return metadata.get(MESSAGES_KEY, self.messages)

    @property
    def _offloads(self) -> bool:
        return self.guard.observer is not None if self.offload is None else self.offload

    @property
    def _streams_offload(self) -> bool:
        """Streams await a batched observer's reads (``astep``); a thread only for a guard
        whose reads cannot be awaited, or when ``offload`` says so."""
        return self.guard.blocks_event_loop if self.offload is None else self.offload

    def _stop(self, translator: StreamTranslator) -> StreamHalted | GuardrailViolation:
        if translator.raise_on_halt:
            return translator.violation
        assert translator.halt is not None
        return StreamHalted(translator.halt, translator.report)

    # -- invoke ----------------------------------------------------------------------------

    def _invoke(self, input: GuardIO, run_manager: CallbackManagerForChainRun,
                config: RunnableConfig) -> GuardIO:
        output, events = guard_whole(self._translator(config), input)
        for name, data in events:
            dispatch_custom_event(name, data, config=config)
        return output

    async def _ainvoke(self, input: GuardIO, run_manager: AsyncCallbackManagerForChainRun,
                       config: RunnableConfig) -> GuardIO:
        translator = self._translator(config)
        if self._offloads:
            output, events = await asyncio.to_thread(guard_whole, translator, input)
        else:
            output, events = guard_whole(translator, input)
        for name, data in events:
            await adispatch_custom_event(name, data, config=config)
        return output

    def invoke(self, input: GuardIO, config: RunnableConfig | None = None,
               **kwargs: Any) -> GuardIO:
        """Guard a whole ``str`` or message. On halt the content is the halt message."""
        return self._call_with_config(self._invoke, input, config, **kwargs)

    async def ainvoke(self, input: GuardIO, config: RunnableConfig | None = None,
                      **kwargs: Any) -> GuardIO:
        return await self._acall_with_config(self._ainvoke, input, config, **kwargs)

    # -- streaming -------------------------------------------------------------------------

    def _transform(self, chunks: Iterator[GuardIO], run_manager: CallbackManagerForChainRun,
                   config: RunnableConfig, upstream: Iterator[Any] | None = None
                   ) -> Iterator[GuardIO]:
        translator = self._translator(config)
        try:
            for item in chunks:
                step = translator.step(item)
                for name, data in step.events:
                    dispatch_custom_event(name, data, config=config)
                if translator.halt is not None:
                    stop = self._stop(translator)
                    _stop_upstream(upstream, stop)  # before the reader sees the halt chunk
                    yield from step.outputs
                    raise stop
                yield from step.outputs
            step = translator.finish()
            for name, data in step.events:
                dispatch_custom_event(name, data, config=config)
            yield from step.outputs
            if translator.halt is not None:
                raise self._stop(translator)
        finally:
            translator.abort("stream ended early")

    async def _atransform(self, chunks: AsyncIterator[GuardIO],
                          run_manager: AsyncCallbackManagerForChainRun, config: RunnableConfig,
                          upstream: AsyncIterator[Any] | None = None) -> AsyncIterator[GuardIO]:
        translator = self._translator(config)
        try:
            offload = self._streams_offload
            async for item in chunks:
                step = (await asyncio.to_thread(translator.step, item) if offload
                        else await translator.astep(item))
                for name, data in step.events:
                    await adispatch_custom_event(name, data, config=config)
                if translator.halt is not None:
                    stop = self._stop(translator)
                    await _astop_upstream(upstream, stop)
                    for out in step.outputs:
                        yield out
                    raise stop
                for out in step.outputs:
                    yield out
            step = (await asyncio.to_thread(translator.finish) if offload
                    else await translator.afinish())
            for name, data in step.events:
                await adispatch_custom_event(name, data, config=config)
            for out in step.outputs:
                yield out
            if translator.halt is not None:
                raise self._stop(translator)
        finally:
            translator.abort("stream ended early")

    def transform(self, input: Iterator[GuardIO], config: RunnableConfig | None = None,
                  **kwargs: Any) -> Iterator[GuardIO]:
        catching = start_catching(self._preparer(config))  # before the model starts: on our pull
        inner = cast(Generator[GuardIO, None, None], self._transform_stream_with_config(
            input, self._transform, config, upstream=input, **kwargs))
        try:
            for chunk in inner:  # noqa: UP028 - with `yield from`, a close reaches LangChain first
                yield chunk
        except StreamHalted:
            return
        except GeneratorExit:
            # The reader stopped early: stop the upstream first, or LangChain would drain it.
            _stop_upstream(input, _ReaderGone())
            inner.close()
            raise
        finally:
            stop_catching(catching)

    async def atransform(self, input: AsyncIterator[GuardIO], config: RunnableConfig | None = None,
                         **kwargs: Any) -> AsyncIterator[GuardIO]:
        catching = start_catching(self._preparer(config))
        inner = cast(AsyncGenerator[GuardIO, None], self._atransform_stream_with_config(
            input, self._atransform, config, upstream=input, **kwargs))
        stopped_early = True
        try:
            async for chunk in inner:
                yield chunk
            stopped_early = False
        except StreamHalted:
            return
        except GeneratorExit:
            await _astop_upstream(input, _ReaderGone())
            raise
        finally:
            await inner.aclose()
            if stopped_early:
                await _let_closes_run()
            stop_catching(catching)

    def stream(self, input: GuardIO, config: RunnableConfig | None = None,
               **kwargs: Any) -> Iterator[GuardIO]:
        yield from self.transform(iter([input]), config, **kwargs)

    async def astream(self, input: GuardIO, config: RunnableConfig | None = None,
                      **kwargs: Any) -> AsyncIterator[GuardIO]:
        async def one() -> AsyncIterator[GuardIO]:
            yield input

        async for chunk in self.atransform(one(), config, **kwargs):
            yield chunk


async def _let_closes_run() -> None:
    """Upstream async generators abandoned by the halt are closed by tasks the event loop
    schedules (their finalizer hook); give those a few turns before handing control back, so the
    model's HTTP response is closed even if the caller blocks right after."""
    for _ in range(CLOSE_TURNS):
        await asyncio.sleep(0)


class _ReaderGone(Exception):
    """Thrown into the upstream when the reader closed the guarded stream early."""


def _stop_upstream(upstream: Any, exc: BaseException) -> None:
    """Stop a sync upstream by raising in it: a chat model's stream closes its HTTP response on
    any exception, whereas a plain ``close()`` would let LangChain drain it for tracing."""
    throw = getattr(upstream, "throw", None)
    if throw is not None:
        try:
            throw(exc)
        except StopIteration:
            pass
        except BaseException as raised:
            if raised is not exc and not isinstance(raised, type(exc)):
                raise
    close = getattr(upstream, "close", None)
    if close is not None:
        close()


async def _astop_upstream(upstream: Any, exc: BaseException) -> None:
    athrow = getattr(upstream, "athrow", None)
    if athrow is not None:
        try:
            await athrow(exc)
        except StopAsyncIteration:
            pass
        except BaseException as raised:
            if raised is not exc and not isinstance(raised, type(exc)):
                raise
    aclose = getattr(upstream, "aclose", None)
    if aclose is not None:
        await aclose()
