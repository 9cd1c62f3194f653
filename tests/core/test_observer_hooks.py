"""The session's use of an observer: one forward per batch shared by every monitor; failures."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from guardrail import Features, Guard, Monitor, Needs, ObserverError, Score, hookimpl
from guardrail.observer import ObservedBatch
from guardrail.plugins import PluginHost
from guardrail.stream import TokenSpan, WordTokenizer
from guardrail.testing import plugin_monitors, split_text


class FakeObserver:
    """'Hidden state' of a token = its length; counts forwards."""

    name = "fake"
    num_layers = 4
    hidden_size = 1

    def __init__(self, fail_after: int | None = None) -> None:
        self.tokenizer = WordTokenizer()
        self.forwards = 0
        self.fail_after = fail_after
        self.contexts: list[Any] = []

    def start(self, messages: Sequence[Any], needs: Needs) -> dict[str, int]:
        self.contexts.append(list(messages))
        return {"seen": 0}

    def extend(self, state: dict[str, int], tokens: Sequence[TokenSpan],
               needs: Needs) -> ObservedBatch:
        self.forwards += 1
        if self.fail_after is not None and self.forwards > self.fail_after:
            raise RuntimeError("observer out of memory")
        state["seen"] += len(tokens)
        rows = [[float(t.end - t.start)] for t in tokens]
        return ObservedBatch(hidden={layer: rows for layer in needs.layers})

    def truncate(self, state: dict[str, int], n_tokens: int) -> None:
        state["seen"] = n_tokens


class LengthMonitor(Monitor):
    def __init__(self, layer: int) -> None:
        self.layer = layer

    def needs(self) -> Needs:
        return Needs(layers=frozenset({self.layer}))

    def update(self, state: Any, features: Features) -> list[Score]:
        rows = features.hidden[self.layer]
        return [Score(i, row[0] / 10) for i, row in zip(features.indices, rows, strict=True)]


def fake_host(observer: FakeObserver) -> PluginHost:
    host = PluginHost(autoload=False)

    class ObserverPlugin:
        @hookimpl
        def guardrail_register_observers(self, register: Any) -> None:
            register("fake", lambda spec: observer, description="test observer")

    host.register(ObserverPlugin(), name="fake-observer")
    return host


POLICY = {
    "observer": {"model": "fake"},
    "release": {"hold_back_tokens": 1},
    "monitors": [
        {"id": "a", "use": "length", "options": {"layer": 2}, "threshold": 0.9,
         "action": "halt"},
        {"id": "b", "use": "length", "options": {"layer": -1}, "threshold": 0.6},
    ],
}
TEXT = "a bb ccc dddd eeeeeee fffffffff"


def test_one_forward_per_batch_is_shared_by_every_monitor() -> None:
    observer = FakeObserver()
    host = fake_host(observer)
    with plugin_monitors(host, length=lambda layer: LengthMonitor(layer)):
        guard = Guard.from_policy(POLICY, host=host)
        assert guard.needs.layers == {2, -1}
        session = guard.session(prompt="letters please")
        deltas = split_text(TEXT, [5])
        for d in deltas:
            session.feed(d)
        report = session.finish()
    assert observer.contexts == [[{"role": "user", "content": "letters please"}]]
    batches = observer.forwards
    assert 1 < batches <= len(deltas) + 1  # one forward per batch of final tokens, not per monitor
    assert [f.monitor for f in report.flags] == ["b"]  # " eeeeeee" = 8 chars -> 0.8 >= 0.6
    assert report.halt is not None and report.halt.at == 5  # " fffffffff" = 10 chars


def test_observer_failure_under_fail_open_turns_its_monitors_off() -> None:
    observer = FakeObserver(fail_after=1)
    host = fake_host(observer)
    with plugin_monitors(host, length=lambda layer: LengthMonitor(layer)):
        guard = Guard.from_policy({**POLICY, "on_error": "fail_open"}, host=host)
        session = guard.session()
        for d in split_text(TEXT, [5]):
            session.feed(d)
        report = session.finish()
    assert report.released_text == TEXT and not report.halted
    assert {e.monitor for e in report.errors} == {"a", "b"}
    assert all("observer: observer out of memory" in e.error for e in report.errors)


def test_observer_failure_under_fail_closed_halts() -> None:
    observer = FakeObserver(fail_after=0)
    host = fake_host(observer)
    with plugin_monitors(host, length=lambda layer: LengthMonitor(layer)):
        guard = Guard.from_policy(POLICY, host=host)
        report = guard.check(TEXT)
    assert report.halted and report.released_text == ""
    assert "RuntimeError" in report.halt.reason  # type: ignore[union-attr]


def test_an_unknown_observer_fails_at_start_up_with_the_fix() -> None:
    host = PluginHost(autoload=False)
    with plugin_monitors(host, length=lambda layer: LengthMonitor(layer)), \
            pytest.raises(ObserverError, match="'no-such-model'.*fix observer.model"):
        Guard.from_policy({**POLICY, "observer": {"model": "no-such-model"}}, host=host)
