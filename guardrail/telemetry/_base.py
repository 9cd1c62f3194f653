"""``GuardListener``: a hook plugin bound to one Guard, plus per-read timings.

The session hooks say what happened (starts, events, ends); they do not say how long each observer
read or monitor update took. ``attach`` therefore also wraps the guard's observer and monitors
once, in place, with thin timers that call ``on_read`` / ``on_update`` on every attached
listener. A read or update is tied to its session through the conversation list the session
hands to ``Observer.start`` and ``Monitor.start`` (``session.messages``, by identity).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, cast

from ..errors import GuardrailError
from ..hookspecs import hookimpl
from ..monitor import Monitor

if TYPE_CHECKING:
    from ..events import Event
    from ..guard import Guard
    from ..monitor import Features, Message, MonitorContext, Needs, Score
    from ..session import GuardSession, Report
    from ..stream import TokenSpan

__all__ = ["GuardListener"]


class GuardListener:
    """Base of the telemetry plugins: gets the session hooks and read timings of one Guard.

    Subclasses override ``started``, ``event``, ``ended``, ``observer_read`` and
    ``monitor_update``; each is called only for sessions of the attached guard (a plugin host
    may serve several guards). ``attach(guard)`` registers the listener on ``guard.host``;
    ``detach()`` removes it.
    """

    def __init__(self) -> None:
        self.guard: Guard | None = None
        self._name: str | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def attach(self, guard: Guard) -> GuardListener:
        if self.guard is not None:
            raise GuardrailError(f"{type(self).__name__} is already attached to a guard")
        self.guard = guard
        _Timers.of(guard).listeners.append(self)
        self._name = guard.host.register(self, f"{type(self).__name__}-{id(self):x}")
        return self

    def detach(self) -> None:
        if self.guard is None:
            return
        if self._name is not None:
            self.guard.host.unregister(self._name)
        timers = _Timers.of(self.guard)
        if self in timers.listeners:
            timers.listeners.remove(self)
        self.guard = self._name = None

    # -- for subclasses ----------------------------------------------------------------------

    def started(self, session: GuardSession) -> None:
        """A stream of this guard started."""

    def event(self, event: Event, session: GuardSession) -> None:
        """An event of one of this guard's streams (releases included)."""

    def ended(self, session: GuardSession, report: Report) -> None:
        """A stream of this guard ended."""

    def observer_read(self, session: GuardSession | None, tokens: int, start_ns: int,
                      end_ns: int) -> None:
        """One observer forward over ``tokens`` new tokens (``session`` None when unknown)."""

    def monitor_update(self, session: GuardSession | None, monitor: str, tokens: int,
                       seconds: float) -> None:
        """One ``Monitor.update`` call over ``tokens`` tokens."""

    # -- hooks (pluggy) ----------------------------------------------------------------------

    @hookimpl
    def guardrail_session_start(self, session: GuardSession) -> None:
        if session.guard is self.guard:
            _Timers.of(session.guard).opened(session)
            self.started(session)

    @hookimpl
    def guardrail_on_event(self, event: Event, session: GuardSession) -> None:
        if session.guard is self.guard:
            self.event(event, session)

    @hookimpl
    def guardrail_session_end(self, session: GuardSession, report: Report) -> None:
        if session.guard is self.guard:
            self.ended(session, report)
            _Timers.of(session.guard).closed(session)


class _Timers:
    """The timing wrappers installed on one guard, shared by all its listeners."""

    def __init__(self) -> None:
        self.listeners: list[GuardListener] = []
        self._lock = threading.Lock()
        self._by_messages: dict[int, GuardSession] = {}
        self._by_state: dict[int, GuardSession] = {}
        self._states: dict[int, list[int]] = {}  # session id() -> state ids to forget at its end

    @classmethod
    def of(cls, guard: Guard) -> _Timers:
        timers: _Timers | None = getattr(guard, "_telemetry_timers", None)
        if timers is None:
            timers = cls()
            guard._telemetry_timers = timers  # type: ignore[attr-defined]
            if guard.observer is not None:
                guard.observer = _TimedObserver(guard.observer, timers)
            # Duck-typed stand-ins: the session only calls the Monitor methods they forward.
            guard.monitors = [(spec, cast(Monitor, _TimedMonitor(monitor, spec.id, timers)))
                              for spec, monitor in guard.monitors]
        return timers

    # Sessions register once, however many listeners see them; ``closed`` likewise.
    def opened(self, session: GuardSession) -> None:
        with self._lock:
            self._by_messages[id(session.messages)] = session

    def closed(self, session: GuardSession) -> None:
        with self._lock:
            self._by_messages.pop(id(session.messages), None)
            for state in self._states.pop(id(session), ()):
                self._by_state.pop(state, None)

    def bind(self, messages: Sequence[Message], state: Any) -> None:
        with self._lock:
            session = self._by_messages.get(id(messages))
            # Only per-stream objects can name their session (None or a small int is shared).
            if session is not None and not isinstance(state, _SHARED):
                self._by_state[id(state)] = session
                self._states.setdefault(id(session), []).append(id(state))

    def session_of(self, state: Any) -> GuardSession | None:
        return self._by_state.get(id(state))

    def read(self, state: Any, tokens: int, start_ns: int, end_ns: int) -> None:
        session = self.session_of(state)
        for listener in list(self.listeners):
            listener.observer_read(session, tokens, start_ns, end_ns)

    def update(self, state: Any, monitor: str, tokens: int, seconds: float) -> None:
        session = self.session_of(state)
        for listener in list(self.listeners):
            listener.monitor_update(session, monitor, tokens, seconds)


class _TimedObserver:
    """The guard's observer with each read timed: ``extend``, and ``submit`` when the observer
    batches (async sessions submit their reads and await the future); the rest passes through."""

    def __init__(self, inner: Any, timers: _Timers) -> None:
        self._inner = inner
        self._timers = timers
        # Sessions look ``submit`` up to choose the path: only a batching observer has one.
        if callable(getattr(inner, "submit", None)):
            self.submit = self._submit

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def start(self, messages: Sequence[Message], needs: Needs) -> Any:
        state = self._inner.start(messages, needs)
        self._timers.bind(messages, state)
        return state

    def extend(self, state: Any, tokens: Sequence[TokenSpan], needs: Needs) -> Any:
        t0 = time.perf_counter_ns()
        batch = self._inner.extend(state, tokens, needs)
        self._timers.read(state, len(tokens), _wall_ns(t0), _wall_ns(time.perf_counter_ns()))
        return batch

    def _submit(self, state: Any, tokens: Sequence[TokenSpan], needs: Needs,
                urgent: bool = False) -> Future[Any]:
        """The read, timed from its submission until its batch is ready (as ``extend``, which
        waits on the same queue)."""
        t0 = time.perf_counter_ns()
        future: Future[Any] = self._inner.submit(state, tokens, needs, urgent=urgent)
        n = len(tokens)

        def done(f: Future[Any]) -> None:
            if not f.cancelled() and f.exception() is None:
                self._timers.read(state, n, _wall_ns(t0), _wall_ns(time.perf_counter_ns()))

        future.add_done_callback(done)
        return future

    def truncate(self, state: Any, n_tokens: int) -> None:
        self._inner.truncate(state, n_tokens)


class _TimedMonitor:
    """A monitor with each ``update`` timed. Not a ``Monitor`` subclass on purpose: the class
    defaults (``default_threshold``...) must come from the wrapped instance."""

    def __init__(self, inner: Any, monitor_id: str, timers: _Timers) -> None:
        self._inner = inner
        self._id = monitor_id
        self._timers = timers

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def needs(self) -> Needs:
        result: Needs = self._inner.needs()
        return result

    def start(self, context: MonitorContext) -> Any:
        state = self._inner.start(context)
        self._timers.bind(context.messages, state)
        return state

    def update(self, state: Any, features: Features) -> Sequence[Score]:
        t0 = time.perf_counter()
        scores: Sequence[Score] = self._inner.update(state, features)
        seconds = time.perf_counter() - t0
        self._timers.update(state, self._id, len(features.tokens), seconds)
        return scores

    def finish(self, state: Any) -> Sequence[Score]:
        scores: Sequence[Score] = self._inner.finish(state)
        return scores

    def truncate(self, state: Any, n_tokens: int) -> None:
        self._inner.truncate(state, n_tokens)


_SHARED = (type(None), bool, int, float, str, bytes, tuple)

# perf_counter is the right clock for durations; spans want wall-clock nanoseconds.
_OFFSET_NS = time.time_ns() - time.perf_counter_ns()


def _wall_ns(perf_ns: int) -> int:
    return perf_ns + _OFFSET_NS
