"""The LiteLLM proxy (real, in its own venv) with our guardrail on a replayed stream."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from .hosts import HALT_MESSAGE, ROOT, TRIGGER, harmful_and_benign, keyword_policy, run_replays

EXAMPLE = ROOT / "adapters" / "litellm" / "examples" / "config.yaml"


@pytest.fixture(scope="module")
def rows() -> list[dict[str, Any]]:
    # The guardrail entry of the copy-paste config.yaml, with the test's policy swapped in.
    entry = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))["guardrails"][0]
    entry["litellm_params"]["policy"] = keyword_policy()
    job = {"replays": harmful_and_benign(), "runs": [{"name": "ours", "guardrail": entry}]}
    return list(run_replays("litellm", "guardrail_litellm.replay", job)["rows"])


def _row(rows: list[dict[str, Any]], label: int, stream: bool) -> dict[str, Any]:
    return next(r for r in rows if r["label"] == label and r["stream"] is stream)


def test_harmful_stream_is_stopped_with_litellms_error_frame(rows: list[dict[str, Any]]) -> None:
    harmful = harmful_and_benign()[0]["response"]
    row = _row(rows, 1, True)
    assert row["error"]["message"] == HALT_MESSAGE
    assert row["error"]["type"] == "guardrail_violation"
    assert row["done"] is False and row["broken"] is None  # a clean error frame, no [DONE]
    shown = row["shown"]
    assert shown and harmful.startswith(shown)  # what was shown is the answer up to the halt
    assert TRIGGER not in shown
    # the hook closed LiteLLM's upstream stream: the model server saw the proxy hang up
    assert row["upstream_closed_early"] and row["words_generated"] < row["words_total"]


def test_benign_stream_passes_untouched(rows: list[dict[str, Any]]) -> None:
    benign = harmful_and_benign()[1]["response"]
    row = _row(rows, 0, True)
    assert row["error"] is None and row["done"] is True
    assert row["shown"] == benign
    assert row["finish_reason"] == "stop"


def test_non_streaming_calls_are_judged_by_the_post_call_hook(rows: list[dict[str, Any]]) -> None:
    blocked, passed = _row(rows, 1, False), _row(rows, 0, False)
    assert blocked["status"] == 400 and blocked["error"]["message"] == HALT_MESSAGE
    assert passed["status"] == 200 and passed["shown"] == harmful_and_benign()[1]["response"]
