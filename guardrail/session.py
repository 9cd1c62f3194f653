"""The per-stream state machine, sans I/O.

``feed(step)`` takes upstream output and returns events; ``finish()`` ends the stream and returns a
report whose ``final_events`` the adapter must still deliver. No threads, no sockets: adapters own
I/O and drive a session from sync or async code alike.

Per batch of newly final tokens:
  1. features: one observer forward (or the generator's own states from the step);
  2. every monitor scores the new tokens from its per-stream state;
  3. rules turn scores into verdicts; the policy maps verdicts to actions;
  4. release: text older than the hold-back window is released; a halt retracts the rest.

Text streams read by an observer gather their batches and read them in one forward when a
decision is due (``_read_due``): before an unread token would be released, once
``observer.max_delay_ms`` has passed since text was waiting on the read, or at the end. The
gathered batches are then scored and released one by one, as they arrived, so what is released
and where each verdict lands are those of reading every batch at once; only the release waits.

With ``observer.read_ahead`` (the default) a read need not wait to come due: when the driver
waited for its upstream and the observer keeps up (``_worth_ahead``), the tokens that arrived go to
the batched observer in the background, one read per stream at a time, and the feed returns
(``_pump``); a read that has come back is scored at the next feed, in the same order and with the
same text, so releases and verdicts stay those of a read per delta. A feed waits when a decision
is due (the tokens under way counted as unread), when the read under way should be back before
the next delta (``_soon``), and at the end of the stream. The observer thus reads while the
upstream produces its next tokens, in reads of what arrived during the last one; a driver feeding
a backlog back to back, or a guard near its capacity, reads when due as above.

A driver that has fallen behind hands ``feed_many`` the pieces already waiting for it: each piece
gets the events ``feed`` would have given it, and the reads that come due along the way share one
forward (``_plan``).
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import logging
import time
import uuid
import weakref
from array import array
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import GuardrailError
from .events import Error, Event, Flag, Halt, Release, Route, event_to_dict
from .messages import normalize_messages
from .monitor import Features, Message, Monitor, MonitorContext, Needs, Score
from .observer import ObservedBatch
from .policy import MonitorSpec, ObserverSpec
from .rules import RuleState, Verdict
from .stream import Aligner, StreamStep, TokenLogprob, TokenSpan

if TYPE_CHECKING:
    from .guard import Guard
    from .prepared import Prepared

__all__ = ["GuardSession", "Report"]

log = logging.getLogger("guardrail.session")

REDACTION = "[REDACTED]"
WORD_TOKENS = 16  # the most tokens a release waits for a word to end
# A driver back within this long of a feed's return found its next delta waiting (it is catching
# up): a read sent now would miss the deltas right behind it. Network deltas come further apart.
WAITED_S = 0.001
# Reads go ahead only while a read takes at most this share of the time hold-back + 1 tokens
# take to arrive: nearer its capacity a guard reads when due (reads ahead there cost a forward
# per decision more, which falls further behind).
AHEAD_LOAD = 2 / 3


@dataclass
class _ReadTime:
    """How long an observer's reads take (seconds, a moving average), shared by the sessions
    that read it: a new stream decides its first read with it."""

    seconds: float | None = None


_READ_TIMES: weakref.WeakKeyDictionary[Any, _ReadTime] = weakref.WeakKeyDictionary()


@dataclass
class _Run:
    """One monitor within one stream."""

    spec: MonitorSpec
    monitor: Monitor
    threshold: float
    needs: Needs
    state: Any = None
    rule_state: RuleState = field(default_factory=RuleState)
    disabled: bool = False
    seconds: float = 0.0
    calls: int = 0
    scores: list[tuple[int, float]] | None = None


@dataclass
class _Unread:
    """A batch of final tokens waiting for the observer, with what its monitors will see."""

    tokens: list[TokenSpan]
    text_len: int  # the response's length when the batch arrived (Features.text)
    logprobs: Sequence[TokenLogprob] | None
    final: bool


@dataclass
class _Group:
    """The batches one read covers, and the events list of the piece whose feed made it due."""

    unread: list[_Unread]
    events: list[Event]


@dataclass
class _Ahead:
    """A read sent ahead (``observer.read_ahead``): its batches, and when it went and came back
    (``back``, stamped by a done-callback in the scheduler thread)."""

    unread: list[_Unread]
    future: Future[ObservedBatch]
    t0: float
    due: bool  # sent because a decision was due: the feed waits for it
    back: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        back = self.back  # the callback holds the list, not the read: no reference cycle that
        # would keep the read's states and logits alive until the garbage collector runs
        self.future.add_done_callback(lambda _: back.append(time.perf_counter()))


@dataclass
class Report:
    """What happened to one stream."""

    session_id: str
    tokens: int
    released_tokens: int
    released_text: str
    halted: bool
    halt: Halt | None
    flags: list[Flag]
    routes: list[Route]
    errors: list[Error]
    monitor_seconds: dict[str, float]
    observer_seconds: float
    wall_seconds: float
    aborted: str | None = None
    final_events: list[Event] = field(default_factory=list)
    scores: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    observer_reads: int = 0  # observer forwards over this stream's response

    @property
    def leaked_tokens(self) -> int:
        """Tokens released at or after the token where the halt fired (0 when none)."""
        if self.halt is None or self.halt.at < 0:
            return 0
        return max(0, self.released_tokens - self.halt.at)

    def to_dict(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "tokens": self.tokens,
            "released_tokens": self.released_tokens,
            "released_text": self.released_text,
            "halted": self.halted,
            "halt": event_to_dict(self.halt) if self.halt else None,
            "flags": [event_to_dict(f) for f in self.flags],
            "routes": [event_to_dict(r) for r in self.routes],
            "errors": [event_to_dict(e) for e in self.errors],
            "leaked_tokens": self.leaked_tokens,
            "monitor_seconds": self.monitor_seconds,
            "observer_seconds": self.observer_seconds,
            "wall_seconds": self.wall_seconds,
            "observer_reads": self.observer_reads,
            "aborted": self.aborted,
        }


class GuardSession:
    """One stream under guard. Create it with ``guard.session()``; not thread-safe (one stream,
    one driver), while the Guard behind it serves any number of sessions at once."""

    def __init__(
        self,
        guard: Guard,
        messages: Sequence[Message | Any] = (),  # normalised here (normalize_messages)
        *,
        metadata: dict[str, Any] | None = None,
        record_scores: bool = False,
        can_route: bool = False,
        dry_run: bool = False,
        prepared: Prepared | None = None,
    ) -> None:
        self.guard = guard
        self.dry_run = dry_run
        self.can_route = can_route
        self.route_pending: Route | None = None
        self._target_starts: set[int] = set()  # token indices a route target wrote after reroute
        self.policy = guard.policy
        self.id = uuid.uuid4().hex[:12]
        self.messages: list[Message] = list(normalize_messages(messages))
        self._prepared = prepared.claim(guard, self.messages) if prepared is not None else None
        self.metadata = dict(metadata or {})
        self.hold_back = self.policy.release.hold_back_tokens
        self.halted: Halt | None = None
        self.closed = False
        self.report: Report | None = None  # set when the session ends (finish or abort)
        self._init_output(guard)
        self._init_reads(guard)
        self._t0 = time.perf_counter()
        self._generator_mode: bool | None = None
        self._start_runs(guard, record_scores)

    def _init_output(self, guard: Guard) -> None:
        """The response so far: its tokens, what was released, and the events for the report."""
        self._aligner = Aligner(guard.tokenizer)
        self._token_starts = array("q")
        self._token_ends = array("q")
        self._released_chars = 0
        self._released_tokens = 0
        self._released_parts: list[str] = []
        self._redactions: list[tuple[int, int]] = []
        self._flags: list[Flag] = []
        self._routes: list[Route] = []
        self._errors: list[Error] = []
        self._pending: list[Event] = []

    def _init_reads(self, guard: Guard) -> None:
        """The observer's reads: when they come due, whether they go ahead, and at what pace."""
        self._observer_seconds = 0.0
        self._observer_state: Any = None
        self._observer_failed = False
        self._observer_reads = 0
        # Reads wait for a decision to be due (module docstring); hold-back 0 or max_delay_ms 0
        # reads every batch at once.
        observer_spec = self.policy.observer or ObserverSpec()
        max_delay_ms = observer_spec.max_delay_ms
        self._max_delay = max_delay_ms / 1000
        self._defer = self.hold_back > 0 and max_delay_ms > 0
        self._unread: list[_Unread] = []
        self._unread_count = 0
        self._waiting_since: float | None = None  # when text first waited on the next read
        self._async_read = False  # inside afeed/afinish: _read submits, the caller awaits
        self._inflight: tuple[list[_Group], Future[ObservedBatch], float] | None = None
        # Reads sent ahead without waiting (module docstring): at most one per stream at a time.
        self._read_ahead = (self._defer and observer_spec.read_ahead
                            and callable(getattr(guard.observer, "submit", None)))
        self._ahead: _Ahead | None = None
        self._ahead_count = 0  # its tokens
        # Pace (seconds): the driver's time away before this feed and, as moving averages, when
        # it waited for its upstream: that wait and the upstream's time per token; the
        # observer's read time (submitted to back), shared by the streams on it.
        self._last_gap: float | None = None
        self._gap: float | None = None
        self._per_token: float | None = None
        self._read_time = _read_time(guard.observer) if self._read_ahead else _ReadTime()
        self._last_call: float | None = None
        self._last_return: float | None = None
        self._span = 0.0  # time since the feed that last brought tokens, while the driver waited
        self._new_tokens = 0  # final tokens this feed brought
        # Inside feed_many: reads that come due are planned here, then run as one forward.
        self._plan: list[_Group] | None = None
        self._planned_count = 0

    def _start_runs(self, guard: Guard, record_scores: bool) -> None:
        """One run per monitor; each starts once the host has seen the session, and one that
        fails to start follows its on_error."""
        self._runs: list[_Run] = []
        for spec, monitor in guard.monitors:
            run = _Run(spec, monitor, guard.threshold_of(spec), guard.needs_of[spec.id])
            if record_scores:
                run.scores = []
            self._runs.append(run)
        guard.host.session_start(self)
        for run in self._runs:
            try:
                run.state = run.monitor.start(
                    MonitorContext(run.spec.id, self.messages, guard.observer, self.metadata,
                                   timeout_ms=run.spec.timeout_ms)
                )
                run.rule_state = run.spec.rule.start()
            except Exception as exc:  # noqa: BLE001 - a monitor's bug must follow on_error
                self._fail(run, exc, self._pending)

    # -- public API ------------------------------------------------------------------------

    @property
    def text(self) -> str:
        """The response so far. The aligner holds the only reference, so appending stays cheap."""
        return self._aligner.text

    @property
    def tokens(self) -> int:
        """Tokens read so far."""
        return len(self._token_ends)

    def token_offsets(self) -> list[tuple[int, int]]:
        """Char offsets of every token read so far."""
        return list(zip(self._token_starts, self._token_ends, strict=True))

    @property
    def released_text(self) -> str:
        return "".join(self._released_parts)

    @property
    def released_tokens(self) -> int:
        return self._released_tokens

    def feed(self, step: StreamStep | str) -> list[Event]:
        """Take the next piece of upstream output; return the events it caused, in order."""
        if not self._read_ahead:
            return self._emit(self._feed(step))
        self._arrive()
        try:
            events = self._feed(step)
            self._pump_wait(events)
        finally:
            self._leave()
        return self._emit(events)

    def feed_many(self, steps: Sequence[StreamStep | str]) -> list[list[Event]]:
        """Pieces of upstream output that were all waiting (a driver that fell behind): the
        events of each piece, as ``feed`` called once per piece would return them, while the
        observer reads that come due along the way run as one forward. A halt or a route in
        one piece drops the pieces after it, as ``feed`` would. With ``observer.read_ahead``
        the read of the pieces may go ahead, and the events of reads that came back (of
        earlier pieces or calls) come with the last piece."""
        if self._read_ahead:  # the pieces join the next read; the reads that came back go last
            self._arrive()
            try:
                outs = [self._feed(step) for step in steps]
                if outs:
                    self._pump_wait(outs[-1])
            finally:
                self._leave()
            return [self._emit(events) for events in outs]
        outs = self._feed_planned(steps)
        plan, future, t0 = self._submit_plan()
        if future is not None:
            batch, error = _result(future)
            self._apply_read(plan, batch, error, t0)
        return [self._emit(events) for events in outs]

    async def afeed_many(self, steps: Sequence[StreamStep | str]) -> list[list[Event]]:
        """``feed_many`` for async drivers: the one read is awaited, not waited on."""
        if self._read_ahead:
            self._arrive()
            try:
                outs = [self._feed(step) for step in steps]
                if outs:
                    await self._pump_await(outs[-1])
            finally:
                self._leave()
            return [self._emit(events) for events in outs]
        self._async_read = True
        try:
            outs = self._feed_planned(steps)
            plan, future, t0 = self._submit_plan()
        finally:
            self._async_read = False
        if future is not None:
            self._inflight = (plan, future, t0)
            await self._await_read()
        return [self._emit(events) for events in outs]

    def _feed(self, step: StreamStep | str) -> list[Event]:
        """``feed`` without delivering the events to the ``on_event`` hooks yet."""
        if self.closed:
            raise GuardrailError("feed() after finish(): this session has ended")
        events, self._pending = self._pending, []
        if self.halted is not None or self.route_pending is not None:
            return events  # upstream text after a halt or a route is dropped
        if isinstance(step, str):
            step = StreamStep(text=step)
        if step.tokens is not None:
            self._set_mode(generator=True)
            if step.context is not None and self.tokens:
                raise GuardrailError(
                    "StreamStep.context comes with a stream's first step only (the monitors "
                    f"read it on their first update); this stream has read {self.tokens} tokens")
            base = len(self.text)
            tokens = []
            for tok in step.tokens:
                tokens.append(TokenSpan(base, base + len(tok.text), tok.id))
                base += len(tok.text)
            self._aligner.append(step.text)
            self._aligner.committed = base
            if tokens:
                self._process(tokens, events, step=step)
        elif step.text:
            self._set_mode(generator=False)
            self._open_observer()
            tokens = self._aligner.feed(step.text)
            if tokens:
                self._process(tokens, events, step=step)
        return events

    def _open_observer(self) -> None:
        """At the first text, send the conversation to a batched observer: it reads it in the
        background (``start`` does not wait) while the first tokens arrive, so the first read
        carries only them and the first releases wait for one forward, not two. A read begun
        before the stream (``prepared``) is taken over instead. Observers that read on the
        caller's thread start at the first read (``_submit_read``)."""
        if self._prepared is not None:
            state, self._prepared = self._prepared.take(), None
            if state is not None:  # the first text: no stream was started yet
                self._observer_state = state
                return
        if (self._observer_state is not None or not self.guard.needs.observer
                or self._observer_failed
                or not callable(getattr(self.guard.observer, "submit", None))):
            return
        try:
            self._observer_state = self.guard.observer.start(self.messages, self.guard.needs)
        except Exception:  # noqa: BLE001 - the first read starts it again and follows on_error
            self._observer_state = None

    def _feed_planned(self, steps: Sequence[StreamStep | str]) -> list[list[Event]]:
        """Feed every piece; the reads that come due are planned (``_read``), not run."""
        self._plan, self._planned_count = [], 0
        try:
            return [self._feed(step) for step in steps]
        except BaseException:
            self._plan, self._planned_count = None, 0
            raise

    def _submit_plan(self) -> tuple[list[_Group], Future[ObservedBatch] | None, float]:
        """The planned reads as one submitted read (none when nothing came due)."""
        plan, self._plan, self._planned_count = self._plan or [], None, 0
        if not plan:
            return plan, None, 0.0
        tokens = [t for group in plan for u in group.unread for t in u.tokens]
        t0 = time.perf_counter()
        final = any(u.final for group in plan for u in group.unread)
        return plan, self._submit_read(tokens, urgent=final), t0

    def finish(self) -> Report:
        """End of the upstream stream: judge the last tokens, release what is left, and report.

        The adapter must deliver ``report.final_events`` (the last releases, late flags)."""
        if self.closed:
            raise GuardrailError("finish() called twice")
        events, self._pending = self._pending, []
        if self.route_pending is not None:  # the driver never continued: end at the prefix
            self.reroute(self.route_pending.at_char)
        if self.halted is None:
            self._read_last(events)
            if self._read_ahead:
                self._pump_wait(events, drain=True)
        if self.halted is None:
            for run in self._active_runs():
                try:
                    scores = list(run.monitor.finish(run.state))
                    self._judge(run, scores, events)
                    if self.halted is None:
                        verdicts = run.spec.rule.finish(run.rule_state, run.threshold)
                        for verdict in verdicts:
                            self._act(run, verdict, events)
                except Exception as exc:  # noqa: BLE001
                    self._fail(run, exc, events)
                if self.halted is not None:
                    break
        if self.halted is None:
            self._release(len(self.text), self.tokens, events)
        self._emit(events)
        return self._close(events, aborted=None)

    async def afeed(self, step: StreamStep | str) -> list[Event]:
        """``feed`` for async drivers: a due observer read is awaited (``asyncio.wrap_future``
        on the Guard's batched observer), so the event loop serves other streams meanwhile."""
        if self._read_ahead:
            self._arrive()
            try:
                events = self._feed(step)
                await self._pump_await(events)
            finally:
                self._leave()
            return self._emit(events)
        self._async_read = True
        try:
            events = self._feed(step)
        finally:
            self._async_read = False
        await self._await_read()
        return self._emit(events)

    async def afinish(self) -> Report:
        """``finish`` for async drivers: the last observer read is awaited, not waited on."""
        if (not self.closed and self.halted is None and self.route_pending is None
                and self.guard.needs.observer and not self._observer_failed):
            if self._read_ahead:
                self._read_last(self._pending)
                await self._pump_await(self._pending, drain=True)
                return self.finish()
            self._async_read = True
            try:
                self._read_last(self._pending)
            finally:
                self._async_read = False
            await self._await_read()
        return self.finish()

    def _read_last(self, events: list[Event]) -> None:
        """The end of the text: its last word becomes tokens and whatever is unread is read."""
        tokens = self._aligner.flush()
        if tokens:
            self._process(tokens, events, final=True)
        elif self._unread and not self._read_ahead:  # read ahead: the caller drains (_pump)
            self._read(events)

    def abort(self, reason: str) -> Report:
        """End the stream early (upstream error, client gone): nothing more is released."""
        if self.closed:
            raise GuardrailError("abort() after the session ended")
        return self._close([], aborted=reason)

    def reroute(self, at_char: int) -> None:
        """After a ``Route`` event the adapter calls this before feeding the target's text: the
        response is cut back to ``at_char`` (the route event's ``at_char``); the observer and
        every monitor (``Monitor.truncate``) forget the tokens after it."""
        self.route_pending = None
        if at_char < self._released_chars:
            raise GuardrailError("cannot reroute before text that was already released")
        self._drop_ahead(wait=True)  # the observer forgets tokens: no read may still add some
        keep = sum(1 for e in self._token_ends if e <= at_char)
        self._target_starts.add(keep)
        del self._token_starts[keep:]
        del self._token_ends[keep:]
        self._aligner.reset(self.text[:at_char], at_char)
        if self._observer_state is not None and self.guard.observer is not None:
            self.guard.observer.truncate(self._observer_state, keep)
        for run in self._active_runs():
            run.monitor.truncate(run.state, keep)

    # -- pipeline --------------------------------------------------------------------------

    def _set_mode(self, *, generator: bool) -> None:
        if self._generator_mode is None:
            self._generator_mode = generator
            if generator:  # the generator's own states: a conversation read ahead is not used
                self._drop_prepared()
        elif self._generator_mode != generator:
            raise GuardrailError(
                "a session takes either text-only steps or steps with tokens, not both"
            )

    def _active_runs(self) -> list[_Run]:
        return [r for r in self._runs if not r.disabled]

    def _process(
        self, tokens: list[TokenSpan], events: list[Event], *, step: StreamStep | None = None,
        final: bool = False,
    ) -> None:
        """Newly final tokens: scored at once, or, when the observer must read them, gathered
        until a read is due."""
        logprobs = step.logprobs if step is not None else None
        generated = step is not None and step.tokens is not None
        if not generated and self.guard.needs.observer and not self._observer_failed:
            self._unread.append(_Unread(tokens, len(self.text), logprobs, final))
            self._unread_count += len(tokens)
            if self._read_ahead:
                self._new_tokens += len(tokens)
                return  # the feed reads it (_pump)
            if final or self._read_due():
                self._read(events)
            return
        features = self._features(tokens, len(self.text), logprobs, final)
        if step is not None and generated:  # the generator's rows, handed over as a read's
            _fill(features, ObservedBatch(hidden=step.hidden or {}, logits=step.logits,
                                          context=step.context), 0, len(tokens), whole=True)
            features.generated = True
        self._score(features, events)

    def _read_due(self, deadline: bool = True) -> bool:
        """Whether the unread tokens must be read now: reading later would release an unread
        token, or (``deadline``) text has waited on this read for ``max_delay_ms``."""
        if not self._defer:
            return True
        first_unread = self.tokens + self._planned_count
        releasable = first_unread + self._ahead_count + self._unread_count - self.hold_back
        if releasable > first_unread:
            return True
        if not deadline or releasable <= self._released_tokens:
            return False  # reading now would release nothing more: no reader is waiting
        now = time.perf_counter()
        if self._waiting_since is None:
            self._waiting_since = now
        return now - self._waiting_since >= self._max_delay

    def _read(self, events: list[Event]) -> None:
        """One observer forward over every unread batch; then each batch is scored and released
        in arrival order, exactly as if it had been read alone. Within ``afeed``/``afinish`` the
        read is only submitted here and awaited there; within ``feed_many`` it is planned, and
        the planned reads run as one forward at the end."""
        unread, self._unread = self._unread, []
        count, self._unread_count, self._waiting_since = self._unread_count, 0, None
        group = _Group(unread, events)
        if self._plan is not None:
            self._plan.append(group)
            self._planned_count += count
            return
        tokens = [t for u in unread for t in u.tokens]
        t0 = time.perf_counter()
        future = self._submit_read(tokens, urgent=any(u.final for u in unread))
        if self._async_read:
            self._inflight = ([group], future, t0)
            return
        batch, error = _result(future)
        self._apply_read([group], batch, error, t0)

    def _submit_read(self, tokens: list[TokenSpan], background: bool = False,
                     urgent: bool = False) -> Future[ObservedBatch]:
        """The read of ``tokens`` as a future: the batched observer's own (``submit``; ``urgent``
        for the stream's last read, which no other stream's read is worth waiting for), or a
        done one when the read ran here (a sync read, an observer that does not batch)."""
        observer = self.guard.observer
        future: Future[ObservedBatch]
        try:
            if self._observer_state is None:
                self._observer_state = observer.start(self.messages, self.guard.needs)
            submit = (getattr(observer, "submit", None)
                      if self._async_read or background or urgent else None)
            if submit is not None:
                return submit(self._observer_state, tokens, self.guard.needs, urgent=urgent)
            batch = observer.extend(self._observer_state, tokens, self.guard.needs)
        except Exception as exc:  # noqa: BLE001 - a failed read follows the monitors' on_error
            future = Future()
            future.set_exception(exc)
            return future
        future = Future()
        future.set_result(batch)
        return future

    def _apply_read(self, groups: list[_Group], batch: ObservedBatch | None,
                    error: Exception | None, t0: float, *, read: bool = True,
                    done_at: float | None = None) -> None:
        """Score a read's batches in arrival order, each group's events into its own list."""
        if error is None and read:
            self._observer_reads += 1
        self._observer_seconds += (done_at or time.perf_counter()) - t0
        whole = len(groups) == 1 and len(groups[0].unread) == 1
        offset = 0
        for group in groups:
            events = group.events
            for u in group.unread:
                features = self._features(u.tokens, u.text_len, u.logprobs, u.final)
                if error is not None:
                    self._observer_failure(error, events)
                    error = None
                elif batch is not None:
                    _fill(features, batch, offset, len(u.tokens), whole=whole)
                offset += len(u.tokens)
                if self.halted is None:
                    self._score(features, events)
                if self.halted is not None or self.route_pending is not None:
                    # like upstream text after a halt or a route, the later batches drop: the
                    # text ends where it ended when this batch arrived, as with a read per delta
                    if u.text_len < len(self.text):
                        self._aligner.reset(self.text[:u.text_len],
                                            min(self._aligner.committed, u.text_len))
                    self._unread, self._unread_count = [], 0
                    return
        if self._observer_failed and self._unread and groups:
            # feed_many planned reads past text that stays unread: with the observer gone,
            # that text is scored now, as feed would have scored it after the failure.
            rest, self._unread, self._unread_count = self._unread, [], 0
            self._apply_read([_Group(rest, groups[-1].events)], None, None, time.perf_counter(),
                             read=False)

    # -- reads sent ahead (observer.read_ahead) ----------------------------------------------

    def _pump(self, events: list[Event], drain: bool = False) -> Future[ObservedBatch] | None:
        """Score the read sent ahead if it has come back, and send the tokens that arrived since
        as the next one when that is worth it (``_worth_ahead``) or due. Returns the read the
        caller must wait for before calling again: one that covers a due decision (``_read_due``,
        counting the tokens under way; its ``max_delay_ms`` deadline only for a read that did
        not go ahead), one expected back before the next delta (``_soon``), or, with ``drain``
        (the end of the stream), any; None when the feed may return."""
        while True:
            ahead = self._ahead
            if ahead is None:
                if (not self._unread or self.halted is not None
                        or self.route_pending is not None):
                    return None
                # a read ahead keeps text from waiting; a read that does not go ahead is read
                # when due, max_delay_ms deadline included, and waited for
                due = drain or self._read_due(deadline=False)
                if not due and not self._worth_ahead():
                    if not self._read_due():
                        return None
                    due = True
                unread, self._unread = self._unread, []
                self._ahead_count, self._unread_count = self._unread_count, 0
                self._waiting_since = None
                tokens = [t for u in unread for t in u.tokens]
                ahead = _Ahead(unread, self._submit_read(tokens, background=True,
                                                         urgent=drain),
                               time.perf_counter(), due=due)
                self._ahead = ahead
            if not ahead.future.done():
                wait = (drain or ahead.due or self._read_due(deadline=False)
                        or self._soon(ahead))
                return ahead.future if wait else None
            self._ahead, self._ahead_count = None, 0
            batch, error = _result(ahead.future)
            done_at = ahead.back[0] if ahead.back else time.perf_counter()
            self._read_time.seconds = _ewma(self._read_time.seconds, done_at - ahead.t0)
            self._apply_read([_Group(ahead.unread, events)], batch, error, ahead.t0,
                             done_at=done_at)

    def _waited(self) -> bool:
        """Whether the driver waited for its upstream before this feed, rather than finding
        the delta already there: then no delta is right behind this one, and the tokens that
        arrived are worth a read now. A driver feeding a backlog back to back reads when due,
        in reads of hold-back + 1 tokens."""
        return self._last_gap is not None and self._last_gap >= WAITED_S

    def _worth_ahead(self) -> bool:
        """Read the tokens that arrived now if the driver waited for them and the observer
        keeps up: a read takes well under the time hold-back + 1 tokens take the upstream
        (``AHEAD_LOAD``), so the tokens that arrive during a read are not yet due when it is
        back, and are read ahead in turn. Until the upstream's pace is known (the first
        deltas) and for a guard slower than that, reads wait until due, hold-back + 1 tokens
        at a time: a read ahead would cost such a guard a second forward per decision."""
        if not self._waited() or self._per_token is None:
            return False
        read_s = self._read_time.seconds
        return read_s is None or read_s <= AHEAD_LOAD * (self.hold_back + 1) * self._per_token

    def _soon(self, ahead: _Ahead) -> bool:
        """Whether the read under way is expected back before the next delta arrives (the
        upstream's usual gap): the feed waits for it then, as the driver would only wait for
        the upstream, so its releases go out now and the next read starts as it ends."""
        read_s = self._read_time.seconds
        if self._gap is None or read_s is None or not self._waited():
            return False
        return ahead.t0 + read_s - time.perf_counter() <= self._gap

    def _arrive(self) -> None:
        """A feed begins: how long the driver was away since the last one returned."""
        now = time.perf_counter()
        if self._last_return is not None and self._last_call is not None:
            self._last_gap = gap = now - self._last_return
            if gap >= WAITED_S:
                self._gap = _ewma(self._gap, gap)
                self._span += now - self._last_call
            else:  # a backlog: its deltas arrived while the guard was busy, at no known pace
                self._span = 0.0
        self._last_call = now

    def _leave(self) -> None:
        """A feed returns: the upstream's time per token, from the feeds it was waited for."""
        if self._new_tokens and self._span:
            self._per_token = _ewma(self._per_token, self._span / self._new_tokens)
            self._span = 0.0
        self._new_tokens = 0
        self._last_return = time.perf_counter()

    def _pump_wait(self, events: list[Event], drain: bool = False) -> None:
        while (future := self._pump(events, drain)) is not None:
            concurrent.futures.wait([future])

    async def _pump_await(self, events: list[Event], drain: bool = False) -> None:
        """``_pump_wait`` for async drivers. A cancelled wait leaves the read to the session
        (``abort`` cancels it, ``finish`` waits for it)."""
        while (future := self._pump(events, drain)) is not None:
            await _done(future)

    def _drop_prepared(self) -> None:
        prepared, self._prepared = self._prepared, None
        if prepared is not None:
            prepared.close()

    def _drop_ahead(self, wait: bool = False) -> None:
        """Forget the read sent ahead and the tokens queued behind it (a halt, an abort, a
        reroute): cancelled if the observer has not started it, else waited for (``wait``) or
        left to finish unseen."""
        ahead, self._ahead, self._ahead_count = self._ahead, None, 0
        self._unread, self._unread_count = [], 0
        if ahead is not None and not ahead.future.cancel() and wait:
            concurrent.futures.wait([ahead.future])

    async def _await_read(self) -> None:
        """Await the read ``_read`` submitted (the event loop runs meanwhile), then score it."""
        if self._inflight is None:
            return
        groups, future, t0 = self._inflight
        batch: ObservedBatch | None = None
        error: Exception | None = None
        try:
            batch = await asyncio.wrap_future(future)
        except Exception as exc:  # noqa: BLE001 - a failed read follows the monitors' on_error
            error = exc
        finally:
            self._inflight = None
        self._apply_read(groups, batch, error, t0)

    def _features(self, tokens: list[TokenSpan], text_len: int,
                  logprobs: Sequence[TokenLogprob] | None, final: bool) -> Features:
        """The tokens become read (their offsets recorded) and their features start."""
        first = self.tokens
        for t in tokens:
            self._token_starts.append(t.start)
            self._token_ends.append(t.end)
        text = self.text if text_len == len(self.text) else self.text[:text_len]
        features = Features(tokens, first, text, final=final)
        if logprobs:
            features.logprobs = logprobs
        return features

    def _score(self, features: Features, events: list[Event]) -> None:
        runs = self._active_runs()
        for n, run in enumerate(runs):
            t0 = time.perf_counter()
            try:
                scores = list(run.monitor.update(run.state, features))
                elapsed = time.perf_counter() - t0
                run.seconds += elapsed
                run.calls += 1
                budget = run.spec.timeout_ms
                if budget is not None and elapsed * 1000 > budget:
                    raise TimeoutError(
                        f"exceeded its per-chunk budget of {budget:g} ms "
                        f"(took {elapsed * 1000:.1f} ms)"
                    )
                self._judge(run, scores, events)
            except Exception as exc:  # noqa: BLE001
                self._fail(run, exc, events)
            if self.halted is not None:
                self._flags_before_halt(runs[n + 1:], features, events)
            if self.halted is not None or self.route_pending is not None:
                return
        # the text this batch arrived with: a gathered read must not see later text
        releasable = self._word_end(self._releasable(events), features.text)
        if releasable > self._released_tokens:
            self._release(self._token_ends[releasable - 1], releasable, events)

    def _releasable(self, events: list[Event]) -> int:
        """Tokens that may be released: all but the hold-back window, and none from where a
        redact monitor holds text (a match that may still be growing, ``Monitor.hold_from``)."""
        n = self.tokens - self.hold_back
        if self.dry_run:
            return n
        for run in self._active_runs():
            if run.spec.action != "redact":
                continue
            try:
                at = run.monitor.hold_from(run.state)
            except Exception as exc:  # noqa: BLE001
                self._fail(run, exc, events)
                if self.halted is not None:
                    return self._released_tokens
                continue
            if at is not None:
                n = min(n, bisect.bisect_right(self._token_ends, at))
        return n

    def _word_end(self, n: int, text: str) -> int:
        """``n``, or fewer tokens so the release does not end inside a word: a halt right after
        would leave half a word on screen ("buy pseudoep"). A run of word characters longer than
        ``WORD_TOKENS`` tokens (a URL, CJK text) is released as it comes. ``text``: the response
        as the batch being scored saw it."""
        floor = max(self._released_tokens, n - WORD_TOKENS)
        for k in range(n, floor, -1):
            end = self._token_ends[k - 1]
            after = text[end:end + 1]  # "" when the next character has not arrived yet
            if not text[end - 1:end].isalnum() or (after and not after.isalnum()):
                return k
        return n if floor > self._released_tokens else self._released_tokens

    def _flags_before_halt(self, runs: list[_Run], features: Features,
                           events: list[Event]) -> None:
        """The monitors after the one that halted still read this batch, so flags on tokens
        before the halt are kept (a whole answer arrives as one batch); nothing else acts."""
        assert self.halted is not None
        for run in runs:
            if run.spec.action not in ("flag", "redact"):
                continue
            try:
                scores = [s for s in run.monitor.update(run.state, features)
                          if s.index < self.halted.at]
                for verdict in run.spec.rule.update(run.rule_state, scores, run.threshold):
                    span = self._char_span(verdict)
                    flag = Flag(run.spec.id, verdict.score, span, verdict.tokens, verdict.rule,
                                action=run.spec.action, label=verdict.label)
                    self._flags.append(flag)
                    events.insert(events.index(self.halted), flag)  # before the halt
            except Exception as exc:  # noqa: BLE001 - the stream has halted; just record it
                log.warning("monitor %r failed after a halt: %s", run.spec.id, exc)

    def _observer_failure(self, exc: Exception, events: list[Event]) -> None:
        self._observer_failed = True
        dependants = [r for r in self._active_runs() if r.needs.observer]
        for run in dependants:
            self._fail(run, exc, events, source="observer")
            if self.halted is not None:
                return

    def _judge(self, run: _Run, scores: list[Score], events: list[Event]) -> None:
        if run.scores is not None:
            run.scores.extend((s.index, s.value) for s in scores)
        for verdict in run.spec.rule.update(run.rule_state, scores, run.threshold):
            self._act(run, verdict, events)
            if self.halted is not None or self.route_pending is not None:
                return

    def _char_span(self, verdict: Verdict) -> tuple[int, int]:
        if verdict.span is not None:
            return verdict.span
        first, last = verdict.tokens
        return (self._token_starts[first], self._token_ends[last])

    def _act(self, run: _Run, verdict: Verdict, events: list[Event]) -> None:
        spec = run.spec
        span = self._char_span(verdict)
        if self.dry_run or spec.action in ("flag", "redact"):
            flag = Flag(spec.id, verdict.score, span, verdict.tokens, verdict.rule,
                        action=spec.action, label=verdict.label)
            self._flags.append(flag)
            events.append(flag)
            if spec.action == "redact" and not self.dry_run:
                start = max(span[0], self._released_chars)
                if span[1] > start:
                    self._redactions.append((start, span[1]))
        elif spec.action == "halt":
            at = verdict.tokens[0] if verdict.span is not None else verdict.index
            self._halt(spec.id, f"{verdict.rule} rule fired (score {verdict.score:.3f})",
                       at, spec.message, events, score=verdict.score)
        elif spec.action == "route":
            at = verdict.index
            at_char = self._token_starts[at]
            if self.can_route and at_char < self._released_chars:
                return  # that token reached the reader already; later ones may still route
            if self.can_route and at in self._target_starts:
                return  # the route target wrote this token: routing it again would repeat it
            assert spec.route_to is not None
            route = Route(spec.id, at, at_char, spec.route_to.model_dump(mode="json"),
                          self.text[:at_char], verdict.score)
            self._routes.append(route)
            if self.can_route:  # the driver continues from the prefix: release it, hold the rest
                self._release(at_char, at, events)
                self.route_pending = route
            events.append(route)

    def _fail(self, run: _Run, exc: BaseException, events: list[Event],
              source: str | None = None) -> None:
        outcome = run.spec.on_error or self.policy.on_error
        who = f"{source} (for monitor {run.spec.id!r})" if source else f"monitor {run.spec.id!r}"
        log.warning("%s failed: %s: %s (%s)", who, type(exc).__name__, exc, outcome)
        error = Error(run.spec.id, f"{source + ': ' if source else ''}{exc}",
                      type(exc).__name__, outcome)
        self._errors.append(error)
        events.append(error)
        run.disabled = True
        if outcome == "fail_closed":
            at = self.tokens - 1
            self._halt(run.spec.id, f"monitor failed: {type(exc).__name__}: {exc}", at,
                       run.spec.message, events)

    def _halt(self, monitor: str, reason: str, at: int, message: str | None,
              events: list[Event], score: float | None = None) -> None:
        at_char = self._token_starts[at] if 0 <= at < self.tokens else len(self.text)
        halt = Halt(
            monitor=monitor,
            reason=reason,
            at=at,
            at_char=at_char,
            message=message or self.policy.halt_message,
            released_text=self.released_text,
            retracted_tokens=self.tokens - self._released_tokens,
            score=score,
        )
        self.halted = halt
        events.append(halt)

    def _release(self, end_char: int, end_tokens: int, events: list[Event]) -> None:
        start = self._released_chars
        if end_char <= start:
            self._released_tokens = max(self._released_tokens, end_tokens)
            return
        text = self._redacted(start, end_char)
        self._released_chars = end_char
        self._released_tokens = max(self._released_tokens, end_tokens)
        self._released_parts.append(text)
        events.append(Release(text, start, end_char))
        if self._redactions:  # spans wholly released are done with; keep the list short
            self._redactions = [r for r in self._redactions if r[1] > end_char]

    def _redacted(self, start: int, end: int) -> str:
        raw = self.text[start:end]
        if not self._redactions:
            return raw
        out, pos = [], start
        for r_start, r_end in sorted(self._redactions):
            if r_end <= pos or r_start >= end:
                continue
            a, b = max(r_start, pos), min(r_end, end)
            out.append(self.text[pos:a])
            if a == r_start:  # the mask is shown once, where the redacted span begins
                out.append(REDACTION)
            pos = b
        out.append(self.text[pos:end])
        return "".join(out)

    def _emit(self, events: list[Event]) -> list[Event]:
        for event in events:
            try:
                self.guard.host.on_event(event, self)
            except Exception:
                log.exception("a guardrail_on_event hook failed")
        return events

    def _close(self, final_events: list[Event], aborted: str | None) -> Report:
        self.closed = True
        self._drop_ahead()  # a read still sent ahead (abort, halt) is not wanted any more
        self._drop_prepared()  # a stream that ended before its first text
        state, self._observer_state = self._observer_state, None
        release = getattr(self.guard.observer, "release", None)
        if state is not None and release is not None:
            release(state)  # the stream's KV cache goes now, not when the session is collected
        report = Report(
            session_id=self.id,
            tokens=self.tokens,
            released_tokens=self._released_tokens,
            released_text=self.released_text,
            halted=self.halted is not None,
            halt=self.halted,
            flags=list(self._flags),
            routes=list(self._routes),
            errors=list(self._errors),
            monitor_seconds={r.spec.id: r.seconds for r in self._runs},
            observer_seconds=self._observer_seconds,
            wall_seconds=time.perf_counter() - self._t0,
            aborted=aborted,
            final_events=final_events,
            scores={r.spec.id: r.scores for r in self._runs if r.scores is not None},
            observer_reads=self._observer_reads,
        )
        self.report = report
        try:
            self.guard.host.session_end(self, report)
        except Exception:
            log.exception("a guardrail_session_end hook failed")
        return report


def _result(future: Future[ObservedBatch] | None) -> tuple[ObservedBatch | None,
                                                           Exception | None]:
    """A read's batch, or the error it failed with."""
    if future is None:
        return None, None
    try:
        return future.result(), None
    except Exception as exc:  # noqa: BLE001 - a failed read follows the monitors' on_error
        return None, exc


def _read_time(observer: Any) -> _ReadTime:
    try:
        return _READ_TIMES.setdefault(observer, _ReadTime())
    except TypeError:  # an observer that takes no weak references: this stream's own
        return _ReadTime()


def _ewma(average: float | None, value: float, weight: float = 0.3) -> float:
    return value if average is None else average + weight * (value - average)


async def _done(future: Future[Any]) -> None:
    """Wait for a concurrent future without blocking the event loop. Unlike awaiting
    ``asyncio.wrap_future``, cancelling the wait does not cancel the future."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not waiter.done():
            waiter.set_result(None)

    def done(_: Future[Any]) -> None:
        try:
            loop.call_soon_threadsafe(wake)
        except RuntimeError:  # the loop has closed: nobody waits any more
            pass

    future.add_done_callback(done)
    await waiter


def _fill(features: Features, batch: ObservedBatch, start: int, count: int, *,
          whole: bool) -> None:
    """Give ``features`` rows ``start .. start + count`` of a read (all of it when ``whole``),
    and the read's pooled context states when these are its first rows: the one hand-over of
    an observer's reads and of a generator's own steps (``StreamStep.context``, first step)."""
    def rows(array: Any) -> Any:
        return array if whole or array is None else array[start:start + count]

    features.hidden = {layer: rows(h) for layer, h in batch.hidden.items()}
    features.logits = rows(batch.logits)
    features.top_logits = rows(batch.top_logits)
    if start == 0:  # the stream's first batch carries the context's pooled states, if asked
        features.context = batch.context
