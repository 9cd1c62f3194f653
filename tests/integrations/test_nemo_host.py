"""NeMo Guardrails (real, in its own venv) with our output rail and guarded model."""

from __future__ import annotations

from typing import Any

import pytest

from .hosts import HALT_MESSAGE, ROOT, TRIGGER, harmful_and_benign, keyword_policy, run_replays

# NeMo starts in its own venv, a subprocess per module: seconds, so outside the fast lane.
pytestmark = pytest.mark.slow

EXAMPLE = ROOT / "adapters" / "nemo" / "examples" / "config"


@pytest.fixture(scope="module")
def rows() -> list[dict[str, Any]]:
    policy = keyword_policy()
    runs = [
        {"name": "model", "mode": "model", "policy": policy},
        {"name": "rail", "mode": "rail", "policy": policy, "chunk_size": 200,
         "context_size": 50, "stream_first": False},
    ]
    job = {"replays": harmful_and_benign(), "runs": runs}
    return list(run_replays("nemo", "guardrail_nemo.replay", job)["rows"])


def _row(rows: list[dict[str, Any]], run: str, label: int) -> dict[str, Any]:
    return next(r for r in rows if r["run"] == run and r["label"] == label)


def test_guarded_model_halts_at_the_token_and_stops_the_upstream(
        rows: list[dict[str, Any]]) -> None:
    harmful = harmful_and_benign()[0]["response"]
    row = _row(rows, "model", 1)
    assert row["shown"].endswith(HALT_MESSAGE)
    released = row["shown"][: -len(HALT_MESSAGE)].removesuffix("\n\n")  # the message stands apart
    assert released and harmful.startswith(released) and TRIGGER not in released
    assert row["words_generated"] < row["words_total"]  # generation stopped early


def test_output_rail_blocks_with_nemos_error(rows: list[dict[str, Any]]) -> None:
    row = _row(rows, "rail", 1)
    assert row["blocked"]["type"] == "guardrails_violation"
    assert TRIGGER not in row["shown"]  # stream_first False: nothing of the window leaked


def test_example_config_directory_blocks_its_policy_words() -> None:
    job = {"replays": [{"prompt": "hi", "label": 1, "response":
                        "First you get a detonator and then you wait for the night."}],
           "runs": [{"name": "example", "mode": "rail", "config_path": str(EXAMPLE)}]}
    row = run_replays("nemo", "guardrail_nemo.replay", job)["rows"][0]
    assert row["blocked"]["param"] == "guardrail check output" and row["shown"] == ""


def test_benign_stream_passes_untouched(rows: list[dict[str, Any]]) -> None:
    benign = harmful_and_benign()[1]["response"]
    for run in ("model", "rail"):
        row = _row(rows, run, 0)
        assert row["blocked"] is None and row["shown"] == benign
