"""Replay recorded answers through a real LiteLLM proxy and report what its client saw.

    python -m guardrail_litellm.replay < job.json

The job (JSON on stdin): ``{"replays": [{"prompt", "response", "label"?}], "runs": [{"name",
"guardrail": <one entry of config.yaml's guardrails: list>}]}``; a ``policy`` key inside
``litellm_params`` may be a policy mapping (written to a temporary YAML file). The proxy runs
in-process (its FastAPI app behind Starlette's test client, config loaded at startup as
``litellm --config`` does); its model is guardrail's loopback OpenAI-compatible server
(``guardrail.testing.upstream``), which streams each replay word by word (``delay`` seconds
apart, default 0.005) and records how many words it sent before the proxy hung up. Prints one
JSON object: ``{"litellm": version, "rows": [...]}``.
Needs LiteLLM with its proxy extra; offline-safe (the cost map is read from the package).
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from guardrail.testing.upstream import Script, UpstreamServer

__all__ = ["main", "run_job"]


def _config(runs: list[dict[str, Any]], base_url: str, tmp: Path, master_key: str) -> Path:
    guardrails: list[dict[str, Any]] = []
    for run in runs:
        entry = json.loads(json.dumps(run["guardrail"]))
        params = entry.setdefault("litellm_params", {})
        if isinstance(params.get("policy"), dict):
            path = tmp / f"policy-{len(guardrails)}.yaml"
            path.write_text(yaml.safe_dump(params["policy"]), encoding="utf-8")
            params["policy"] = str(path)
        params["default_on"] = False  # each request names the one guardrail it runs
        guardrails.append(entry)
    config = {
        # The loopback upstream replays the recorded answers as an OpenAI-compatible server.
        "model_list": [{"model_name": "replay", "litellm_params": {
            "model": "openai/replay", "api_key": "sk-replay", "api_base": base_url,
            "max_retries": 0}}],
        "guardrails": guardrails,
        "general_settings": {"master_key": master_key},
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _read_sse(lines: Any, seen: dict[str, Any]) -> None:
    """Fill ``seen`` with the text shown to the client, how the stream ended, and the error
    frame if any, as the lines arrive (so a stream that breaks off keeps what it showed)."""
    t0 = time.perf_counter()
    for line in lines:
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):].strip()
        if data == "[DONE]":
            seen["done"] = True
            break
        payload = json.loads(data)
        if "error" in payload:
            seen["error"] = payload["error"]
            break
        for choice in payload.get("choices") or ():
            text = (choice.get("delta") or {}).get("content") or ""
            if text and seen["ttft_s"] is None:
                seen["ttft_s"] = time.perf_counter() - t0
            seen["shown"] += text
            seen["finish_reason"] = choice.get("finish_reason") or seen["finish_reason"]
        seen["chunks"] += 1


def _stream(client: Any, body: dict[str, Any]) -> dict[str, Any]:
    seen: dict[str, Any] = {"shown": "", "finish_reason": None, "error": None, "chunks": 0,
                            "ttft_s": None, "done": False, "broken": None, "status": None}
    try:
        with client.stream("POST", "/v1/chat/completions", json=body) as resp:
            seen["status"] = resp.status_code
            if resp.status_code != 200:
                resp.read()
                seen["error"] = resp.json().get("error", resp.text)
            else:
                _read_sse(resp.iter_lines(), seen)
    except Exception as exc:  # noqa: BLE001 - the proxy aborting the body is what we record
        seen["broken"] = f"{type(exc).__name__}: {exc}"[:300]
    return seen


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Run every replay through every configured guardrail, streamed and not streamed."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    delay = float(job.get("delay", 0.005))
    with tempfile.TemporaryDirectory() as tmp, UpstreamServer() as upstream:
        master_key = "sk-" + secrets.token_hex(24)  # the proxy refuses to start without one
        config = _config(job["runs"], upstream.base_url, Path(tmp), master_key)
        os.environ["CONFIG_FILE_PATH"] = str(config)
        from fastapi.testclient import TestClient
        from litellm.proxy.proxy_server import app

        rows = []
        with TestClient(app, headers={"Authorization": f"Bearer {master_key}"}) as client:
            for run in job["runs"]:
                name = run["guardrail"]["guardrail_name"]
                for i, replay in enumerate(job["replays"]):
                    body = {"model": "replay", "stream": True, "guardrails": [name],
                            "messages": [{"role": "user", "content": replay["prompt"]}]}
                    upstream.enqueue(Script(text=replay["response"], delay=delay))
                    t0 = time.perf_counter()
                    seen = _stream(client, body)
                    record = upstream.completions()[-1]
                    record.wait(timeout=30)
                    row = {"run": run["name"], "index": i, "label": replay.get("label"),
                           "stream": True, "total_s": time.perf_counter() - t0,
                           # SSE events the upstream planned / wrote (words, plus the role,
                           # finish and [DONE] events)
                           "words_total": record.chunks_planned,
                           "words_generated": record.chunks_written,
                           "upstream_closed_early": record.disconnected, **seen}
                    rows.append(row)
                    if job.get("non_streaming", True):
                        upstream.enqueue(Script(text=replay["response"]))
                        resp2 = client.post("/v1/chat/completions", json={**body, "stream": False})
                        data = resp2.json()
                        choice = (data.get("choices") or [{}])[0]
                        rows.append({"run": run["name"], "index": i, "label": replay.get("label"),
                                     "stream": False, "status": resp2.status_code,
                                     "shown": (choice.get("message") or {}).get("content") or "",
                                     "finish_reason": choice.get("finish_reason"),
                                     "error": data.get("error")})
    from importlib.metadata import version

    return {"litellm": version("litellm"), "rows": rows}


def main() -> None:
    job = json.load(sys.stdin)
    result = run_job(job)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
