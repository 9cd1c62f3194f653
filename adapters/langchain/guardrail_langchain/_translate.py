"""Sans-I/O translation between LangChain stream items and a guard session.

``StreamTranslator.step(item)`` feeds one upstream item (a ``str`` or a message chunk) and returns
what the reader may see (items of the same kind, carrying only released text) plus the guard
events to dispatch. The sync and async transforms drive it the same way.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, BaseMessageChunk
from langchain_core.messages.tool import tool_call_chunk

from guardrail import (
    CONTENT_FILTER,
    Event,
    Guard,
    GuardrailViolation,
    GuardSession,
    Halt,
    Prepared,
    Release,
    Report,
    StreamStep,
    TokenLogprob,
    event_to_dict,
    normalize_messages,
    released_text,
)

__all__ = ["CONTENT_FILTER", "StreamTranslator", "item_text", "session_messages"]

EVENT_PREFIX = "guardrail."


def item_text(item: Any) -> str:
    """The text a stream item carries; raises ``TypeError`` for items a guard cannot read."""
    if isinstance(item, str):
        return item
    if isinstance(item, BaseMessage):
        return str(item.text)
    raise TypeError(
        f"GuardRunnable reads str or chat message (chunk) streams, got {type(item).__name__}; "
        "put it right after a chat model or a StrOutputParser"
    )


def session_messages(messages: Sequence[Any] | None) -> list[dict[str, Any]]:
    """Conversation context for the session, from dicts or LangChain messages (content parts
    and tool calls included): ``guardrail.normalize_messages``."""
    return list(normalize_messages(messages))


def _logprob_entries(item: Any) -> list[Mapping[str, Any]]:
    """OpenAI-style logprob entries a chat model put in ``response_metadata['logprobs']``."""
    meta = getattr(item, "response_metadata", None) or {}
    logprobs = meta.get("logprobs") if isinstance(meta, Mapping) else None
    content = logprobs.get("content") if isinstance(logprobs, Mapping) else None
    return list(content or ())


def _token_logprobs(entries: list[Mapping[str, Any]]) -> list[TokenLogprob] | None:
    out = []
    for entry in entries:
        top = {t["token"]: float(t["logprob"]) for t in entry.get("top_logprobs") or ()}
        out.append(TokenLogprob(str(entry["token"]), float(entry["logprob"]), top))
    return out or None


def _with_text(content: Any, text: str) -> Any:
    """``content`` with its text replaced by ``text`` (non-text blocks are kept)."""
    if isinstance(content, str):
        return text
    kept = [b for b in content if not (isinstance(b, str) or
                                      (isinstance(b, Mapping) and b.get("type") == "text"))]
    return ([{"type": "text", "text": text}] if text else []) + kept


def _as_chunk(message: BaseMessage) -> BaseMessageChunk:
    """A whole message as a chunk, so streamed outputs can be added up."""
    if isinstance(message, BaseMessageChunk):
        return message
    if isinstance(message, AIMessage):
        chunks = [tool_call_chunk(name=c["name"], args=json.dumps(c["args"]), id=c.get("id"),
                                  index=i) for i, c in enumerate(message.tool_calls)]
        return AIMessageChunk(content=message.content, id=message.id,
                              additional_kwargs=message.additional_kwargs,
                              response_metadata=message.response_metadata,
                              usage_metadata=message.usage_metadata, tool_call_chunks=chunks)
    return AIMessageChunk(content=message.content, id=message.id,
                          response_metadata=message.response_metadata)


@dataclass
class Step:
    """What one upstream item turned into."""

    outputs: list[Any] = field(default_factory=list)
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


class StreamTranslator:
    """One stream under guard, as LangChain items. ``messages`` may be a callable: the session
    opens, and reads the conversation, when the first item arrives (the model has started by
    then, see ``_conversation``)."""

    def __init__(self, guard: Guard,
                 messages: Sequence[Mapping[str, Any]] | Callable[[], Sequence[Mapping[str, Any]]],
                 *, raise_on_halt: bool | None = None,
                 prepared: Callable[[], Prepared | None] | None = None) -> None:
        self._guard = guard
        self._messages = messages
        self._take_prepared = prepared  # the conversation's read begun as the model started
        self._session: GuardSession | None = None
        self.raise_on_halt = guard.policy.raise_on_halt if raise_on_halt is None \
            else raise_on_halt
        self.halt: Halt | None = None
        self.report: Report | None = None
        self._template: BaseMessageChunk | None = None
        self._strings = False
        # Logprob entries wait with their text: (chars fed when they arrived, entry).
        self._fed_chars = 0
        self._released_chars = 0
        self._logprobs: deque[tuple[int, Mapping[str, Any]]] = deque()
        self._finished: Report | None = None  # an end already awaited (afinish)

    @property
    def session(self) -> GuardSession:
        if self._session is None:
            messages = self._messages() if callable(self._messages) else self._messages
            prepared = self._take_prepared() if self._take_prepared is not None else None
            if prepared is not None and prepared.messages != session_messages(messages):
                prepared.close()  # read for another conversation: not this stream's
                prepared = None
            self._session = self._guard.session(messages, metadata={"adapter": "langchain"},
                                                prepared=prepared)
        return self._session

    @property
    def violation(self) -> GuardrailViolation:
        assert self.halt is not None
        return GuardrailViolation(self.halt, self.report)

    # -- streaming -------------------------------------------------------------------------

    async def astep(self, item: Any) -> Step:
        """``step`` for async drivers: the session's observer reads are awaited (``afeed``,
        ``afinish``), so the event loop runs while they are read."""
        text = item_text(item)
        if self.report is not None or not text:
            fed = None
        else:
            fed = await self.session.afeed(StreamStep(
                text=text, logprobs=_token_logprobs(_logprob_entries(item))))
        last = getattr(item, "chunk_position", None) == "last"
        if last and self.report is None and not any(isinstance(e, Halt) for e in fed or ()):
            self._finished = await self.session.afinish()
        return self.step(item, _fed=fed)

    async def afinish(self) -> Step:
        """``finish`` for async drivers: the last read is awaited."""
        if self.report is None and self._session is not None and not self._session.closed:
            self._finished = await self.session.afinish()
        return self.finish()

    def step(self, item: Any, *, _fed: list[Event] | None = None) -> Step:
        text = item_text(item)
        step = Step()
        if self.report is not None:  # after a halt or the last chunk nothing more is read
            return step
        events: list[Event] = []
        if text:
            entries = _logprob_entries(item)
            self._fed_chars += len(text)
            self._logprobs.extend((self._fed_chars, e) for e in entries)
            events = _fed if _fed is not None else self.session.feed(
                StreamStep(text=text, logprobs=_token_logprobs(entries)))
        last = getattr(item, "chunk_position", None) == "last"
        if last and not self._halted(events):
            events += self._finish()
        self._collect(events, step)
        if isinstance(item, str):
            self._strings = True
            released = released_text(events)
            if released:
                step.outputs.append(released)
        else:
            chunk = self._rewrite(_as_chunk(item), events)
            if chunk is not None:
                step.outputs.append(chunk)
        self._halt_output(step)
        return step

    def finish(self) -> Step:
        """The upstream ended: release what is held (unless a last chunk did already)."""
        step = Step()
        if self.report is not None:
            return step
        events = self._finish()
        self._collect(events, step)
        released = released_text(events)
        if released:
            if self._strings or self._template is None:
                step.outputs.append(released)
            else:
                metadata = self._metadata(events)
                logprobs = self._release_logprobs(events)
                if logprobs:
                    metadata["logprobs"] = {"content": logprobs}
                step.outputs.append(AIMessageChunk(content=released, id=self._template.id,
                                                   response_metadata=metadata))
        self._halt_output(step)
        return step

    def abort(self, reason: str) -> None:
        if self.report is None and self._session is not None and not self._session.closed:
            self.report = self.session.abort(reason)

    # -- helpers ---------------------------------------------------------------------------

    def _finish(self) -> list[Event]:
        finished, self._finished = self._finished, None
        self.report = finished if finished is not None else self.session.finish()
        return list(self.report.final_events)

    def _halted(self, events: list[Event]) -> bool:
        for event in events:
            if isinstance(event, Halt):
                self.halt = event
                if self.report is None:
                    self.report = self.session.finish()
        return self.halt is not None

    def _collect(self, events: list[Event], step: Step) -> None:
        self._halted(events)
        for event in events:
            if not isinstance(event, Release):
                data = event_to_dict(event)
                data["session_id"] = self.session.id
                step.events.append((EVENT_PREFIX + data["kind"], data))

    @staticmethod
    def _metadata(events: list[Event]) -> dict[str, Any]:
        details = [event_to_dict(e) for e in events
                   if not isinstance(e, (Release, Halt))]
        return {"guardrail": {"events": details}} if details else {}

    def _rewrite(self, chunk: BaseMessageChunk, events: list[Event]) -> BaseMessageChunk | None:
        self._template = self._template or chunk
        released = released_text(events)
        metadata = {**chunk.response_metadata, **self._metadata(events)}
        metadata.pop("logprobs", None)  # they go out with their text, below
        released_logprobs = self._release_logprobs(events)
        if released_logprobs:
            metadata["logprobs"] = {"content": released_logprobs}
        if self.halt is not None:
            metadata.pop("finish_reason", None)  # the halt chunk carries the finish reason
        update: dict[str, Any] = {"content": _with_text(chunk.content, released),
                                  "response_metadata": metadata}
        if self.halt is not None and isinstance(chunk, AIMessageChunk):
            update["chunk_position"] = None
        out = chunk.model_copy(update=update)
        carries = (released or metadata or out.additional_kwargs
                   or getattr(out, "tool_call_chunks", None) or getattr(out, "usage_metadata", None)
                   or getattr(out, "chunk_position", None))
        return out if carries else None

    def _release_logprobs(self, events: list[Event]) -> list[Mapping[str, Any]]:
        for event in events:
            if isinstance(event, Release):
                self._released_chars = max(self._released_chars, event.end)
        if self.halt is not None:
            self._logprobs.clear()
            return []
        everything = self.report is not None
        out = []
        while self._logprobs and (everything or self._logprobs[0][0] <= self._released_chars):
            out.append(self._logprobs.popleft()[1])
        return out

    def _halt_output(self, step: Step) -> None:
        if self.halt is None or self.raise_on_halt:
            return
        if self._strings or self._template is None:
            step.outputs.append(self.halt.notice)
            return
        step.outputs.append(AIMessageChunk(
            content=self.halt.notice,
            id=self._template.id,
            response_metadata={"finish_reason": CONTENT_FILTER,
                               "guardrail": {"halt": event_to_dict(self.halt)}},
            chunk_position="last",
        ))


def guard_whole(translator: StreamTranslator, item: Any) -> tuple[Any, list[tuple[str, Any]]]:
    """Guard a complete ``str`` or message (``invoke``): on halt the content becomes the halt
    message (tool calls dropped, ``finish_reason`` ``content_filter``); otherwise the released
    text (redactions applied)."""
    text = item_text(item)
    entries = _logprob_entries(item)
    events = translator.session.feed(StreamStep(text=text, logprobs=_token_logprobs(entries))) \
        if text else []
    step = Step()
    if not translator._halted(events):
        events += translator._finish()
    translator._collect(events, step)
    report = translator.report
    assert report is not None
    halt = translator.halt
    if halt is not None and translator.raise_on_halt:
        raise translator.violation
    if isinstance(item, str):
        return (halt.message if halt is not None else report.released_text), step.events
    assert isinstance(item, BaseMessage)
    metadata = {**item.response_metadata, **translator._metadata(events)}
    update: dict[str, Any] = {"response_metadata": metadata}
    if halt is not None:
        metadata["finish_reason"] = CONTENT_FILTER
        metadata["guardrail"] = {**metadata.get("guardrail", {}), "halt": event_to_dict(halt)}
        metadata.pop("logprobs", None)
        update["content"] = halt.message
        if isinstance(item, AIMessage):
            update.update(tool_calls=[], invalid_tool_calls=[])
            if isinstance(item, AIMessageChunk):
                update["tool_call_chunks"] = []
    else:
        update["content"] = _with_text(item.content, report.released_text)
    return item.model_copy(update=update), step.events
