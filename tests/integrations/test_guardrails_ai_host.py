"""Guardrails AI (real, in its own venv) with our registered validator on a replayed stream."""

from __future__ import annotations

from typing import Any

import pytest

from .hosts import HALT_MESSAGE, TRIGGER, harmful_and_benign, keyword_policy, run_replays


@pytest.fixture(scope="module")
def rows() -> list[dict[str, Any]]:
    runs = [{"name": on_fail, "validator": "guardrail", "on_fail": on_fail,
             "policy": keyword_policy()} for on_fail in ("exception", "fix", "noop")]
    job = {"replays": harmful_and_benign(), "runs": runs}
    return list(run_replays("guardrails-ai", "guardrail_guardrails_ai.replay", job)["rows"])


def _row(rows: list[dict[str, Any]], run: str, label: int) -> dict[str, Any]:
    return next(r for r in rows if r["run"] == run and r["label"] == label)


def test_exception_stops_the_stream_before_the_trigger_completes(
        rows: list[dict[str, Any]]) -> None:
    harmful = harmful_and_benign()[0]["response"]
    row = _row(rows, "exception", 1)
    assert row["raised"] and row["raised"].startswith("ValidationError")
    assert harmful.startswith(row["shown"]) and TRIGGER not in row["shown"]


def test_fix_shows_released_text_then_the_halt_message(rows: list[dict[str, Any]]) -> None:
    harmful = harmful_and_benign()[0]["response"]
    shown = _row(rows, "fix", 1)["shown"]
    assert shown.endswith(HALT_MESSAGE)
    released = shown[: -len(HALT_MESSAGE)].removesuffix("\n\n")  # the message stands apart
    assert released and harmful.startswith(released) and TRIGGER not in released


def test_error_spans_point_at_the_trigger(rows: list[dict[str, Any]]) -> None:
    harmful = harmful_and_benign()[0]["response"]
    for run in ("exception", "fix", "noop"):
        row = _row(rows, run, 1)
        assert not row["passed"] and row["error_spans"]
        for span in row["error_spans"]:  # Guardrails reports them as offsets into the output
            assert span["reason"].startswith("weapons:")
            assert TRIGGER in harmful[span["start"]:span["end"]]
    # noop keeps going, so the trigger's second mention is reported too
    assert len(_row(rows, "noop", 1)["error_spans"]) == harmful.count(TRIGGER) == 2


def test_noop_keeps_streaming_and_marks_the_output_failed(rows: list[dict[str, Any]]) -> None:
    row = _row(rows, "noop", 1)
    assert row["shown"] == harmful_and_benign()[0]["response"] and row["passed"] is False


def test_benign_stream_passes_untouched(rows: list[dict[str, Any]]) -> None:
    benign = harmful_and_benign()[1]["response"]
    for run in ("exception", "fix", "noop"):
        row = _row(rows, run, 0)
        assert row["shown"] == benign and row["passed"] and row["error_spans"] == []
