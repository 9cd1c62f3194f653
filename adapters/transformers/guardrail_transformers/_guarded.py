"""Guarded local generation: the generator feeds a guard session its own tokens, hidden states
and logits, the session's events come back, a halt stops generation before the next forward, and
a route hands the token to a larger local model.

The loop is written once as a sync generator of events; the async driver runs it step by step in
a worker thread.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from guardrail.events import Event, Halt, Release, Route
from guardrail.guard import Guard
from guardrail.session import GuardSession, Report
from guardrail.stream import StreamStep

from ._athread import iterate_in_thread
from ._decoding import Decoding
from ._generator import (
    DEFAULT_MAX_NEW_TOKENS,
    LocalGenerator,
    Prompt,
    as_messages,
    default_generator,
)
from ._routing import LargeSide
from ._sampling import Sampler
from ._steps import StopFilter

__all__ = ["GuardedOutput", "GuardedStream", "aguarded_generate", "guarded_generate",
           "guarded_stream"]


@dataclass
class GuardedOutput:
    """A finished guarded answer. ``text`` is what the reader saw: the released text, then the
    halt message when the guard halted."""

    text: str
    report: Report
    events: list[Event] = field(default_factory=list)

    @property
    def halted(self) -> bool:
        return self.report.halted

    @property
    def released_text(self) -> str:
        return self.report.released_text


class GuardedStream:
    """One guarded answer as a stream of events (``Release``, ``Flag``, ``Halt``, ``Route``,
    ``Error``); iterate it with ``for`` or ``async for``. Show each ``Release.text`` as it comes
    and a ``Halt.notice`` (the message, set apart) in place of the rest. ``report`` is set once
    the stream has ended;
    ``generated_tokens`` counts the tokens the models produced; ``token_ids`` is the answer so
    far; ``routed_tokens`` the indices of the tokens a route target wrote (a route monitor that
    fires again on the target's own token keeps it, and the report lists the route once)."""

    def __init__(self, guard: Guard, prompt: Prompt, generator: LocalGenerator, *,
                 route_to: LocalGenerator | Mapping[str, LocalGenerator] | None = None,
                 session: GuardSession | None = None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 stop: str | Sequence[str] | None = None) -> None:
        self.guard = guard
        self.generator = generator
        self.messages = as_messages(prompt)
        self.session = session or guard.session(self.messages, can_route=route_to is not None)
        self.large = LargeSide(generator, route_to, self.messages) if route_to is not None else None
        self.max_new_tokens = max_new_tokens
        self.sampler = Sampler(temperature, top_p, seed)
        self.stops = StopFilter(stop)
        self.report: Report | None = None
        self.generated_tokens = 0
        self.token_ids: list[int] = []
        self._routed: set[int] = set()
        self._started = False
        self._ended = False  # the large model ended the answer during a route

    def __iter__(self) -> Generator[Event, None, None]:
        if self._started:
            raise RuntimeError("a GuardedStream can be iterated once")
        self._started = True
        return self._events()

    @property
    def routed_tokens(self) -> list[int]:
        return sorted(i for i in self._routed if i < len(self.token_ids))

    async def __aiter__(self) -> AsyncIterator[Event]:
        async for event in iterate_in_thread(iter(self)):
            yield event

    # -- the loop ------------------------------------------------------------------------------

    def _events(self) -> Generator[Event, None, None]:
        session = self.session
        try:
            decoding = self.generator.decoding(self.messages, self.guard.needs)
            self.token_ids = decoding.response_ids
            while (len(decoding.response_ids) < self.max_new_tokens and not self.stops.done
                   and session.halted is None):
                token = decoding.propose(self.sampler)
                if token in self.generator.eos_ids:
                    break
                self.generated_tokens += 1
                for step in self.stops.feed(decoding.take(token)):
                    yield from self._feed(step, decoding)
                    if session.halted is not None or self._ended:
                        break
                if self._ended:
                    break
            if session.halted is None:
                for step in self.stops.flush():
                    yield from self._feed(step, decoding)
            report = session.finish()
            self.report = report
            yield from report.final_events
        finally:
            if not session.closed:  # the consumer left early, or generation failed
                self.report = session.abort("generation stopped before the end of the answer")

    def _feed(self, step: StreamStep, decoding: Decoding) -> Iterator[Event]:
        """Feed one step; carry out routes until the session accepts what it was fed."""
        session = self.session
        events = session.feed(step)
        while True:
            yield from events
            route = session.route_pending
            if route is None or session.halted is not None:
                return
            replacement = self._route(route, decoding)
            if replacement is None:
                return
            events = session.feed(replacement)

    def _route(self, route: Route, decoding: Decoding) -> StreamStep | None:
        """Carry out ``route``: the large model writes token ``route.at``. Returns its step, or
        ``None`` when nothing is left to feed."""
        assert self.large is not None
        session = self.session
        self.stops.clear()  # held steps come after the cut
        if route.at in self._routed:  # the router fired again on the large model's own token
            session.reroute(session.token_offsets()[route.at][1])
            if len(decoding.response_ids) > route.at + 1:
                decoding.rewind(route.at + 1)
            return None
        session.reroute(route.at_char)
        decoding.rewind(route.at)
        logits = self.large.next_logits(route.target, decoding.response_ids)
        token = self.sampler(logits)
        self._routed.add(route.at)
        if token in self.large.eos_ids:
            self._ended = True
            return None
        self.generated_tokens += 1
        return decoding.take(token)


def guarded_stream(guard: Guard, prompt: Prompt | None = None, *,
                   messages: Sequence[Mapping[str, Any]] | None = None,
                   generator: LocalGenerator | None = None, **options: Any) -> GuardedStream:
    """A guarded answer from a local model, as a stream of events (see ``GuardedStream``).

    Give ``prompt`` (a user message) or ``messages``. ``generator`` defaults to the embedded
    SmolLM2. ``options``: ``max_new_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop``,
    ``route_to`` (a ``LocalGenerator``, or one per route target model name: turns the policy's
    ``route`` actions into token-level handovers), ``session`` (a session from
    ``guard.session()`` to drive instead of a new one)."""
    return GuardedStream(guard, _prompt(prompt, messages), generator or default_generator(),
                         **options)


def guarded_generate(guard: Guard, prompt: Prompt | None = None, **options: Any
                     ) -> GuardedOutput:
    """Generate a whole guarded answer (see ``guarded_stream`` for the options)."""
    stream = guarded_stream(guard, prompt, **options)
    return _collect(stream, list(stream))


async def aguarded_generate(guard: Guard, prompt: Prompt | None = None, **options: Any
                            ) -> GuardedOutput:
    """``guarded_generate`` for async code (generation runs in a worker thread)."""
    stream = guarded_stream(guard, prompt, **options)
    return _collect(stream, [event async for event in stream])


def _collect(stream: GuardedStream, events: list[Event]) -> GuardedOutput:
    assert stream.report is not None
    shown = [e.text for e in events if isinstance(e, Release)]
    shown += [e.notice for e in events if isinstance(e, Halt)]
    return GuardedOutput("".join(shown), stream.report, events)


def _prompt(prompt: Prompt | None, messages: Sequence[Mapping[str, Any]] | None) -> Prompt:
    if (prompt is None) == (messages is None):
        raise TypeError("give exactly one of prompt or messages")
    return prompt if prompt is not None else list(messages or [])

