"""Replay recorded answers through a real Guardrails AI ``Guard`` and report what its caller saw.

    python -m guardrail_guardrails_ai.replay < job.json

The job (JSON on stdin): ``{"replays": [{"prompt", "response", "label"?}], "runs": [{"name",
"validator": "guardrail" | "ban_list", "on_fail": "exception" | "fix" | "noop", "policy":
<guardrail policy mapping> (guardrail), "banned_words": [...] (ban_list, Guardrails' own
keyword validator from ``guardrails-ai-ban-list``)}]}``. The LLM is a callable that yields the
recorded answer word by word and counts what it produced. Prints one JSON object:
``{"guardrails": version, "rows": [...]}``. Metrics and tracing to the Guardrails Hub are
switched off, so it runs offline.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

__all__ = ["main", "run_job"]


def _offline() -> None:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # guardrails imports litellm
    os.environ.setdefault("OTEL_SDK_DISABLED", "true")  # Hub telemetry would export over HTTPS
    from guardrails.settings import settings
    from guardrails.utils.hub_telemetry_utils import HubTelemetry

    settings.rc.enable_metrics = False  # no Hub telemetry export (no network here)
    settings.rc.use_remote_inferencing = False
    HubTelemetry(enabled=False)  # a singleton: the first construction decides


def _validator(run: dict[str, Any]) -> Any:
    if run["validator"] == "guardrail":
        from guardrail import Guard as Policy
        from guardrail_guardrails_ai import GuardrailMonitor

        return GuardrailMonitor(guard=Policy.from_policy(run["policy"]), on_fail=run["on_fail"])
    if run["validator"] == "ban_list":
        from guardrails_ai.ban_list import BanList

        return BanList(banned_words=run["banned_words"], max_l_dist=run.get("max_l_dist", 0),
                       on_fail=run["on_fail"])
    raise ValueError(f"runs[].validator: unknown validator {run['validator']!r}")


def _one(run: dict[str, Any], replay: dict[str, Any]) -> dict[str, Any]:
    from guardrails import Guard

    words = replay["response"].split(" ")
    produced = 0

    def llm(*, messages: Any = None, **kwargs: Any) -> Iterator[str]:
        nonlocal produced
        for i, word in enumerate(words):
            produced = i + 1
            yield word + (" " if i < len(words) - 1 else "")

    guard = Guard().use(_validator(run))
    shown, passed, raised = "", True, None
    t0 = time.perf_counter()
    try:
        for outcome in guard(llm, messages=[{"role": "user", "content": replay["prompt"]}],
                             stream=True):
            shown += outcome.validated_output or ""
            passed = passed and bool(outcome.validation_passed)
    except Exception as exc:  # noqa: BLE001 - on_fail="exception" ends the stream by raising
        raised = f"{type(exc).__name__}: {exc}"[:300]
    spans = [{"start": s.start, "end": s.end, "reason": s.reason}
             for s in guard.error_spans_in_output()]
    return {"run": run["name"], "label": replay.get("label"), "shown": shown,
            "passed": passed and raised is None, "raised": raised, "error_spans": spans,
            "words_total": len(words), "words_generated": produced,
            "total_s": time.perf_counter() - t0}


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    _offline()
    rows = []
    for run in job["runs"]:
        for i, replay in enumerate(job["replays"]):
            rows.append({"index": i, **_one(run, replay)})
    from importlib.metadata import version

    return {"guardrails": version("guardrails-ai"), "rows": rows}


def main() -> None:
    print(json.dumps(run_job(json.load(sys.stdin))))


if __name__ == "__main__":
    main()
