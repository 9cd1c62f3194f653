"""Running a host library (LiteLLM, NeMo Guardrails, Guardrails AI) in its own venv.

Each host pins dependencies the project's venv can't share (an older openai, its own pydantic
stack), so it lives under .cache/peers/<name> (``make integrations`` builds them) with our core
and the matching adapter installed editable. Tests hand a job to the adapter's replay runner in
that venv and read back the JSON it prints; without the venv they skip and say how to build it.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
PEERS = ROOT / ".cache" / "peers"
REPLAYS = ROOT / "plugins" / "harmful-content" / "guardrail_harmful_content" / "replays"

# host venv name -> (PyPI distribution of the host, our adapter's import package)
HOSTS = {
    "litellm": ("litellm[proxy]", "guardrail_litellm"),
    "nemo": ("nemoguardrails", "guardrail_nemo"),
    "guardrails-ai": ("guardrails-ai", "guardrail_guardrails_ai"),
}


def host_python(name: str) -> Path:
    """The host venv's python, or skip the test saying exactly what is missing."""
    dist, package = HOSTS[name]
    python = PEERS / name / "bin" / "python"
    if not python.exists():
        pytest.skip(f"no {name} venv at {python.parent.parent} (it holds {dist} from PyPI, "
                    f"which can't share this venv's pins); create it with `make integrations`")
    probe = subprocess.run([str(python), "-c", f"import {package}"], capture_output=True,
                           text=True, timeout=120)
    if probe.returncode != 0:
        pytest.skip(f"{package} is not installed in {python.parent.parent}; "
                    f"run `make integrations` again ({probe.stderr.strip().splitlines()[-1:]})")
    return python


def run_replays(name: str, module: str, job: dict[str, Any], timeout: float = 300) -> Any:
    """Run ``python -m <module>`` in the host venv with ``job`` on stdin; its last stdout line
    is the JSON result."""
    python = host_python(name)
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "OTEL_SDK_DISABLED": "true",
           "OMP_NUM_THREADS": "1", "GUARDRAIL_DISABLE_PLUGIN_AUTOLOAD": "1"}
    out = subprocess.run([str(python), "-m", module], input=json.dumps(job), capture_output=True,
                         text=True, timeout=timeout, cwd=ROOT, env=env)
    assert out.returncode == 0, f"{module} failed:\n{out.stderr[-3000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


def replay(path: str, index: int) -> dict[str, Any]:
    lines = (REPLAYS / path).read_text(encoding="utf-8").splitlines()
    return json.loads(lines[index])


HALT_MESSAGE = "I can't continue with this answer."
TRIGGER = "chainsaw"  # appears mid-answer in harmful replay 11 ("rob a bank"), in no benign one


def keyword_policy(hold_back: int = 4) -> dict[str, Any]:
    """A text-only policy: halt on ``TRIGGER`` (fast, no model)."""
    return {"version": 1, "release": {"hold_back_tokens": hold_back},
            "monitors": [{"id": "weapons", "use": "keywords", "action": "halt",
                          "message": HALT_MESSAGE, "options": {"words": [TRIGGER]}}]}


def harmful_and_benign() -> list[dict[str, Any]]:
    """One harmful replay that mentions ``TRIGGER`` and one benign replay that does not."""
    harmful, benign = replay("harmful.jsonl", 11), replay("benign.jsonl", 0)
    assert TRIGGER in harmful["response"] and TRIGGER not in benign["response"].lower()
    return [harmful, benign]
