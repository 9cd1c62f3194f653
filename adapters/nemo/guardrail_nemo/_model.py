"""``GuardedChatModel``: a LangChain chat model that guards another one token by token.

NeMo's output rails run once per ``chunk_size`` deltas, so up to a window of text reaches the
reader before a block (``stream_first: True``) or nothing streams until a window is checked
(``False``). Passing ``LLMRails(config, llm=GuardedChatModel(inner=..., guard=...))`` puts our
session in front of NeMo instead: NeMo's streaming handler only receives text our policy released,
a halt ends the answer with the halt message right at the token that fired and closes the inner
model's stream (its HTTP response), and NeMo's own rails still run over what is left.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import ConfigDict, Field

from guardrail import (
    CONTENT_FILTER,
    Guard,
    GuardSession,
    Halt,
    event_to_dict,
    halt_of,
    normalize_messages,
    released_text,
)

__all__ = ["GuardedChatModel"]


class GuardedChatModel(BaseChatModel):
    """Streams ``inner``'s answer through a guard session; text comes out as the policy releases
    it and a halt ends the answer with the halt message (``finish_reason: content_filter`` and
    the guard's events in ``response_metadata``)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    inner: BaseChatModel
    guard: Guard = Field(exclude=True)

    @property
    def _llm_type(self) -> str:
        return f"guarded-{self.inner._llm_type}"

    def _session(self, messages: list[BaseMessage]) -> GuardSession:
        return self.guard.session(normalize_messages(messages))

    # -- whole answers ---------------------------------------------------------------------

    def _judged(self, session: GuardSession, text: str) -> ChatResult:
        session.feed(text)
        report = session.finish()
        if report.halt is not None:
            message = AIMessage(content=report.halt.message, response_metadata={
                "finish_reason": CONTENT_FILTER, "guardrail": event_to_dict(report.halt)})
        else:
            message = AIMessage(content=report.released_text)
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any
                  ) -> ChatResult:
        answer = self.inner.invoke(messages, stop=stop, **kwargs)
        return self._judged(self._session(messages), str(answer.content))

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None,
                         **kwargs: Any) -> ChatResult:
        answer = await self.inner.ainvoke(messages, stop=stop, **kwargs)
        return self._judged(self._session(messages), str(answer.content))

    # -- streams ---------------------------------------------------------------------------

    @staticmethod
    def _chunk(text: str, halt: Halt | None = None) -> ChatGenerationChunk:
        metadata = ({"finish_reason": CONTENT_FILTER, "guardrail": event_to_dict(halt)}
                    if halt is not None else {})
        return ChatGenerationChunk(message=AIMessageChunk(content=text,
                                                          response_metadata=metadata))

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any
                ) -> Iterator[ChatGenerationChunk]:
        session = self._session(messages)
        upstream = self.inner.stream(messages, stop=stop, **kwargs)
        try:
            for piece in upstream:
                events = session.feed(str(piece.content))
                halt = halt_of(events)
                out = [self._chunk(t) for t in (released_text(events),) if t]
                if halt is not None:
                    out.append(self._chunk(halt.notice, halt))
                for chunk in out:
                    if run_manager:
                        run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                    yield chunk
                if halt is not None:
                    return
            report = session.finish()
            tail = [self._chunk(t) for t in (released_text(report.final_events),) if t]
            if report.halt is not None:
                tail.append(self._chunk(report.halt.notice, report.halt))
            for chunk in tail:
                if run_manager:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
        finally:
            close = getattr(upstream, "close", None)
            if close is not None:
                close()  # stops the inner model's HTTP stream after a halt
            if not session.closed:
                session.abort("stream closed early")

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any
                       ) -> AsyncIterator[ChatGenerationChunk]:
        session = self._session(messages)
        upstream = self.inner.astream(messages, stop=stop, **kwargs)
        try:
            async for piece in upstream:
                events = session.feed(str(piece.content))
                halt = halt_of(events)
                out = [self._chunk(t) for t in (released_text(events),) if t]
                if halt is not None:
                    out.append(self._chunk(halt.notice, halt))
                for chunk in out:
                    if run_manager:
                        await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                    yield chunk
                if halt is not None:
                    return
            report = session.finish()
            tail = [self._chunk(t) for t in (released_text(report.final_events),) if t]
            if report.halt is not None:
                tail.append(self._chunk(report.halt.notice, report.halt))
            for chunk in tail:
                if run_manager:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
        finally:
            aclose = getattr(upstream, "aclose", None)
            if aclose is not None:
                await aclose()  # stops the inner model's HTTP stream after a halt
            if not session.closed:
                session.abort("stream closed early")
