"""What a reader sees: released text, hold-back, halts, flags, redaction, routes, failures."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guardrail import Error, Flag, Guard, Halt, Release, Route, StepToken, StreamStep
from guardrail.plugins import PluginHost
from guardrail.testing import (
    CountingMonitor,
    FailingMonitor,
    ScriptedMonitor,
    SlowMonitor,
    plugin_monitors,
    random_splits,
    split_text,
)

TEXT = "one two three four five six seven eight nine ten"


def guard(host: PluginHost, monitors: list[dict[str, Any]], **policy: Any) -> Guard:
    return Guard.from_policy({"monitors": monitors, **policy}, host=host)


def released(events: list[Any]) -> str:
    return "".join(e.text for e in events if isinstance(e, Release))


def run(g: Guard, deltas: list[str]) -> tuple[list[Any], Any]:
    session = g.session(prompt="count to ten")
    events: list[Any] = []
    for d in deltas:
        events += session.feed(d)
    report = session.finish()
    return events + report.final_events, report


def test_without_verdicts_the_reader_gets_the_input_exactly(host: PluginHost) -> None:
    g = guard(host, [{"id": "kw", "use": "keywords", "options": {"words": ["bomb"]}}])
    events, report = run(g, random_splits(TEXT, seed=3))
    assert released(events) == TEXT == report.released_text
    assert not report.halted and report.tokens == 10 and report.released_tokens == 10


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=80), st.integers(0, 1000), st.integers(0, 5))
def test_property_no_verdict_output_equals_input(text: str, seed: int, hold: int) -> None:
    g = Guard.from_policy({"release": {"hold_back_tokens": hold}, "monitors": []},
                          host=PluginHost(autoload=False))
    events, _ = run(g, random_splits(text, seed=seed))
    assert released(events) == text


@settings(max_examples=80, deadline=None)
@given(st.lists(st.sampled_from(["alpha", "beta", "STOP", "gamma", "é🙂", "x\u200by", "\n"]),
                max_size=30).map(" ".join), st.integers(0, 1000), st.integers(0, 4))
def test_property_released_is_a_prefix_and_nothing_follows_a_halt(text: str, seed: int,
                                                                 hold: int) -> None:
    host = PluginHost(autoload=False)
    with plugin_monitors(host, scripted=ScriptedMonitor.factory({"stop": 1.0})):
        g = guard(host, [{"id": "s", "use": "scripted", "action": "halt"}],
                  release={"hold_back_tokens": hold})
        session = g.session()
        events: list[Any] = []
        for delta in random_splits(text, seed=seed):
            events += session.feed(delta)
        report = session.finish()
    events += report.final_events
    out = released(events)
    assert text.startswith(out) and out == report.released_text
    if "STOP" in text:
        assert report.halted and "STOP" not in out
        halt = next(i for i, e in enumerate(events) if isinstance(e, Halt))
        assert not any(isinstance(e, Release) for e in events[halt:])
    else:
        assert not report.halted and out == text


@pytest.mark.parametrize("hold", [0, 2, 4])
def test_hold_back_releases_a_token_only_once_n_newer_tokens_exist(
    host: PluginHost, hold: int
) -> None:
    g = guard(host, [], release={"hold_back_tokens": hold})
    session = g.session()
    words = TEXT.split(" ")
    seen = ""
    for k, word in enumerate(words):
        seen += released(session.feed(word + " "))
        final = k + 1  # the word just sent is final: whitespace follows it
        expected = " ".join(words[: max(0, final - hold)])
        assert seen == expected, (k, seen)
    report = session.finish()
    assert seen + released(report.final_events) == TEXT + " "


def test_halt_inside_the_hold_back_window_leaks_nothing(host: PluginHost) -> None:
    with plugin_monitors(host, scripted=ScriptedMonitor.factory({"seven": 1.0})):
        g = guard(host, [{"id": "s", "use": "scripted", "action": "halt", "message": "stop"}],
                  release={"hold_back_tokens": 3})
        events, report = run(g, split_text(TEXT, [4]))
    halts = [e for e in events if isinstance(e, Halt)]
    assert len(halts) == 1
    halt = halts[0]
    assert halt.at == 6 and halt.message == "stop"  # "seven" is token 6
    # "four" would have needed "seven" as its 3rd newer token: only 0..2 reached the reader
    assert released(events) == "one two three" == halt.released_text
    assert report.released_tokens == 3 and report.leaked_tokens == 0
    assert halt.retracted_tokens == 4
    assert not any(isinstance(e, Release) for e in events[events.index(halt):])


def test_halt_with_zero_hold_back_reports_what_leaked(host: PluginHost) -> None:
    with plugin_monitors(host, scripted=ScriptedMonitor.factory({"three": 1.0})):
        g = guard(host, [{"id": "s", "use": "scripted", "action": "halt"}],
                  release={"hold_back_tokens": 0})
        events, report = run(g, [w + " " for w in TEXT.split()])
    assert released(events) == "one two"
    assert report.halt is not None and report.halt.at == 2 and report.leaked_tokens == 0


def test_nothing_is_released_after_a_halt_even_if_the_stream_goes_on(host: PluginHost) -> None:
    with plugin_monitors(host, scripted=ScriptedMonitor.factory({"four": 1.0})):
        g = guard(host, [{"id": "s", "use": "scripted", "action": "halt"}],
                  release={"hold_back_tokens": 1})
        session = g.session()
        first = session.feed("one two ") + session.feed("three ") + session.feed("four five ")
        later = session.feed("six seven")
        report = session.finish()
    assert released(first) == "one two"
    assert later == [] and report.final_events == []
    assert report.released_text == "one two"


def test_count_rule_halts_at_the_kth_flagged_token(host: PluginHost) -> None:
    scores = {"one": 0.9, "three": 0.95, "four": 0.2, "six": 0.85, "nine": 0.99}
    with plugin_monitors(host, scripted=ScriptedMonitor.factory(scores)):
        g = guard(host, [{"id": "s", "use": "scripted", "threshold": 0.8,
                          "rule": {"kind": "count", "k": 3}, "action": "halt"}])
        _, report = run(g, [TEXT])
    assert report.halt is not None and report.halt.at == 5  # one, three, six -> third at "six"


def test_consecutive_rule_needs_a_run(host: PluginHost) -> None:
    scores = {"one": 0.9, "three": 0.9, "four": 0.9, "six": 0.9, "seven": 0.9, "eight": 0.9}
    with plugin_monitors(host, scripted=ScriptedMonitor.factory(scores)):
        g = guard(host, [{"id": "s", "use": "scripted", "threshold": 0.5,
                          "rule": {"kind": "consecutive", "k": 3}}])
        events, _ = run(g, [TEXT])
    flags = [e for e in events if isinstance(e, Flag)]
    assert [f.tokens for f in flags] == [(5, 7)]  # six seven eight; three+four is only 2
    assert flags[0].span == (TEXT.index(" six"), TEXT.index(" nine"))


def test_threshold_rule_flags_each_token_with_its_char_span(host: PluginHost) -> None:
    with plugin_monitors(host, scripted=ScriptedMonitor.factory({"two": 0.7, "five": 0.4})):
        g = guard(host, [{"id": "s", "use": "scripted", "threshold": 0.5}])
        events, report = run(g, random_splits(TEXT, seed=1))
    flags = [e for e in events if isinstance(e, Flag)]
    assert [(f.tokens, TEXT[f.span[0]:f.span[1]], f.score) for f in flags] == [
        ((1, 1), " two", 0.7)
    ]
    assert report.released_text == TEXT  # flags don't stop the stream


def test_span_max_rule_decides_per_unit(host: PluginHost) -> None:
    from guardrail import Features, Monitor, Score

    unit_a, unit_b = (8, 18), (28, 39)  # "three four", "seven eight"
    table = {"three": (unit_a, 0.3), "four": (unit_a, 0.6),
             "seven": (unit_b, 0.2), "eight": (unit_b, 0.4)}

    class EntityMonitor(Monitor):
        """Scores only the tokens of two units, naming the unit on each score."""

        def update(self, state: Any, features: Features) -> list[Score]:
            out = []
            for k, i in enumerate(features.indices):
                hit = table.get(features.token_text(k).strip())
                if hit:
                    out.append(Score(i, hit[1], span=hit[0], label="NUM"))
            return out

    with plugin_monitors(host, entity=lambda: EntityMonitor()):
        g = guard(host, [{"id": "e", "use": "entity", "threshold": 0.5,
                          "rule": {"kind": "span_max"}}])
        events, _ = run(g, split_text(TEXT, [3]))
    flags = [e for e in events if isinstance(e, Flag)]
    assert [(f.span, f.label, f.score, f.tokens) for f in flags] == [(unit_a, "NUM", 0.6, (2, 3))]


def test_redact_masks_the_span_in_released_text(host: PluginHost) -> None:
    g = guard(host, [{"id": "pii", "use": "regex", "action": "redact",
                      "options": {"patterns": [r"\d{3}-\d{4}"]}}],
              release={"hold_back_tokens": 4})
    text = "call me at 555-1234 tomorrow please, or later today"
    events, _report = run(g, random_splits(text, seed=2))
    assert released(events) == "call me at [REDACTED] tomorrow please, or later today"
    assert [f.action for f in events if isinstance(f, Flag)] == ["redact"]


def test_fail_open_records_the_error_and_keeps_streaming(host: PluginHost) -> None:
    with plugin_monitors(host, failing=lambda: FailingMonitor(after=3)):
        g = guard(host, [{"id": "f", "use": "failing"}], on_error="fail_open")
        events, report = run(g, split_text(TEXT, [6]))
    errors = [e for e in events if isinstance(e, Error)]
    assert len(errors) == 1 and errors[0].outcome == "fail_open"
    assert "exploded" in errors[0].error and errors[0].error_type == "RuntimeError"
    assert report.released_text == TEXT and not report.halted


def test_fail_closed_halts_with_the_policy_message(host: PluginHost) -> None:
    with plugin_monitors(host, failing=lambda: FailingMonitor(after=3)):
        g = guard(host, [{"id": "f", "use": "failing"}], on_error="fail_closed",
                  halt_message="Sorry, the safety check failed.")
        events, report = run(g, split_text(TEXT, [6]))
    assert isinstance(events[-1], Halt)
    assert report.halt is not None
    assert report.halt.message == "Sorry, the safety check failed."
    assert "monitor failed: RuntimeError" in report.halt.reason
    assert [e.outcome for e in report.errors] == ["fail_closed"]


def test_monitor_level_on_error_overrides_the_policy(host: PluginHost) -> None:
    with plugin_monitors(host, failing=lambda: FailingMonitor(after=0)):
        g = guard(host, [{"id": "f", "use": "failing", "on_error": "fail_open"}],
                  on_error="fail_closed")
        _, report = run(g, [TEXT])
    assert not report.halted and report.released_text == TEXT


def test_a_monitor_over_its_time_budget_counts_as_failed(host: PluginHost) -> None:
    with plugin_monitors(host, slow=lambda: SlowMonitor(0.03)):
        g = guard(host, [{"id": "slow", "use": "slow", "timeout_ms": 5}], on_error="fail_closed")
        _, report = run(g, [TEXT])
    assert report.halted and report.errors[0].error_type == "TimeoutError"
    assert "budget of 5 ms" in report.errors[0].error


def test_interleaved_sessions_on_one_guard_do_not_share_state(host: PluginHost) -> None:
    with plugin_monitors(host, counting=lambda: CountingMonitor(every=3)):
        g = guard(host, [{"id": "c", "use": "counting", "rule": {"kind": "count", "k": 2},
                          "action": "halt"}])
        a, b = g.session(), g.session()
        for word in TEXT.split()[:4]:
            a.feed(word + " ")
        for word in TEXT.split()[:2]:
            b.feed(word + " ")
        for word in TEXT.split()[4:]:
            a.feed(word + " ")
        for word in TEXT.split()[2:]:
            b.feed(word + " ")
        ra, rb = a.finish(), b.finish()
    # each stream halts at its own 6th token (3rd and 6th scored 1.0, k=2)
    assert ra.halt is not None and rb.halt is not None
    assert ra.halt.at == rb.halt.at == 5


def test_route_event_then_reroute_continues_from_the_prefix(host: PluginHost) -> None:
    with plugin_monitors(host, scripted=ScriptedMonitor.factory({"four": 0.9})):
        g = guard(host, [{"id": "r", "use": "scripted", "action": "route",
                          "route_to": {"model": "large", "base_url": "http://127.0.0.1:9/v1"}}],
                  release={"hold_back_tokens": 2})
        session = g.session(can_route=True)
        events = session.feed("one two three four five six ")
        routes = [e for e in events if isinstance(e, Route)]
        assert len(routes) == 1 and routes[0].at == 3
        assert routes[0].prefix == "one two three" == released(events)
        assert routes[0].target["model"] == "large"
        session.reroute(routes[0].at_char)
        session.feed(" 4, from the large model.")
        report = session.finish()
    assert report.released_text == "one two three 4, from the large model."
    assert [r.at for r in report.routes] == [3]


def test_reroute_makes_monitors_forget_the_cut_tokens(host: PluginHost) -> None:
    from guardrail import Features, Monitor, Score

    class TranscriptMonitor(Monitor):
        """Keeps the tokens it read; routes on "four"."""

        def start(self, context: Any) -> list[str]:
            return []

        def update(self, state: list[str], features: Features) -> list[Score]:
            words = [features.token_text(k) for k in range(len(features.indices))]
            state.extend(words)
            return [Score(i, 0.9 if w.strip() == "four" else 0.0)
                    for i, w in zip(features.indices, words, strict=True)]

        def truncate(self, state: list[str], n_tokens: int) -> None:
            del state[n_tokens:]

    transcripts: list[list[str]] = []

    class Recording(TranscriptMonitor):
        def start(self, context: Any) -> list[str]:
            transcripts.append([])
            return transcripts[-1]

    with plugin_monitors(host, transcript=lambda **_: Recording()):
        g = guard(host, [{"id": "r", "use": "transcript", "action": "route",
                          "route_to": {"model": "large"}}], release={"hold_back_tokens": 2})
        session = g.session(can_route=True)
        route = next(e for e in session.feed("one two three four five six ")
                     if isinstance(e, Route))
        session.reroute(route.at_char)
        session.feed(" 4, fine.")
        session.finish()
    assert "".join(transcripts[0]) == "one two three 4, fine."


def test_routes_are_only_recorded_when_the_driver_cannot_route(host: PluginHost) -> None:
    with plugin_monitors(host, scripted=ScriptedMonitor.factory({"four": 0.9})):
        g = guard(host, [{"id": "r", "use": "scripted", "action": "route",
                          "route_to": {"model": "large"}}])
        _events, report = run(g, [TEXT])
    assert [r.at for r in report.routes] == [3] and report.released_text == TEXT


def test_generator_steps_carry_their_own_tokens_and_states(host: PluginHost) -> None:
    from guardrail import Features, Monitor, Needs, Score

    seen: list[Any] = []

    class LayerMonitor(Monitor):
        def needs(self) -> Needs:
            return Needs(layers=frozenset({3}))

        def update(self, state: Any, features: Features) -> list[Score]:
            seen.append(features.hidden[3])
            return [Score(i, float(v)) for i, v in zip(features.indices, features.hidden[3],
                                                        strict=True)]

    with plugin_monitors(host, layer=lambda: LayerMonitor()):
        g = Guard.from_policy({"monitors": [{"id": "l", "use": "layer", "action": "halt",
                                             "threshold": 5}],
                               "release": {"hold_back_tokens": 1}},
                              host=host, observer=object())  # no observer forward happens
        session = g.session()
        out = session.feed(StreamStep("Hi there", tokens=[StepToken(1, "Hi"),
                                                          StepToken(2, " there")],
                                      hidden={3: [1.0, 2.0]}))
        out += session.feed(StreamStep("!", tokens=[StepToken(3, "!")], hidden={3: [7.0]}))
        report = session.finish()
    assert seen == [[1.0, 2.0], [7.0]]
    assert released(out) == "Hi" and report.halt is not None and report.halt.at == 2


def test_hooks_see_every_event_and_the_session_lifecycle(host: PluginHost) -> None:
    from guardrail import hookimpl

    log: list[str] = []

    class Audit:
        @hookimpl
        def guardrail_session_start(self, session: Any) -> None:
            log.append("start")

        @hookimpl
        def guardrail_on_event(self, event: Any, session: Any) -> None:
            log.append(event.kind)

        @hookimpl
        def guardrail_session_end(self, session: Any, report: Any) -> None:
            log.append(f"end halted={report.halted}")

    host.register(Audit(), name="audit")
    g = guard(host, [{"id": "kw", "use": "keywords", "options": {"words": ["four"]},
                      "action": "halt"}], release={"hold_back_tokens": 1})
    run(g, [w + " " for w in TEXT.split()])
    assert log == ["start", "release", "release", "halt", "end halted=True"]


def test_abort_ends_the_stream_with_a_report(host: PluginHost) -> None:
    g = guard(host, [], release={"hold_back_tokens": 2})
    session = g.session()
    session.feed("one two three four ")
    report = session.abort("upstream dropped the connection")
    assert report.aborted == "upstream dropped the connection"
    assert report.released_text == "one two" and report.tokens == 4
    with pytest.raises(Exception, match="ended"):
        session.feed("more")
