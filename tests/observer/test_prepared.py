"""A conversation read before its stream (``Guard.prepare``): the observer reads it while the
upstream works on its first token; the session given it takes that read over, so its first read
carries only the answer's tokens, and what the reader gets is what a session reading the
conversation itself gives. A read no session takes is freed by ``close``, by the session that
ends before its first text, or by an adapter whose upstream failed."""

from __future__ import annotations

import time
from typing import Any

import pytest

from guardrail import Guard, GuardrailError, Prepared

from .streams import CALM, TEXT, read_plugins, read_policy

PROMPT = "Tell me about Lyon."


def _words(text: str) -> list[str]:
    words = text.split(" ")
    return [w + " " for w in words[:-1]] + words[-1:]


def _run(guard: Guard, text: str, prepared: Prepared | None = None) -> Any:
    session = guard.session(prompt=PROMPT, prepared=prepared, record_scores=True)
    events = [e for d in _words(text) for e in session.feed(d)]
    report = session.finish()
    return events + report.final_events, report


def _wait_cached(guard: Guard, n: int) -> None:
    deadline = time.monotonic() + 60
    while guard.observer.cached_tokens() < n:
        assert time.monotonic() < deadline, "the conversation was never read"
        time.sleep(0.01)


@pytest.mark.parametrize("text", [CALM, TEXT])
def test_a_prepared_read_is_taken_over_and_changes_nothing_the_reader_gets(
        observer: Any, text: str) -> None:
    with read_plugins() as host:
        guard = Guard.from_policy(read_policy(hold_back=4), host=host, observer=observer)
        expected, alone = _run(guard, text)
        context = len(observer.context_ids([{"role": "user", "content": PROMPT}]))
        prepared = guard.prepare(prompt=PROMPT)
        assert prepared.started
        _wait_cached(guard, context)  # read before any text of the answer exists
        assert guard.observer.cached_tokens() == context
        session = guard.session(prompt=PROMPT, prepared=prepared, record_scores=True)
        events = session.feed(_words(text)[0])
        assert guard.observer.live_streams() == 1  # the prepared stream, not a second one
        assert prepared.closed and not prepared.started  # the session owns it now
        for d in _words(text)[1:]:
            events += session.feed(d)
        report = session.finish()
        assert guard.observer.live_streams() == 0
    assert events + report.final_events == expected
    assert report.scores == alone.scores  # the same hidden states, token for token
    assert report.halted == (text == TEXT)


def test_an_unused_read_is_freed_by_close_or_by_a_session_that_never_saw_text(
        observer: Any) -> None:
    with read_plugins() as host:
        guard = Guard.from_policy(read_policy(hold_back=4), host=host, observer=observer)
        with guard.prepare(prompt=PROMPT) as prepared:
            assert guard.observer.live_streams() == 1
        assert prepared.closed and guard.observer.live_streams() == 0
        prepared.close()  # again: nothing to do

        session = guard.session(prompt=PROMPT, prepared=guard.prepare(prompt=PROMPT))
        assert guard.observer.live_streams() == 1
        report = session.abort("the upstream failed")
        assert guard.observer.live_streams() == 0
        assert report.tokens == 0


def test_a_read_fits_only_its_own_guard_and_conversation(observer: Any) -> None:
    with read_plugins() as host:
        guard = Guard.from_policy(read_policy(hold_back=4), host=host, observer=observer)
        other = Guard.from_policy(read_policy(hold_back=4), host=host, observer=observer)
        prepared = guard.prepare(prompt=PROMPT)
        with pytest.raises(GuardrailError, match="another conversation"):
            guard.session(prompt="Tell me about Paris.", prepared=prepared)
        with pytest.raises(GuardrailError, match="another Guard"):
            other.session(prompt=PROMPT, prepared=prepared)
        session = guard.session(prompt=PROMPT, prepared=prepared)
        with pytest.raises(GuardrailError, match="already taken"):
            guard.session(prompt=PROMPT, prepared=prepared)
        session.abort("done")
        assert guard.observer.live_streams() == 0


def test_a_guard_that_reads_no_layers_prepares_nothing() -> None:
    guard = Guard.from_policy({"monitors": [{"id": "kw", "use": "keywords", "action": "halt",
                                             "options": {"words": ["bomb"]}}]})
    prepared = guard.prepare(prompt=PROMPT)
    assert not prepared.started
    session = guard.session(prompt=PROMPT, prepared=prepared)
    session.feed("How to build a bomb at home")
    assert session.finish().halted
