"""Routing between two OpenAI-compatible endpoints in one seamless stream.

The small model streams the answer through a guard session that may route. When a ``route``
verdict fires, the small model's stream is closed (``stream.close()``: the upstream stops
generating), the large endpoint continues the same answer from the released prefix for one
segment (to the end of the sentence, or ``max_tokens``, as the policy's ``route_to`` says), and the
small model resumes from the new prefix. The reader sees one stream of text.

Continuing "from the prefix" needs the server to prefill the answer so far. Two ways:

- ``prefill="chat"`` (default): the conversation with the answer so far as a final assistant
  message. Only servers that continue that message prefill (vLLM with ``continue_final_message``
  and ``add_generation_prompt`` false); llama-cpp-python's server and OpenAI start a new answer
  instead, and each segment then repeats the answer from its start (seen on a real
  llama-cpp-python server, 0.3.36).
- ``prefill="completions"``: the legacy ``/v1/completions`` API with the conversation rendered by
  the model's chat template (``render``; default: the guard's observer tokenizer, right when the
  upstream serves the observer's model) and the answer so far appended. Any server with that
  endpoint continues the text exactly.

Routes the session proposes while the large model writes its segment are not acted on (the
session's ``can_route`` is off during a segment), and ``max_routes`` bounds the segments of one
answer.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from guardrail.events import Event, Halt, Release, Route
from guardrail.guard import Guard
from guardrail.monitor import Message
from guardrail.session import GuardSession, Report

from .sentences import sentence_end

__all__ = ["RemoteRouter", "RoutedSegment"]


@dataclass
class RoutedSegment:
    """A part of the answer the large endpoint wrote: char offsets into the answer."""

    start: int
    end: int
    text: str
    monitor: str
    score: float


@dataclass
class RemoteRouter:
    """Drive a small and a large OpenAI-compatible client for one answer at a time.

    ``stream(messages)`` yields the released text; afterwards ``report`` is the session's report
    and ``segments`` lists what the large model wrote. ``prefill`` and ``render``: see the
    module docstring."""

    guard: Guard
    small_client: Any
    small_model: str
    large_client: Any
    large_model: str
    max_routes: int = 8
    request_options: dict[str, Any] = field(default_factory=dict)
    report: Report | None = None
    segments: list[RoutedSegment] = field(default_factory=list)
    prefill: str = "chat"
    render: Callable[[Sequence[Message]], str] | None = None

    def __post_init__(self) -> None:
        if self.prefill not in ("chat", "completions"):
            raise ValueError(f"prefill {self.prefill!r}: expected 'chat' or 'completions'")
        if self.prefill == "completions" and self.render is None:
            tokenizer = getattr(self.guard.observer, "hf_tokenizer", None)
            if tokenizer is None or not getattr(tokenizer, "chat_template", None):
                raise ValueError("prefill='completions' needs render=: a function from the "
                                 "messages to the prompt text (the served model's chat template);"
                                 " the guard's observer has no chat template to default to")
            self.render = lambda messages: str(tokenizer.apply_chat_template(
                [dict(m) for m in messages], add_generation_prompt=True, tokenize=False))

    def stream(self, messages: Sequence[Message]) -> Iterator[str]:
        self.segments = []
        session = self.guard.session(list(messages), can_route=True)
        routes_left = self.max_routes
        try:
            while True:
                route = yield from self._small_part(session, messages)
                if route is None or session.halted is not None:
                    break
                session.reroute(route.at_char)
                if routes_left <= 0:  # out of segments: the small model carries on alone
                    session.can_route = False
                    continue
                routes_left -= 1
                yield from self._large_segment(session, messages, route)
                if session.halted is not None:
                    break
            self.report = session.finish()
            yield from _released(self.report.final_events)
        except BaseException:
            if not session.closed:
                self.report = session.abort("stream closed early")
            raise

    def _request(self, client: Any, model: str, messages: Sequence[Message], prefix: str,
                 **options: Any) -> Any:
        options = {**self.request_options, **options}
        if self.prefill == "completions":
            assert self.render is not None, "__post_init__ sets it"
            return client.completions.create(model=model, prompt=self.render(messages) + prefix,
                                             stream=True, **options)
        conversation = list(messages)
        if prefix:
            conversation.append({"role": "assistant", "content": prefix})
        return client.chat.completions.create(model=model, messages=conversation, stream=True,
                                              **options)

    def _small_part(self, session: GuardSession,
                    messages: Sequence[Message]) -> Generator[str, None, Route | None]:
        """Stream the small model from the current prefix until it ends, halts or routes; the
        generator's return value is the route (or None)."""
        upstream = self._request(self.small_client, self.small_model, messages, session.text)
        try:
            for chunk in upstream:
                delta = _delta(chunk)
                if not delta:
                    continue
                events = session.feed(delta)
                yield from _released(events)
                if any(isinstance(e, Halt) for e in events):
                    return None
                route = next((e for e in events if isinstance(e, Route)), None)
                if route is not None and session.route_pending is not None:
                    return route
            return None
        finally:
            upstream.close()  # `break` would leave the upstream generating

    def _large_segment(self, session: GuardSession, messages: Sequence[Message],
                       route: Route) -> Iterator[str]:
        """The large model writes one segment from the prefix; it goes through the session (every
        other monitor still reads it) with routing off."""
        target = route.target
        until, max_tokens = target.get("until", "sentence"), int(target.get("max_tokens", 32))
        start = len(session.text)
        upstream = self._request(self.large_client, self.large_model, messages, session.text,
                                 max_tokens=max_tokens)
        session.can_route = False
        try:
            for chunk in upstream:
                delta = _delta(chunk)
                if not delta:
                    continue
                cut = _sentence_cut(delta) if until == "sentence" else None
                piece = delta if cut is None else delta[:cut]
                events = session.feed(piece)
                yield from _released(events)
                if cut is not None or any(isinstance(e, Halt) for e in events):
                    break
        finally:
            upstream.close()
            session.can_route = True
        self.segments.append(RoutedSegment(start, len(session.text), session.text[start:],
                                           route.monitor, route.score))


def _delta(chunk: Any) -> str:
    """The new text of a chat chunk (``delta.content``) or a text-completion chunk (``text``)."""
    choices = getattr(chunk, "choices", None) or []
    if not choices:
        return ""
    delta = getattr(choices[0], "delta", None)
    if delta is not None:
        return getattr(delta, "content", None) or ""
    return getattr(choices[0], "text", None) or ""


def _sentence_cut(delta: str) -> int | None:
    """Offset just after the first sentence end in ``delta`` (None when it has none)."""
    for i, ch in enumerate(delta):
        if sentence_end(ch):
            return i + 1
    return None


def _released(events: Sequence[Event]) -> Iterator[str]:
    for event in events:
        if isinstance(event, Release) and event.text:
            yield event.text
