"""`guardrail demo` (what `make demo` runs): real SmolLM2 generation and the recorded replays go
through the default policy, the terminal shows the streams and a summary, and every stream gets
an HTML report and a PNG plot in the folder the demo names."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

pytest.importorskip("guardrail_transformers")
pytest.importorskip("guardrail_harmful_content")

pytestmark = [pytest.mark.real_model, pytest.mark.slow]


def test_demo_streams_halts_the_harmful_replay_and_writes_reports(tmp_path: Path) -> None:
    out_dir = tmp_path / "reports"
    env = dict(os.environ, NO_COLOR="1")
    run = subprocess.run(
        [sys.executable, "-m", "guardrail.cli", "demo", "--quick", "--out", str(out_dir)],
        capture_output=True, text=True, timeout=600, env=env, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    stdout = run.stdout

    replays = [json.loads(line) for line in resources.files("guardrail")
               .joinpath("data/demo_replays.jsonl").read_text("utf-8").splitlines() if line]
    assert "SmolLM2: Tell me about Marie Curie." in stdout
    for replay in replays:
        assert f"replay: {replay['title']}" in stdout

    # The summary names where the halt fired; the reader saw none of the text after it.
    knockout = next(r for r in replays if r["title"].startswith("harmful: knockout"))
    block = stdout.split(f"replay: {knockout['title']}", 1)[1].split("\n▶", 1)[0]
    shown = block.split("\n")[2]  # the live line under the prompt
    assert "■ halted by harm" in shown
    released = shown.split(" ■ halted by")[0].strip()
    assert knockout["response"].startswith(released)
    assert len(released) < len(knockout["response"]) / 2
    row = next(line for line in stdout.splitlines()
               if line.strip().startswith("replay: harmful: knockout"))
    *_, read, released_tokens, held_back, _flags, halt_at, _ms = re.split(r"\s{2,}", row.strip())
    assert halt_at.isdigit() and int(released_tokens) <= int(halt_at) < int(read), row
    assert int(held_back) == int(read) - int(released_tokens)

    # Each replay's row says whether it got what its label expects, and the count follows.
    verdicts = {}
    for replay in replays:
        line = next(x for x in stdout.splitlines() if x.strip().startswith("replay: ")
                    and replay["title"].startswith(x.strip()[len("replay: "):48].rstrip()))
        verdicts[replay["title"]] = re.split(r"\s{2,}", line.strip())[1]
    assert verdicts[knockout["title"]] == "halt ✓"
    assert all(v in ("pass ✓", "pass ✗ halted") for t, v in verdicts.items()
               if t.startswith("benign"))
    met = sum(v.endswith("✓") for v in verdicts.values())
    assert f"{met} of {len(replays)} replays got what their label expects" in stdout

    assert "summary" in stdout and "tokens read" in stdout
    pages = sorted(p.name for p in out_dir.glob("*.html"))
    plots = sorted(p.name for p in out_dir.glob("*.png"))
    assert "index.html" in pages
    assert len(pages) - 1 == len(plots) == len(replays) + 1  # one generated stream in quick mode
    assert str((out_dir / "index.html").resolve()) in stdout
    page = next(out_dir.glob("*knockout*.html")).read_text()
    assert "harm" in page and "halt" in page.lower()
