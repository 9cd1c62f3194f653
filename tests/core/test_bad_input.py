"""Hostile and odd input: evasion, broken text, huge and empty streams."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from guardrail import Guard
from guardrail.plugins import PluginHost
from guardrail.testing import random_splits

HALT_ON_BOMB = {"release": {"hold_back_tokens": 3},
                "monitors": [{"id": "w", "use": "keywords", "action": "halt",
                              "options": {"words": ["pipe bomb"]}}]}


def stream(guard: Guard, text: str, seed: int = 0) -> tuple[str, bool]:
    session = guard.session()
    for delta in random_splits(text, seed=seed):
        session.feed(delta)
    report = session.finish()
    return report.released_text, report.halted


@pytest.mark.parametrize("evasion", [
    "a pipe b\u200bomb",          # zero-width space inside the word
    "a pipe bоmb",                # Cyrillic о
    "a PIPE\u00a0BOMB",           # no-break space, capitals
    "a ｐｉｐｅ ｂｏｍｂ",          # full-width letters (NFKC)
])
def test_zero_width_and_homoglyph_evasions_still_halt(host: PluginHost, evasion: str) -> None:
    guard = Guard.from_policy(HALT_ON_BOMB, host=host)
    released, halted = stream(guard, f"Here is how to make {evasion} at home, step by step.")
    assert halted and "pipe" not in released.lower() and "ｐ" not in released


def test_normalization_can_be_switched_off(host: PluginHost) -> None:
    policy = json.loads(json.dumps(HALT_ON_BOMB))
    policy["monitors"][0]["options"]["normalize"] = False
    released, halted = stream(Guard.from_policy(policy, host=host), "a pipe bоmb here")
    assert not halted and released == "a pipe bоmb here"


def test_lone_surrogates_and_control_characters_pass_through(host: PluginHost,
                                                             tmp_path: Path) -> None:
    policy = {**HALT_ON_BOMB, "audit": {"path": str(tmp_path / "audit.jsonl")}}
    guard = Guard.from_policy(policy, host=host)
    text = "odd \ud800 text \x00 with \U0001f600 and \udfff then a pipe bomb now ok"
    released, halted = stream(guard, text)
    assert halted and text.startswith(released) and "pipe" not in released
    assert released.startswith("odd \ud800 text \x00 with \U0001f600")
    assert "halt" in (tmp_path / "audit.jsonl").read_text()


def test_a_single_megabyte_delta_without_spaces(host: PluginHost) -> None:
    guard = Guard.from_policy(HALT_ON_BOMB, host=host)
    session = guard.session()
    session.feed("x" * 1_000_000)
    session.feed(".,;" * 1000)
    report = session.finish()
    assert report.released_text == "x" * 1_000_000 + ".,;" * 1000


def test_empty_streams(host: PluginHost) -> None:
    guard = Guard.from_policy(HALT_ON_BOMB, host=host)
    session = guard.session()
    assert session.feed("") == []
    report = session.finish()
    assert report.tokens == 0 and report.released_text == "" and not report.halted
    whitespace = guard.session()
    whitespace.feed("   \n\t ")
    assert whitespace.finish().released_text == "   \n\t "


def test_a_100k_token_stream_keeps_working(host: PluginHost) -> None:
    guard = Guard.from_policy(HALT_ON_BOMB, host=host)
    session = guard.session()
    released = 0
    for _ in range(25_000):
        released += sum(len(e.text) for e in session.feed("one two three four ")
                        if e.kind == "release")
    report = session.finish()
    assert report.tokens == 100_001 and not report.halted  # the trailing space is a token
    assert released + sum(len(e.text) for e in report.final_events) == 25_000 * 19
