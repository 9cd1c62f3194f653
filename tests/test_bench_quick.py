"""`make bench-quick` works: every benchmark module runs in quick mode, writes its results into a
scratch folder (never the committed bench/results) and the page renders from them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.skipif(os.environ.get("GUARDRAIL_SKIP_BENCH_SMOKE") == "1",
                    reason="GUARDRAIL_SKIP_BENCH_SMOKE=1")
def test_every_benchmark_runs_in_quick_mode(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT))
    try:
        from bench.run import MODULES, _load
        stems = {name: getattr(_load(name), "NAME", name) for name in MODULES}
    finally:
        sys.path.remove(str(ROOT))
    committed = {p: p.stat().st_mtime for p in (ROOT / "bench" / "results").glob("*.json")}
    env = dict(os.environ, GUARDRAIL_BENCH_RESULTS=str(tmp_path), OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-m", "bench.run", "--quick"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "not available" not in out.stderr, out.stderr[-3000:]
    written = {p.stem: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    page = (tmp_path / "benchmarks.md").read_text()
    for name in MODULES:
        stem = stems[name]
        assert stem in written, f"{name} wrote no results"
        assert written[stem].get("quick", True) is True or stem == "router"
    assert page.count("\n## ") >= len(MODULES)
    assert committed == {p: p.stat().st_mtime
                         for p in (ROOT / "bench" / "results").glob("*.json")}
