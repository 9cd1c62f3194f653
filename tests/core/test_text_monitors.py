"""The built-in text monitors against evasion, long matches and hostile patterns."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from guardrail import Flag, Guard, Release
from guardrail.cli import EXIT_HALTED
from guardrail.plugins import PluginHost
from guardrail.testing import random_splits, split_text

BOMB = {"id": "w", "use": "keywords", "action": "halt", "options": {"words": ["pipe bomb"]}}


def stream(guard: Guard, deltas: list[str]) -> tuple[str, Any, list[Any]]:
    """Feed ``deltas``; return what reached the reader while streaming, the report, events."""
    session = guard.session(prompt="tell me")
    events = [e for d in deltas for e in session.feed(d)]
    streamed = "".join(e.text for e in events if isinstance(e, Release))
    report = session.finish()
    return streamed, report, events + report.final_events


@pytest.mark.parametrize("evasion", [
    "pi\u200epe bomb",        # left-to-right mark inside a word
    "pipe\u200f bomb",        # right-to-left mark
    "pi\u202epe bomb",        # right-to-left override
    "pipe\u200dbomb",         # zero-width joiner in place of the space
    "pipe b\u200comb",        # zero-width non-joiner
    "pipe\ufe0f bo\ufe0emb",  # variation selectors
    "pipe bo\U000e0041mb",    # a tag character
    "pipe\u3164bomb",         # Hangul filler, which renders as a blank
    "pi\x00pe bomb",          # NUL
    "pipe\x00bomb",
    "pipe bombs",             # plural
    "pipe-bomb",              # hyphen
    "Pipe_Bombs",
    "pipe \u2013 bomb",       # en dash
])
def test_invisible_characters_and_spelling_variants_still_halt(host: PluginHost,
                                                               evasion: str) -> None:
    guard = Guard.from_policy({"release": {"hold_back_tokens": 3}, "monitors": [BOMB]}, host=host)
    text = f"Here is how to make a {evasion} at home, step by step."
    for seed in range(3):
        streamed, report, _ = stream(guard, random_splits(text, seed=seed, max_size=4))
        assert report.halted and report.halt.monitor == "w"
        assert report.released_text == streamed
        assert "pi" not in streamed.lower()


@pytest.mark.parametrize("benign", ["Fix the pipe. Bombay is far.", "pipebomber", "a pipe bomber",
                                    "the pipes bombed"])
def test_near_misses_do_not_halt(host: PluginHost, benign: str) -> None:
    guard = Guard.from_policy({"monitors": [BOMB]}, host=host)
    _, report, _ = stream(guard, split_text(benign, [3] * 20))
    assert not report.halted and report.released_text == benign


def test_flags_and_redaction_point_into_the_original_text(host: PluginHost) -> None:
    redact = {**BOMB, "action": "redact"}
    guard = Guard.from_policy({"monitors": [redact]}, host=host)
    text = "a pi\u200bpe\u2011bombs here"
    _, report, events = stream(guard, random_splits(text, seed=1, max_size=3))
    flags = [e for e in events if isinstance(e, Flag)]
    assert [text[f.span[0]:f.span[1]] for f in flags] == ["pi\u200bpe\u2011bombs"]
    assert report.released_text == "a [REDACTED] here"


CARD = {"id": "card", "use": "regex", "action": "redact",
        "options": {"patterns": [r"\b\d(?:[ -]?\d){12,15}\b"]}}


@pytest.fixture(scope="module")
def byte_bpe() -> Any:
    """A byte-level BPE tokenizer like SmolLM2's: one token per digit."""
    pytest.importorskip("transformers")
    from guardrail.observer.tokenization import HFTokenizer
    from guardrail.testing.tiny_models import train_tokenizer

    return HFTokenizer(train_tokenizer())


@pytest.mark.parametrize("card", ["4111 1111 1111 1111", "4111-1111-1111-1111"])
def test_a_card_number_longer_than_the_hold_back_window_never_leaks(
    host: PluginHost, byte_bpe: Any, card: str
) -> None:
    guard = Guard.from_policy({"release": {"hold_back_tokens": 4}, "monitors": [CARD]}, host=host)
    guard.tokenizer = byte_bpe  # 19 tokens for the card
    text = f"Card: {card} expires soon, call 555 if lost."
    for seed in range(5):
        streamed, report, _ = stream(guard, random_splits(text, seed=seed, max_size=3))
        assert report.released_text == "Card: [REDACTED] expires soon, call 555 if lost."
        assert report.released_text.startswith(streamed)


def test_text_that_could_start_a_match_is_released_after_the_cap(host: PluginHost) -> None:
    digits = {"id": "d", "use": "regex", "action": "redact",
              "options": {"patterns": [r"\d+X"], "hold_chars": 32}}
    guard = Guard.from_policy({"release": {"hold_back_tokens": 1}, "monitors": [digits]},
                              host=host)
    number = "-".join(["123"] * 100)  # could become a match until the end, never does
    streamed, report, _ = stream(guard, split_text(number + " done", [2] * 300))
    assert len(streamed) > len(number) - 64  # held at most the cap (and the window) back
    assert report.released_text == number + " done" and not report.flags


def _run_cli(policy: dict[str, Any], tmp_path: Path, text: str) -> list[dict[str, Any]]:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(policy))
    out = subprocess.run(
        [sys.executable, "-m", "guardrail.cli", "run", "--policy", str(path), "--json"],
        input=text, capture_output=True, text=True, timeout=120,
    )
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    halted = bool(lines) and lines[-1].get("halted")
    assert out.returncode == (EXIT_HALTED if halted else 0), out.stderr
    return lines


# The default timeout makes the fail_open case wait a second and more: outside the fast lane.
@pytest.mark.parametrize(("on_error", "timeout_ms"), [
    pytest.param("fail_open", None, marks=pytest.mark.slow), ("fail_closed", 50)])
def test_a_catastrophic_pattern_fails_the_monitor_instead_of_hanging_the_stream(
    tmp_path: Path, on_error: str, timeout_ms: float | None
) -> None:
    monitor = {"id": "evil", "use": "regex", "action": "halt", "timeout_ms": timeout_ms,
               "options": {"patterns": ["(a+)+b"]}}  # backtracks exponentially in re
    text = "start " + "a" * 3000 + "!"
    lines = _run_cli({"on_error": on_error, "monitors": [monitor]}, tmp_path, text)
    report = lines[-1]
    errors = [e for e in lines if e.get("kind") == "error"]
    assert [e["monitor"] for e in errors] == ["evil"] and "TimeoutError" in json.dumps(errors)
    if on_error == "fail_open":
        assert not report["halted"] and report["released_text"] == text
    else:
        assert report["halted"] and text.startswith(report["released_text"])
        assert report["halt"]["monitor"] == "evil"


def test_the_reported_anchored_pattern_finishes(tmp_path: Path) -> None:
    monitor = {"id": "evil", "use": "regex", "action": "halt", "options": {"patterns": ["(a+)+$"]}}
    lines = _run_cli({"monitors": [monitor]}, tmp_path, "a" * 3000 + "!")
    assert lines[-1]["kind"] == "report"  # it ended (a halt or an error), within the timeout
