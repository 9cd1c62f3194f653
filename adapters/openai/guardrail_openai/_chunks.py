"""Sans-I/O translation between OpenAI chat-completion shapes and guard sessions.

``ChunkGuard`` turns each upstream ``ChatCompletionChunk`` into the chunks the reader may see (text
held back by the policy is re-chunked into later, valid chunks), one session per choice index.
The sync and async streams drive it the same way; ``guard_completion`` does the non-streaming
case. Guard details ride along as an extra ``guardrail`` field on chunks and completions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.chat.chat_completion_chunk import Choice, ChoiceDelta, ChoiceLogprobs

from guardrail import (
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
)

from ._logprobs import LogprobFilter

__all__ = ["ChunkGuard", "guard_completion", "request_messages"]

CONTENT_FILTER: Literal["content_filter"] = "content_filter"
# Reasoning text (DeepSeek, vLLM, llama.cpp) is not judged by the guard, so it is never passed on.
REASONING_FIELDS = ("reasoning_content", "reasoning")


def _drop_reasoning(model: Any) -> None:
    extra = getattr(model, "model_extra", None)
    for name in REASONING_FIELDS:
        if extra:
            extra.pop(name, None)


def request_messages(messages: Iterable[Any] | None) -> list[dict[str, Any]]:
    """The request's messages as plain dicts (they may be TypedDicts, models or a generator)."""
    out: list[dict[str, Any]] = []
    for message in messages or ():
        if isinstance(message, Mapping):
            out.append(dict(message))
        elif hasattr(message, "model_dump"):
            out.append(message.model_dump(exclude_none=True))
        else:
            raise TypeError(f"messages: cannot read a {type(message).__name__} as a chat message")
    return out


def _token_logprobs(entries: Sequence[Any] | None) -> list[TokenLogprob] | None:
    if not entries:
        return None
    return [
        TokenLogprob(e.token, e.logprob, {t.token: t.logprob for t in (e.top_logprobs or ())})
        for e in entries
    ]


def _judged_text(choice: Choice) -> tuple[str, list[Any]]:
    """A choice delta's text and logprob entries as the guard judges them: content, then
    refusal text (the reader sees refusal text too, so it is judged the same)."""
    text = choice.delta.content or ""
    entries = list(choice.logprobs.content or ()) if choice.logprobs is not None else []
    if choice.delta.refusal:
        text += choice.delta.refusal
        if choice.logprobs is not None:
            entries += choice.logprobs.refusal or ()
    return text, entries


def _details(index: int, events: Iterable[Event]) -> list[dict[str, Any]]:
    return [{"choice": index, **event_to_dict(e)} for e in events if not isinstance(e, Release)]


def _not_halts(events: Iterable[Event]) -> list[Event]:
    return [e for e in events if not isinstance(e, Halt)]


@dataclass
class _ChoiceState:
    session: GuardSession
    # Upstream logprob entries wait with their text and go out only with text shown verbatim.
    logprobs: LogprobFilter = field(default_factory=LogprobFilter)
    report: Report | None = None
    halt: Halt | None = None
    # The model sent ``delta.refusal`` text: it is judged like content and released there.
    refusing: bool = False
    # Catch-up (on_chunks/aon_chunks): the events the session already gave each chunk's text,
    # by chunk position, and the report of an end it already took (afinish).
    fed: dict[int, list[Event]] = field(default_factory=dict)
    finished: Report | None = None

    @property
    def done(self) -> bool:
        return self.report is not None or self.halt is not None


class ChunkGuard:
    """Guards the choices of one streamed chat completion."""

    def __init__(self, guard: Guard, messages: Sequence[Mapping[str, Any]], *, choices: int = 1,
                 raise_on_halt: bool | None = None, metadata: Mapping[str, Any] | None = None,
                 prepared: Prepared | None = None) -> None:
        self.guard = guard
        self.messages = list(messages)
        self.expected_choices = max(1, choices)
        self.raise_on_halt = guard.policy.raise_on_halt if raise_on_halt is None else raise_on_halt
        self.metadata = dict(metadata or {})
        self.states: dict[int, _ChoiceState] = {}
        self.violation: GuardrailViolation | None = None
        self._template: ChatCompletionChunk | None = None
        # Flags wait for the next chunk that goes out (a chunk with no choices breaks readers).
        self._details: list[dict[str, Any]] = []
        # The conversation's read begun when the request went upstream (Guard.prepare): the
        # first choice's session takes it over; ``close`` frees it if none does.
        self._prepared = prepared

    # -- state -----------------------------------------------------------------------------

    @property
    def catch_up_limit(self) -> int:
        """The most upstream chunks a driver behind its upstream takes in one go
        (``on_chunks``): hold-back + 1, so it reads no further ahead than one read."""
        return self.guard.policy.release.hold_back_tokens + 1

    @property
    def halted_all(self) -> bool:
        """Nothing more from the upstream can reach the reader: the upstream can be closed.

        True once every choice the request asked for has halted, or once a choice halted and
        every choice seen so far has ended (halted or finished): choices stream interleaved, so
        one not seen by then is not coming (servers such as llama.cpp ignore ``n``)."""
        halted = sum(1 for s in self.states.values() if s.halt is not None)
        if halted >= self.expected_choices:
            return True
        return halted > 0 and all(s.done for s in self.states.values())

    @property
    def reports(self) -> dict[int, Report]:
        """Reports of the choices that ended so far, by choice index."""
        return {i: s.report for i, s in self.states.items() if s.report is not None}

    def _state(self, index: int) -> _ChoiceState:
        state = self.states.get(index)
        if state is None:
            prepared, self._prepared = self._prepared, None
            session = self.guard.session(self.messages, metadata={**self.metadata,
                                                                   "choice": index},
                                         prepared=prepared)
            state = self.states[index] = _ChoiceState(session)
        return state

    def close(self) -> None:
        """Free what was started for this request and not taken by a session (the upstream
        failed or sent no choice); ``on_end`` and ``abort`` call it too."""
        prepared, self._prepared = self._prepared, None
        if prepared is not None:
            prepared.close()

    # -- streaming -------------------------------------------------------------------------

    def on_chunks(self, chunks: Sequence[ChatCompletionChunk]) -> list[ChatCompletionChunk]:
        """``on_chunk`` over chunks that were all waiting (a driver behind its upstream): each
        choice's texts go to its session in one ``feed_many`` call, so the reads that come due
        share one forward; the reader gets what ``on_chunk`` chunk by chunk would give."""
        for state, steps in self._plan(chunks).values():
            for (pos, _), events in zip(steps, state.session.feed_many(
                    [step for _, step in steps]), strict=True):
                state.fed[pos] = events
        return self._rewrite_all(chunks)

    async def aon_chunks(self, chunks: Sequence[ChatCompletionChunk]
                         ) -> list[ChatCompletionChunk]:
        """``on_chunks`` for async drivers: the observer reads are awaited (``afeed_many``,
        ``afinish``), so the event loop runs while they are read."""
        plan = self._plan(chunks)
        for state, steps in plan.values():
            per_step = await state.session.afeed_many([step for _, step in steps])
            for (pos, _), events in zip(steps, per_step, strict=True):
                state.fed[pos] = events
        for pos, chunk in enumerate(chunks):  # a finish_reason ends its choice: read the rest
            for choice in chunk.choices:
                state = self.states[choice.index]
                halted = any(isinstance(e, Halt) for p, events in state.fed.items() if p <= pos
                             for e in events)
                if (choice.finish_reason is not None and not state.done and not halted
                        and state.finished is None and not state.session.closed):
                    state.finished = await state.session.afinish()
        return self._rewrite_all(chunks)

    async def aon_end(self) -> list[ChatCompletionChunk]:
        """``on_end`` for async drivers: each open choice's last read is awaited."""
        for state in self.states.values():
            if not state.done and state.finished is None and not state.session.closed:
                state.finished = await state.session.afinish()
        return self.on_end()

    def _plan(self, chunks: Sequence[ChatCompletionChunk]
              ) -> dict[int, tuple[_ChoiceState, list[tuple[int, StreamStep]]]]:
        """Per choice, the texts of ``chunks`` (position, step) up to the chunk that ends it."""
        plan: dict[int, tuple[_ChoiceState, list[tuple[int, StreamStep]]]] = {}
        ended: set[int] = set()
        for pos, chunk in enumerate(chunks):
            for choice in chunk.choices:
                state = self._state(choice.index)
                if state.done or choice.index in ended:
                    continue
                text, entries = _judged_text(choice)
                if text:
                    step = StreamStep(text=text, logprobs=_token_logprobs(entries))
                    plan.setdefault(choice.index, (state, []))[1].append((pos, step))
                if choice.finish_reason is not None:
                    ended.add(choice.index)
        return plan

    def _rewrite_all(self, chunks: Sequence[ChatCompletionChunk]) -> list[ChatCompletionChunk]:
        out: list[ChatCompletionChunk] = []
        try:
            for pos, chunk in enumerate(chunks):
                out += self.on_chunk(chunk, _pos=pos)
                if self.halted_all or self.violation is not None:
                    break  # as a driver stops taking chunks: the later ones are dropped
        finally:
            for state in self.states.values():
                state.fed.clear()
        return out

    def on_chunk(self, chunk: ChatCompletionChunk, *, _pos: int | None = None
                 ) -> list[ChatCompletionChunk]:
        """The chunks to hand the reader for one upstream chunk (possibly none)."""
        self._template = chunk
        if not chunk.choices:  # e.g. the usage chunk: nothing to judge
            return [chunk]
        kept: list[Choice] = []
        halts: list[int] = []
        for choice in chunk.choices:
            state = self._state(choice.index)
            if state.done:
                continue  # upstream output after a halt or a finish is dropped
            events = self._feed(state, choice, _pos)
            out = self._rewrite(state, choice, events)
            self._details += _details(choice.index, _not_halts(events))
            if out is not None:
                kept.append(out)
            if state.halt is not None and not self.raise_on_halt:
                halts.append(choice.index)
        result = []
        if kept:
            result.append(chunk.model_copy(update={"choices": kept, **self._take_details()}))
        return result + [self._halt_chunk(i, self.states[i]) for i in halts]

    def _take_details(self) -> dict[str, Any]:
        details, self._details = self._details, []
        return {"guardrail": {"events": details}} if details else {}

    def on_end(self) -> list[ChatCompletionChunk]:
        """The upstream ended: finish choices that never sent a finish_reason."""
        self.close()
        out: list[ChatCompletionChunk] = []
        template = self._template
        for index, state in sorted(self.states.items()):
            if state.done or template is None:
                continue
            events = self._finish(state)
            text = "".join(e.text for e in events if isinstance(e, Release))
            entries = self._released_logprobs(state, events)
            if text:
                field_name = "refusal" if state.refusing else "content"
                logprobs = ChoiceLogprobs(**{field_name: entries}) if entries else None
                choice = Choice(index=index, delta=ChoiceDelta(**{field_name: text}),
                                finish_reason=None, logprobs=logprobs)
                self._details += _details(index, _not_halts(events))
                out.append(self._make_chunk(template, choice))
            if state.halt is not None and not self.raise_on_halt:
                out.append(self._halt_chunk(index, state))
        return out

    def abort(self, reason: str) -> None:
        """The stream ended early (an error, or the reader closed it): end open sessions."""
        self.close()
        for state in self.states.values():
            if state.report is None and not state.session.closed:
                state.report = state.session.abort(reason)

    def _feed(self, state: _ChoiceState, choice: Choice, pos: int | None = None) -> list[Event]:
        text, entries = _judged_text(choice)
        if choice.delta.refusal:
            state.refusing = True
        events: list[Event] = []
        if text:
            state.logprobs.add(text, entries or None)
            if pos is not None:  # fed already, with the chunks around it (on_chunks)
                events = list(state.fed.get(pos, []))
            else:
                events = state.session.feed(StreamStep(text=text,
                                                       logprobs=_token_logprobs(entries)))
            self._note_halt(state, events)
        if choice.finish_reason is not None and state.halt is None:
            events += self._finish(state)
        return events

    def _finish(self, state: _ChoiceState) -> list[Event]:
        report = state.finished if state.finished is not None else state.session.finish()
        state.report = report
        self._note_halt(state, report.final_events)
        return list(report.final_events)

    def _note_halt(self, state: _ChoiceState, events: Iterable[Event]) -> None:
        for event in events:
            if isinstance(event, Halt):
                state.halt = event
                if state.report is None:
                    state.report = state.session.finish()
                if self.raise_on_halt and self.violation is None:
                    self.violation = GuardrailViolation(event, state.report)

    def _rewrite(self, state: _ChoiceState, choice: Choice, events: list[Event]) -> Choice | None:
        released = "".join(e.text for e in events if isinstance(e, Release))
        out = choice.model_copy(deep=True)
        _drop_reasoning(out.delta)
        original = choice.delta.content
        entries = self._released_logprobs(state, events)
        if state.halt is not None:
            out.finish_reason = None  # the halt chunk carries the finish reason
        if out.logprobs is None and entries:  # held back, released by a chunk without its own
            out.logprobs = ChoiceLogprobs()
        if state.refusing:
            out.delta.content = None if original is None else ""
            out.delta.refusal = released or None
            if out.logprobs is not None:
                out.logprobs.content, out.logprobs.refusal = None, entries or None
        else:
            out.delta.content = released or (None if original is None else "")
            if out.logprobs is not None:
                out.logprobs.content = entries or None
        delta = out.delta
        empty = (not delta.content and delta.role is None and not delta.tool_calls
                 and delta.function_call is None and delta.refusal is None
                 and out.finish_reason is None and not entries)
        return None if empty else out

    def _released_logprobs(self, state: _ChoiceState, events: list[Event]) -> list[Any]:
        state.logprobs.see(events)
        entries = state.logprobs.take()
        if state.halt is not None:
            state.logprobs.drop()
        return entries

    def _make_chunk(self, template: ChatCompletionChunk, choice: Choice) -> ChatCompletionChunk:
        return template.model_copy(update={"choices": [choice], "usage": None,
                                           **self._take_details()})

    def _halt_chunk(self, index: int, state: _ChoiceState) -> ChatCompletionChunk:
        assert state.halt is not None and self._template is not None
        choice = Choice(index=index, delta=ChoiceDelta(content=state.halt.notice),
                        finish_reason=CONTENT_FILTER, logprobs=None)
        self._details += _details(index, [state.halt])
        return self._make_chunk(self._template, choice)


def guard_completion(guard: Guard, completion: ChatCompletion,
                     messages: Sequence[Mapping[str, Any]], *, raise_on_halt: bool | None = None,
                     metadata: Mapping[str, Any] | None = None) -> ChatCompletion:
    """Guard a whole (non-streamed) completion: each choice's content is judged as one stream.

    On halt the content becomes the halt message, tool calls are dropped and ``finish_reason`` is
    ``content_filter``; otherwise the content is what the policy releases (redactions applied).
    """
    if raise_on_halt is None:
        raise_on_halt = guard.policy.raise_on_halt
    out = completion.model_copy(deep=True)
    details: list[dict[str, Any]] = []
    for choice in out.choices:
        _drop_reasoning(choice.message)
        # Refusal text reaches the reader like content, so it is judged the same way.
        for name in ("content", "refusal"):
            text = getattr(choice.message, name)
            if not text or choice.finish_reason == CONTENT_FILTER:
                continue
            session = guard.session(messages, metadata={**(metadata or {}),
                                                        "choice": choice.index})
            logprobs = choice.logprobs
            entries = getattr(logprobs, name) if logprobs is not None else None
            events = session.feed(StreamStep(text=text, logprobs=_token_logprobs(entries)))
            report = session.finish()
            events = [*events, *report.final_events]
            released_logprobs = LogprobFilter()
            released_logprobs.add(text, entries)
            released_logprobs.see(events)
            details += _details(choice.index, events)
            if report.halt is not None:
                if raise_on_halt:
                    raise GuardrailViolation(report.halt, report)
                choice.message.content = report.halt.message
                choice.message.refusal = None
                choice.message.tool_calls = None
                choice.message.function_call = None
                choice.finish_reason = CONTENT_FILTER
                choice.logprobs = None
            else:
                setattr(choice.message, name, report.released_text)
                if logprobs is not None:  # only entries of text shown verbatim
                    setattr(logprobs, name, released_logprobs.take() or None)
    if details:
        out = out.model_copy(update={"guardrail": {"events": details}})
    return out

