"""Reads sent ahead (``observer.read_ahead``, the default): a feed sends the tokens that arrived to
the batched observer in the background and returns; a read that came back is scored at the next
feed. What the reader gets (releases, flags, halts, in order) is what a read per delta gives; a
feed waits only when more than hold-back tokens queue behind the read under way; abort frees the
stream at once; a failed read follows on_error."""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import pytest

from guardrail import Guard, Needs
from guardrail.events import Event, Flag, Halt, Release
from guardrail.stream import Aligner
from guardrail.testing import random_splits

from .streams import CALM, TEXT, read_plugins, read_policy


def _view(events: list[Event]) -> list[tuple[Any, ...]]:
    """What the reader gets, in order, without timing."""
    out: list[tuple[Any, ...]] = []
    for e in events:
        if isinstance(e, Release):
            out.append(("release", e.text, e.start, e.end))
        elif isinstance(e, Halt):
            out.append(("halt", e.monitor, e.at, e.at_char, e.released_text, e.retracted_tokens))
        elif isinstance(e, Flag):
            out.append(("flag", e.monitor, e.tokens, e.span))
        else:
            out.append((type(e).__name__,))
    return out


def _per_delta(observer: Any, deltas: list[str], hold_back: int = 8) -> tuple[Any, Any]:
    with read_plugins() as host:
        guard = Guard.from_policy(read_policy(False, hold_back, max_delay_ms=0), host=host,
                                  observer=observer)
        session = guard.session(prompt="Tell me about Paris.")
        events = [e for d in deltas for e in session.feed(d)]
        report = session.finish()
    return _view(events + report.final_events), report


def _words(text: str) -> list[str]:
    words = text.split(" ")
    return [w + " " for w in words[:-1]] + words[-1:]


def _paced(session: Any, deltas: list[str]) -> list[Event]:
    """Fed as from an upstream the driver waits for (a few ms between deltas)."""
    events: list[Event] = []
    for d in deltas:
        time.sleep(0.005)
        events += session.feed(d)
    return events


def test_a_read_goes_ahead_while_the_feed_returns(observer: Any) -> None:
    """With the observer held, feeds of fewer than hold-back tokens, each waited for, return
    at once, their read already queued; the end of the stream waits for it and reads the rest:
    two reads or more, and what the reader gets is a read per delta's."""
    deltas = _words(CALM)[:6]
    expected, _ = _per_delta(observer, deltas)
    with read_plugins() as host:
        guard = Guard.from_policy(read_policy(), host=host, observer=observer)
        session = guard.session(prompt="Tell me about Lyon.")
        with guard.observer.hold():
            events = _paced(session, deltas[:3])
            assert guard.observer.pending() >= 1  # queued while the scheduler is held
        events += _paced(session, deltas[3:])
        report = session.finish()
    assert _view(events + report.final_events) == expected
    assert report.released_text == "".join(deltas)
    assert report.observer_reads >= 2


def test_the_first_feed_sends_the_conversation_ahead(observer: Any) -> None:
    """The conversation's read goes to the observer at the first text, before any token of the
    answer is final: the first read of the answer then carries only its tokens. What the reader
    gets is a read per delta's; a stream aborted after its first feed is freed at once."""
    deltas = _words(CALM)
    expected, _ = _per_delta(observer, deltas)
    with read_plugins() as host:
        guard = Guard.from_policy(read_policy(), host=host, observer=observer)
        context = len(observer.context_ids([{"role": "user", "content": "Tell me about Lyon."}]))
        session = guard.session(prompt="Tell me about Lyon.")
        with guard.observer.hold():
            assert session.feed("The") == []  # no final token yet: the word may go on
            assert guard.observer.live_streams() == 1 and guard.observer.pending() == 1
        deadline = time.monotonic() + 60
        while guard.observer.cached_tokens() < context:  # the scheduler reads it, unasked
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert guard.observer.cached_tokens() == context
        events = session.feed(deltas[0][len("The"):]) + _paced(session, deltas[1:])
        report = session.finish()
        assert _view(events + report.final_events) == expected
        aborted = guard.session(prompt="Tell me about Lyon.")
        aborted.feed("The ")
        assert guard.observer.live_streams() == 1
        aborted.abort("client went away")
        assert guard.observer.live_streams() == 0


def test_a_feed_waits_once_a_decision_is_due(observer: Any) -> None:
    """Backpressure: with the observer held, the feeds return (their read goes ahead) until the
    unscored tokens, under way or queued, exceed hold-back: that feed waits for them, so the
    driver never runs more than hold-back tokens past the guard."""
    hold_back = 8
    deltas = _words(CALM)[:20]
    expected, _ = _per_delta(observer, deltas, hold_back)
    with read_plugins() as host:
        guard = Guard.from_policy(read_policy(hold_back=hold_back), host=host, observer=observer)
        aligner, final, blocked = Aligner(guard.tokenizer), 0, None
        for k, d in enumerate(deltas):
            final += len(aligner.feed(d))
            if final > hold_back:
                blocked = k
                break
        assert blocked is not None and blocked > 1
        session = guard.session(prompt="Tell me about Lyon.")
        returned: list[int] = []
        outs: list[list[Event]] = []
        hold = guard.observer.hold()
        hold.__enter__()

        def release() -> None:  # the feeds took microseconds; a blocked one is still blocked
            returned.append(len(outs))
            hold.__exit__(None, None, None)

        timer = threading.Timer(1.5, release)
        timer.start()
        try:
            for d in deltas:
                outs.append(session.feed(d))
        finally:
            timer.join()
        report = session.finish()
    assert returned == [blocked]
    assert _view([e for out in outs for e in out] + report.final_events) == expected


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_streams_read_ahead_at_any_pace_release_what_per_delta_reads_release(
        observer: Any, seed: int) -> None:
    """Two streams on one guard, fed in turns with random pauses (so their reads go ahead in
    different groupings and share forwards): each gets what a read per delta gives it."""
    texts = [TEXT, CALM] if seed % 2 else [CALM, TEXT]
    cuts = [random_splits(t, seed=seed + k) for k, t in enumerate(texts)]
    expected = [_per_delta(observer, deltas) for deltas in cuts]
    rng = random.Random(seed)
    with read_plugins() as host:
        guard = Guard.from_policy(read_policy(), host=host, observer=observer)
        sessions = [guard.session(prompt="Tell me about Paris.") for _ in texts]
        events: list[list[Event]] = [[], []]
        for k in range(max(len(c) for c in cuts)):
            for s, deltas in enumerate(cuts):
                if k < len(deltas):
                    if rng.random() < 0.3:
                        time.sleep(rng.random() * 0.004)
                    events[s] += sessions[s].feed(deltas[k])
        reports = [session.finish() for session in sessions]
    for s in range(2):
        assert _view(events[s] + reports[s].final_events) == expected[s][0]
        assert reports[s].released_tokens == expected[s][1].released_tokens
        assert reports[s].observer_reads <= expected[s][1].observer_reads
    assert [r.halted for r in reports] == [t == TEXT for t in texts]


def test_abort_with_a_read_ahead_frees_the_stream_at_once(observer: Any) -> None:
    with read_plugins() as host:
        guard = Guard.from_policy(read_policy(), host=host, observer=observer)
        session = guard.session(prompt="Tell me about Lyon.")
        with guard.observer.hold():
            _paced(session, _words(CALM)[:4])
            assert guard.observer.pending() >= 1
            report = session.abort("client went away")
            assert guard.observer.live_streams() == 0 and guard.observer.cached_tokens() == 0
        assert report.aborted == "client went away" and report.released_text == ""
        # the scheduler goes on: the next stream reads to its end
        other = guard.session(prompt="Tell me about Lyon.")
        for d in _words(CALM):
            other.feed(d)
        assert other.finish().released_text == CALM
        assert guard.observer.live_streams() == 0


class FailingInner:
    """The tiny observer behind the guard's batched observer (read stream by stream), whose
    reads fail from the ``fail_from``-th on."""

    batchable = True

    def __init__(self, inner: Any, fail_from: int) -> None:
        self.inner = inner
        self.name = "failing"
        self.tokenizer = inner.tokenizer
        self.num_layers = inner.num_layers
        self.hidden_size = inner.hidden_size
        self.fail_from = fail_from
        self.reads = 0

    def start(self, messages: Any, needs: Needs) -> Any:
        return self.inner.start(messages, needs)

    def extend(self, state: Any, tokens: Any, needs: Needs) -> Any:
        self.reads += 1
        if self.reads >= self.fail_from:
            raise RuntimeError("observer went away")
        return self.inner.extend(state, tokens, needs)

    def truncate(self, state: Any, n_tokens: int) -> None:
        self.inner.truncate(state, n_tokens)


@pytest.mark.parametrize("on_error", ["fail_open", "fail_closed"])
@pytest.mark.parametrize("fail_from", [1, 2])
def test_a_failed_read_ahead_follows_on_error(observer: Any, on_error: str,
                                              fail_from: int) -> None:
    """fail_open: the monitors that need the observer stop, the others score the rest, all is
    released; fail_closed: the stream halts where the failed read began, nothing unscored
    released. Either way the feeds and the end return."""
    deltas = random_splits(CALM, seed=5)
    with read_plugins() as host:
        guard = Guard.from_policy(read_policy(on_error=on_error), host=host,
                                  observer=FailingInner(observer, fail_from))
        session = guard.session(prompt="Tell me about Lyon.")
        events = _paced(session, deltas)  # reads go ahead: the failure comes back to a feed
        report = session.finish()
    released = "".join(e.text for e in events + report.final_events if isinstance(e, Release))
    assert report.errors and released == report.released_text
    if on_error == "fail_open":
        assert not report.halted and released == CALM
    else:
        assert report.halted and report.halt is not None and report.leaked_tokens == 0
        assert CALM.startswith(released) and len(released) < len(CALM)
    assert guard.observer.live_streams() == 0
