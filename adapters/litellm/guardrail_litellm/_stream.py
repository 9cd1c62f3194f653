"""Sans-I/O translation between LiteLLM's streamed chunks and guard sessions.

LiteLLM hands a guardrail ``ModelResponseStream`` chunks (OpenAI chunk shape: ``choices[i].delta
.content``, ``finish_reason``). ``StreamGuard`` keeps one session per choice index, rewrites each
chunk's content to what the policy releases (hold-back text moves into later chunks), and notes a
halt so the hook can close the upstream and raise. Works on any object of that shape, so it needs
no LiteLLM import and is tested without it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from guardrail import (
    Event,
    Flag,
    Guard,
    GuardSession,
    Halt,
    Release,
    Report,
    event_to_dict,
    normalize_messages,
    released_text,
)

__all__ = ["StreamGuard", "guard_text", "request_messages"]


def request_messages(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The chat messages of a LiteLLM request body in the guard's form
    (``guardrail.normalize_messages``: content parts, tool calls and models read as text)."""
    return list(normalize_messages(data.get("messages") or ()))


@dataclass
class _Choice:
    session: GuardSession
    report: Report | None = None


@dataclass
class StreamGuard:
    """Guards one streamed response: call ``on_chunk`` per upstream chunk, ``on_end`` at the end.

    After a halt, ``halt`` is set: the caller stops reading the upstream and closes it.
    """

    guard: Guard
    messages: Sequence[Mapping[str, Any]] = ()
    metadata: Mapping[str, Any] = field(default_factory=dict)
    halt: Halt | None = None
    events: list[Event] = field(default_factory=list)
    _choices: dict[int, _Choice] = field(default_factory=dict)

    def _choice(self, index: int) -> _Choice:
        if index not in self._choices:
            session = self.guard.session(list(self.messages),
                                         metadata={**self.metadata, "choice": index})
            self._choices[index] = _Choice(session)
        return self._choices[index]

    @property
    def reports(self) -> dict[int, Report]:
        """Reports of the choices that have ended, by choice index."""
        return {i: c.report for i, c in self._choices.items() if c.report is not None}

    @property
    def flags(self) -> list[Flag]:
        return [e for e in self.events if isinstance(e, Flag)]

    def on_chunk(self, chunk: Any) -> Any | None:
        """The chunk to send on (content replaced by the released text), or None to drop it.

        The chunk is modified in place, as LiteLLM's own guardrails do."""
        choices = getattr(chunk, "choices", None)
        if not choices or self.halt is not None:
            return None if self.halt is not None else chunk
        kept = []
        for choice in choices:
            state = self._choice(getattr(choice, "index", 0) or 0)
            delta = getattr(choice, "delta", None)
            text = getattr(delta, "content", None) if delta is not None else None
            events: list[Event] = []
            if state.report is None:
                if isinstance(text, str) and text:
                    events += state.session.feed(text)
                if getattr(choice, "finish_reason", None) and not state.session.closed:
                    events += self._finish(state)
            self._note(events)
            if self.halt is not None:
                if not state.session.closed:
                    state.report = state.session.finish()  # a halted session reports its halt
                self.abort("another choice halted")
                return None  # the hook raises; nothing of this chunk goes out
            released = released_text(events)
            if delta is not None and (text is not None or released):
                delta.content = released
            if released or not _empty(choice):
                kept.append(choice)
        if not kept:
            return None
        chunk.choices = kept
        return chunk

    def on_end(self) -> dict[int, str]:
        """The upstream ended: finish choices that sent no finish_reason. Returns the text each
        still releases (the held-back tail), by choice index; sets ``halt`` if one halts."""
        tails: dict[int, str] = {}
        for index, state in sorted(self._choices.items()):
            if state.report is not None or state.session.closed or self.halt is not None:
                continue
            events = self._finish(state)
            self._note(events)
            text = released_text(events)
            if self.halt is not None:
                self.abort("another choice halted")
                return {}
            if text:
                tails[index] = text
        return tails

    def abort(self, reason: str) -> None:
        """The stream ended early (an error, the client left): end the open sessions."""
        for state in self._choices.values():
            if not state.session.closed:
                state.report = state.session.abort(reason)

    def summary(self) -> dict[str, Any]:
        """What the guard decided, as JSON (for LiteLLM's guardrail logging)."""
        return {
            "halted": self.halt is not None,
            "events": [event_to_dict(e) for e in self.events if not isinstance(e, Release)],
            "leaked_tokens": {i: r.leaked_tokens for i, r in self.reports.items()},
        }

    def _finish(self, state: _Choice) -> list[Event]:
        report = state.session.finish()
        state.report = report
        return list(report.final_events)

    def _note(self, events: Iterable[Event]) -> None:
        for event in events:
            if not isinstance(event, Release):
                self.events.append(event)
            if isinstance(event, Halt) and self.halt is None:
                self.halt = event


def _empty(choice: Any) -> bool:
    """A choice that carries nothing once its text is held back (no role, tools, finish)."""
    delta = getattr(choice, "delta", None)
    if getattr(choice, "finish_reason", None):
        return False
    if delta is None:
        return True
    return not (getattr(delta, "role", None) or getattr(delta, "tool_calls", None)
                or getattr(delta, "function_call", None))


def guard_text(guard: Guard, text: str, messages: Sequence[Mapping[str, Any]] = (),
               metadata: Mapping[str, Any] | None = None) -> Report:
    """Judge a whole (non-streamed) answer as one stream; the report's ``released_text`` is what
    the reader may see (redactions applied) unless ``report.halt`` is set."""
    session = guard.session(list(messages), metadata=dict(metadata or {}))
    session.feed(text)
    return session.finish()
