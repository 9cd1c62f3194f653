"""Reads when a decision is due, or sent ahead in the background (``observer.read_ahead``): a
text stream's tokens are gathered into fewer observer forwards, and what the reader sees
(releases, halts, flags) is what reading every delta gives."""

from __future__ import annotations

import json
import time
from importlib import resources
from typing import Any

import pytest

from guardrail import Features, Guard, Monitor, Needs, Score
from guardrail.errors import GuardrailError
from guardrail.events import Event, Flag, Halt, Release, Route
from guardrail.policy import Policy
from guardrail.session import Report
from guardrail.testing import plugin_monitors, random_splits, split_text

from .streams import TEXT, RowNorm


class TextLengthMonitor(Monitor):
    """Reads ``Features.text`` (the whole response so far, partial words included): scores 1.0
    on a token when the text seen with it ends inside a word."""

    def __init__(self, options: Any = None) -> None:
        pass

    def update(self, state: Any, features: Features) -> list[Score]:
        mid_word = bool(features.text) and not features.text[-1].isspace()
        return [Score(i, 1.0 if mid_word and k == 0 else 0.0)
                for k, i in enumerate(features.indices)]


class WordEndMonitor(Monitor):
    """Reads layer 1 (so it waits for the observer) and scores 1.0 on the token that ends one
    of ``WORDS``, whatever the tokenizer made of the word."""

    WORDS = ("paris", "bomb", "cheese")

    def __init__(self, options: Any = None) -> None:
        pass

    def needs(self) -> Needs:
        return Needs(layers=frozenset({1}))

    def update(self, state: Any, features: Features) -> list[Score]:
        text = features.text.lower()
        ends = {m + len(w) - 1 for w in self.WORDS for m in _find_all(text, w)}
        return [Score(i, 1.0 if any(t.start <= e < t.end for e in ends) else 0.0)
                for i, t in zip(features.indices, features.tokens, strict=True)]


def _find_all(text: str, word: str) -> list[int]:
    out, at = [], text.find(word)
    while at >= 0:
        out.append(at)
        at = text.find(word, at + 1)
    return out


def _policy(max_delay_ms: float, hold_back: int = 8, read_ahead: bool = False) -> dict[str, Any]:
    return {
        "observer": {"max_delay_ms": max_delay_ms, "read_ahead": read_ahead},
        "release": {"hold_back_tokens": hold_back},
        "monitors": [
            {"id": "norm", "use": "row-norm", "threshold": 40.0, "action": "flag"},
            {"id": "mid", "use": "text-length", "threshold": 0.5, "action": "redact"},
            {"id": "words", "use": "word-end", "threshold": 0.5, "action": "halt",
             "rule": {"kind": "count", "k": 2}},
        ],
    }


def _run(observer: Any, policy: dict[str, Any], deltas: list[str],
         pause: float = 0.0) -> tuple[list[Event], Report]:
    with plugin_monitors(row_norm=RowNorm, text_length=TextLengthMonitor,
                         word_end=WordEndMonitor) as host:
        guard = Guard.from_policy(policy, host=host, observer=observer)
        session = guard.session(prompt="Tell me about Paris.", record_scores=True)
        events: list[Event] = []
        for delta in deltas:
            if pause:
                time.sleep(pause)
            events += session.feed(delta)
        report = session.finish()
    return events + report.final_events, report


def _seen(events: list[Event], report: Report) -> dict[str, Any]:
    """What the reader and the audit see, without timing."""
    halts = [e for e in events if isinstance(e, Halt)]
    return {
        "released": "".join(e.text for e in events if isinstance(e, Release)),
        "release_ends": [e.end for e in events if isinstance(e, Release)],
        "halt": [(h.monitor, h.at, h.at_char, h.released_text, h.retracted_tokens)
                 for h in halts],
        "flags": [(f.monitor, f.tokens, f.span, f.action) for f in events
                  if isinstance(f, Flag)],
        "report": (report.tokens, report.released_tokens, report.released_text, report.halted),
    }


def _scores_close(a: Report, b: Report) -> None:
    assert a.scores.keys() == b.scores.keys()
    for key in a.scores:
        assert [i for i, _ in a.scores[key]] == [i for i, _ in b.scores[key]]
        assert [v for _, v in a.scores[key]] == pytest.approx([v for _, v in b.scores[key]],
                                                              rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("read_ahead", [False, True])
@pytest.mark.parametrize("text,cut", [
    (TEXT, "words"),  # halts on the second scripted word (paris ... bomb)
    (TEXT, "random"),
    (TEXT.replace("bomb", "kite").replace("Paris", "Lyon"), "random"),  # no halt
    (TEXT.replace("bomb", "kite").replace("Paris", "Lyon"), "chars"),
])
def test_deferred_reads_release_what_per_delta_reads_release(observer: Any, text: str,
                                                             cut: str, read_ahead: bool) -> None:
    if cut == "words":
        words = text.split(" ")
        deltas = [w + " " for w in words[:-1]] + words[-1:]
    elif cut == "chars":
        deltas = split_text(text, [1])
    else:
        deltas = random_splits(text, seed=7)
    every_events, every = _run(observer, _policy(0), deltas)
    gathered_events, gathered = _run(observer, _policy(1e9, read_ahead=read_ahead), deltas)
    assert _seen(gathered_events, gathered) == _seen(every_events, every)
    _scores_close(gathered, every)
    if read_ahead:  # as many reads as the observer's pace allows: timing, at most one per delta
        assert gathered.observer_reads <= every.observer_reads
    else:  # about one read per hold-back + 1 tokens, against one per delta with tokens
        assert gathered.observer_reads <= every.tokens // 8 + 2 < every.observer_reads
    if "bomb" in text:
        assert every.halted and every.halt is not None
        assert every.leaked_tokens == 0 and every.halt.retracted_tokens >= 8


@pytest.mark.parametrize("read_ahead", [False, True])
@pytest.mark.parametrize("hold_back", [0, 1, 3])
def test_small_hold_backs_keep_per_delta_results(observer: Any, hold_back: int,
                                                 read_ahead: bool) -> None:
    deltas = random_splits(TEXT, seed=3)
    every_events, every = _run(observer, _policy(0, hold_back), deltas)
    gathered_events, gathered = _run(observer, _policy(1e9, hold_back, read_ahead), deltas)
    assert _seen(gathered_events, gathered) == _seen(every_events, every)
    if hold_back == 0:  # nothing is held back, so nothing waits for a read either
        assert gathered.observer_reads == every.observer_reads


def test_no_read_waits_once_max_delay_has_passed(observer: Any) -> None:
    """With a 1 ms deadline and deltas 5 ms apart, text never waits for a second delta."""
    text = TEXT.replace("bomb", "kite").replace("Paris", "Lyon")
    deltas = [w + " " for w in text.split(" ")]
    lazy_events, lazy = _run(observer, _policy(1e9), deltas)
    paced_events, paced = _run(observer, _policy(1), deltas, pause=0.005)
    assert paced.observer_reads >= (len(deltas) - 8) // 2 > lazy.observer_reads
    assert _seen(paced_events, paced) == _seen(lazy_events, lazy)
    assert paced.released_text == text + " "


@pytest.mark.real_model
@pytest.mark.slow
def test_default_guard_gathered_reads_match_per_delta_reads() -> None:
    """The shipped default guard (harm, entity, router on SmolLM2) on a recorded harmful replay
    that halts and a hallucinated biography, fed word by word: same releases, halts and flags
    read per delta, when due, and ahead (paced like an upstream, so reads go ahead)."""
    from guardrail.guard import default_policy

    def with_delay(max_delay_ms: float, read_ahead: bool = False) -> Policy:
        base = default_policy()
        if base.observer is None:
            pytest.skip("no installed monitor reads the observer")
        observer = base.observer.model_copy(update={"max_delay_ms": max_delay_ms,
                                                    "read_ahead": read_ahead})
        return base.model_copy(update={"observer": observer})

    try:
        guard_every = Guard(with_delay(0))
    except GuardrailError as exc:  # SmolLM2 or the plugins' weights are optional here
        pytest.skip(str(exc))
    guard_gathered = Guard(with_delay(1e9), observer=guard_every.observer)
    guard_ahead = Guard(with_delay(1e9, read_ahead=True), observer=guard_every.observer)
    lines = resources.files("guardrail").joinpath("data/demo_replays.jsonl").read_text("utf-8")
    replays = [json.loads(line) for line in lines.splitlines() if line.strip()]
    for replay in (replays[2], replays[3]):
        deltas = [w + " " for w in replay["response"].split(" ")]
        seen = []
        for guard in (guard_every, guard_gathered, guard_ahead):
            session = guard.session(prompt=replay["prompt"])
            events = []
            for d in deltas:
                if guard is guard_ahead:  # an upstream at about 40 tokens/s: reads go ahead
                    time.sleep(0.03)
                events += session.feed(d)
            report = session.finish()
            seen.append((_seen(events + report.final_events, report), report.observer_reads))
        assert seen[0][0] == seen[1][0] == seen[2][0]
        assert seen[1][1] < seen[0][1] and seen[2][1] <= seen[0][1]
        if replay["expect"] == "halt":
            assert seen[0][0]["halt"], "the recorded harmful replay no longer halts"


def _route_run(observer: Any, max_delay_ms: float,
               read_ahead: bool = False) -> tuple[list[Event], Report]:
    policy = {
        "observer": {"max_delay_ms": max_delay_ms, "read_ahead": read_ahead},
        "release": {"hold_back_tokens": 4},
        "monitors": [
            {"id": "norm", "use": "row-norm", "threshold": 40.0, "action": "flag"},
            {"id": "to-large", "use": "word-end", "threshold": 0.5, "action": "route",
             "route_to": {"model": "large"}},
        ],
    }
    with plugin_monitors(row_norm=RowNorm, word_end=WordEndMonitor) as host:
        guard = Guard.from_policy(policy, host=host, observer=observer)
        session = guard.session(prompt="Tell me about France.", record_scores=True,
                                can_route=True)
        events: list[Event] = []
        upstream = iter(w + " " for w in TEXT.split(" "))
        for delta in upstream:
            out = session.feed(delta)
            events += out
            route = next((e for e in out if isinstance(e, Route)), None)
            if route is not None:  # the driver continues with the target from the prefix
                session.reroute(route.at_char)
                for word in "Lyon, said the large model, and then the stream ends.".split(" "):
                    events += session.feed(" " + word)
                break
        report = session.finish()
    return events + report.final_events, report


@pytest.mark.parametrize("read_ahead", [False, True])
def test_a_route_found_by_a_gathered_read_cuts_back_like_a_read_per_delta(
        observer: Any, read_ahead: bool) -> None:
    """The route lands on the same token; the tokens read past it are forgotten by the observer
    too (the states of the target's text match a read per delta)."""
    every_events, every = _route_run(observer, 0)
    gathered_events, gathered = _route_run(observer, 1e9, read_ahead)
    assert [r.at for r in gathered.routes] == [r.at for r in every.routes] != []
    assert _seen(gathered_events, gathered) == _seen(every_events, every)
    assert gathered.released_text.endswith("and then the stream ends.")
    _scores_close(gathered, every)
