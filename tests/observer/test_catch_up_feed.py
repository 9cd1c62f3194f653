"""A driver that fell behind feeds the pieces waiting for it in one call (``feed_many``): each
piece gets the events ``feed`` would have given it, and the reads that come due share one forward.
``afeed``/``afeed_many`` await that read, so the event loop runs while the observer reads."""

from __future__ import annotations

import asyncio
import random
import threading
from typing import Any

import pytest

from guardrail import Guard, Needs
from guardrail.events import Event, Flag, Halt, Release, Route
from guardrail.testing import WordEndMonitor, plugin_monitors, random_splits

from .streams import CALM, TEXT, RowNorm


def _guard(observer: Any, action: str = "halt", hold_back: int = 8,
           read_ahead: bool = False, max_delay_ms: float = 1e9) -> Any:
    policy: dict[str, Any] = {
        "observer": {"max_delay_ms": max_delay_ms, "read_ahead": read_ahead},
        "release": {"hold_back_tokens": hold_back},
        "monitors": [
            {"id": "norm", "use": "row-norm", "threshold": 40.0, "action": "flag"},
            {"id": "words", "use": "word-end", "threshold": 0.5, "action": action,
             "rule": {"kind": "count", "k": 2}},
        ],
    }
    if action == "route":
        policy["monitors"][1]["route_to"] = {"model": "large"}
    word_end = WordEndMonitor.factory("paris", "bomb", "cheese")
    return plugin_monitors(row_norm=RowNorm, word_end=word_end), policy


def _groups(deltas: list[str], seed: int) -> list[list[str]]:
    """The deltas as a driver behind its upstream takes them: 1 to 12 at a time."""
    rng = random.Random(seed)
    out, k = [], 0
    while k < len(deltas):
        n = rng.randint(1, 12)
        out.append(deltas[k:k + n])
        k += n
    return out


def _in_pieces(observer: Any, deltas: list[str], seed: int, **guard: Any
               ) -> tuple[list[list[Event]], Any, Any]:
    """The deltas fed in ``_groups``' pieces with ``feed_many``: the events per piece, the
    report and the session."""
    plugins, policy = _guard(observer, **guard)
    with plugins as host:
        session = Guard.from_policy(policy, host=host, observer=observer).session(
            prompt="Tell me about Paris.")
        per_piece: list[list[Event]] = []
        for group in _groups(deltas, seed):
            per_piece += session.feed_many(group)
        report = session.finish()
    return per_piece, report, session


def _view(per_piece: list[list[Event]]) -> list[list[tuple[Any, ...]]]:
    """What a driver hands its reader after each piece, without timing."""
    def one(e: Event) -> tuple[Any, ...]:
        if isinstance(e, Release):
            return ("release", e.text, e.start, e.end)
        if isinstance(e, Halt):
            return ("halt", e.monitor, e.at, e.at_char, e.released_text, e.retracted_tokens)
        if isinstance(e, Flag):
            return ("flag", e.monitor, e.tokens, e.span)
        if isinstance(e, Route):
            return ("route", e.monitor, e.at, e.at_char)
        return (type(e).__name__,)
    return [[one(e) for e in events] for events in per_piece]


def _one_by_one(observer: Any, deltas: list[str], hold_back: int = 8) -> tuple[Any, Any]:
    plugins, policy = _guard(observer, hold_back=hold_back)
    with plugins as host:
        session = Guard.from_policy(policy, host=host, observer=observer).session(
            prompt="Tell me about Paris.")
        per_piece = [session.feed(d) for d in deltas]
        report = session.finish()
    return _view(per_piece) + _view([report.final_events]), (report, session.text)


@pytest.mark.parametrize("text,seed,hold_back", [
    (TEXT, 1, 8), (TEXT, 2, 8), (CALM, 3, 8), (CALM, 4, 0), (TEXT, 5, 2)])
def test_catch_up_gives_each_piece_what_feed_gives_it(observer: Any, text: str, seed: int,
                                                       hold_back: int) -> None:
    deltas = random_splits(text, seed=seed)
    expected, (alone, alone_text) = _one_by_one(observer, deltas, hold_back)
    per_piece, report, session = _in_pieces(observer, deltas, seed, hold_back=hold_back)
    assert _view(per_piece) + _view([report.final_events]) == expected
    assert (report.tokens, report.released_text, report.halted) == (
        alone.tokens, alone.released_text, alone.halted)
    assert report.observer_reads < alone.observer_reads  # the due reads of a group share one
    if "bomb" in text:
        assert report.halted and report.leaked_tokens == 0
    assert session.text == alone_text  # the pieces after a halt are dropped, as by feed


def test_catch_up_after_a_halt_drops_the_later_pieces(observer: Any) -> None:
    deltas = [w + " " for w in TEXT.split(" ")]
    plugins, policy = _guard(observer)
    with plugins as host:
        session = Guard.from_policy(policy, host=host, observer=observer).session(
            prompt="Tell me about Paris.")
        per_piece = session.feed_many(deltas)  # the whole answer was waiting
        report = session.finish()
    halted_in = next(k for k, events in enumerate(per_piece)
                     if any(isinstance(e, Halt) for e in events))
    assert all(events == [] for events in per_piece[halted_in + 1:])
    assert "bomb" in session.text and "cheese" not in session.text
    assert report.released_text == report.halt.released_text
    assert report.observer_reads == 1


def test_afeed_many_matches_feed(observer: Any) -> None:
    deltas = random_splits(TEXT, seed=11)
    expected, _ = _one_by_one(observer, deltas)
    plugins, policy = _guard(observer)

    async def go(session: Any) -> list[list[Event]]:
        per_piece: list[list[Event]] = []
        for group in _groups(deltas, 11):
            per_piece += await session.afeed_many(group)
        report = await session.afinish()
        return [*per_piece, report.final_events]

    with plugins as host:
        session = Guard.from_policy(policy, host=host, observer=observer).session(
            prompt="Tell me about Paris.")
        assert _view(asyncio.run(go(session))) == expected


def _flat(per_piece: list[list[Event]]) -> list[tuple[Any, ...]]:
    return [e for events in _view(per_piece) for e in events]


def _per_delta(observer: Any, deltas: list[str], hold_back: int = 8) -> tuple[Any, Any]:
    """Every delta read alone (``max_delay_ms: 0``): what the reader sees, in order."""
    plugins, policy = _guard(observer, hold_back=hold_back, max_delay_ms=0)
    with plugins as host:
        session = Guard.from_policy(policy, host=host, observer=observer).session(
            prompt="Tell me about Paris.")
        per_piece = [session.feed(d) for d in deltas]
        report = session.finish()
    return _flat([*per_piece, report.final_events]), (report, session.text)


@pytest.mark.parametrize("text,seed,hold_back", [
    (TEXT, 1, 8), (CALM, 3, 8), (TEXT, 5, 2), (TEXT, 6, 1)])
def test_catch_up_with_reads_ahead_releases_what_per_delta_reads_release(
        observer: Any, text: str, seed: int, hold_back: int) -> None:
    """Reads sent ahead: the events of a piece may come with a later call, but the reader gets
    the same releases, flags and halt, in the same order, and the text after a halt is dropped
    as by a read per delta."""
    deltas = random_splits(text, seed=seed)
    expected, (alone, alone_text) = _per_delta(observer, deltas, hold_back)
    per_piece, report, session = _in_pieces(observer, deltas, seed, hold_back=hold_back,
                                            read_ahead=True)
    assert _flat([*per_piece, report.final_events]) == expected
    assert (report.tokens, report.released_text, report.halted, session.text) == (
        alone.tokens, alone.released_text, alone.halted, alone_text)
    assert report.observer_reads < alone.observer_reads


def test_afeed_with_reads_ahead_releases_what_per_delta_reads_release(observer: Any) -> None:
    deltas = random_splits(TEXT, seed=12)
    expected, (alone, _) = _per_delta(observer, deltas)
    plugins, policy = _guard(observer, read_ahead=True)

    async def go(session: Any) -> list[list[Event]]:
        per_piece: list[list[Event]] = []
        for k, group in enumerate(_groups(deltas, 12)):
            if k % 2:
                per_piece += await session.afeed_many(group)
            else:
                per_piece += [await session.afeed(d) for d in group]
        report = await session.afinish()
        return [*per_piece, report.final_events]

    with plugins as host:
        session = Guard.from_policy(policy, host=host, observer=observer).session(
            prompt="Tell me about Paris.")
        assert _flat(asyncio.run(go(session))) == expected
        assert session.report is not None and session.report.halted == alone.halted


@pytest.mark.parametrize("read_ahead", [False, True])
@pytest.mark.parametrize("many", [False, True])
def test_the_event_loop_runs_while_a_read_is_awaited(observer: Any, many: bool,
                                                     read_ahead: bool) -> None:
    """The scheduler is held (a read that takes as long as we like): another task keeps
    ticking while the session awaits the read, and the read's releases follow its end."""
    plugins, policy = _guard(observer, read_ahead=read_ahead)
    deltas = [w + " " for w in CALM.split(" ")][:12]  # more than hold-back tokens: a read is due
    with plugins as host:
        guard = Guard.from_policy(policy, host=host, observer=observer)
        session = guard.session(prompt="Tell me about Lyon.")
        hold = guard.observer.hold()
        hold.__enter__()
        lock, held = threading.Lock(), [True]

        def release() -> None:
            with lock:
                if held[0]:
                    held[0] = False
                    hold.__exit__(None, None, None)

        # A blocked loop could never leave the hold: let it go after a while regardless.
        watchdog = threading.Timer(10.0, release)
        watchdog.start()

        async def go() -> tuple[int, list[Event]]:
            if many:
                # read ahead: the first call's read goes ahead; the second call queues more than
                # hold-back tokens behind it, so it waits
                calls = [deltas[:3], deltas[3:]] if read_ahead else [deltas]

                async def each_call() -> list[list[Event]]:
                    return [out for call in calls for out in await session.afeed_many(call)]
                feeding = asyncio.ensure_future(each_call())
            else:
                async def each() -> list[list[Event]]:
                    return [await session.afeed(d) for d in deltas]
                feeding = asyncio.ensure_future(each())
            ticks = 0
            while ticks < 20 and not feeding.done():
                await asyncio.sleep(0.005)
                ticks += 1
            done_while_held = feeding.done()
            watchdog.cancel()
            release()
            per_piece = await feeding
            assert not done_while_held
            return ticks, [e for events in per_piece for e in events]

        ticks, events = asyncio.run(go())
        report = session.finish()
    assert ticks == 20  # the loop ran while the read waited
    # read ahead: the wait was for the read under way; the one sent after it is scored at the end
    assert any(isinstance(e, Release)
               for e in events + (report.final_events if read_ahead else []))
    assert report.released_text == "".join(deltas)


class FailingObserver:
    """The tiny observer, read in this thread, whose reads fail from the second one on."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = "failing"
        self.tokenizer = inner.tokenizer
        self.num_layers = inner.num_layers
        self.hidden_size = inner.hidden_size
        self.reads = 0

    def start(self, messages: Any, needs: Needs) -> Any:
        return self.inner.start(messages, needs)

    def extend(self, state: Any, tokens: Any, needs: Needs) -> Any:
        self.reads += 1
        if self.reads >= 2:
            raise RuntimeError("observer went away")
        return self.inner.extend(state, tokens, needs)

    def truncate(self, state: Any, n_tokens: int) -> None:
        self.inner.truncate(state, n_tokens)


def test_catch_up_after_a_failed_read_still_releases_every_piece(observer: Any) -> None:
    """fail_open: the read that fails disables the monitors that need it; the text of the later
    pieces, read or not, is scored by the others and released, none left behind."""
    plugins, policy = _guard(observer)
    policy["on_error"] = "fail_open"
    deltas = random_splits(CALM, seed=21)
    with plugins as host:
        guard = Guard.from_policy(policy, host=host, observer=FailingObserver(observer))
        session = guard.session(prompt="Tell me about Lyon.")
        events: list[Event] = []
        for group in _groups(deltas, 21):
            events += [e for out in session.feed_many(group) for e in out]
        report = session.finish()
    assert report.errors and not report.halted
    assert report.released_text == CALM
    assert "".join(e.text for e in events + report.final_events if isinstance(e, Release)) == CALM
