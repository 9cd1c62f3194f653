"""A short load run of the proxy (bench/proxy_load.py): concurrent streams through a real
``guardrail serve`` process, every stream's verdicts equal to its solo run, no errors."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _bench() -> ModuleType:
    sys.path.insert(0, str(ROOT))  # bench/ is a folder of the repo, not an installed package
    try:
        return importlib.import_module("bench.proxy_load")
    finally:
        sys.path.remove(str(ROOT))


@pytest.mark.slow
def test_concurrent_streams_keep_their_own_verdicts() -> None:
    bench = _bench()
    run, TEXTS = bench.run, bench.TEXTS
    result = run(streams=10, seconds=1.5, delay=0.02, policies=("halting",), verbose=False)
    assert result["direct"]["errors"] == 0
    halting = result["policies"]["halting"]
    assert halting["solo_ok"] and halting["errors"] == 0, halting["error_kinds"]
    assert halting["completed"] >= 2 * len(TEXTS)  # every script ran more than once
    assert halting["state_crossings"] == 0
    # Two of the scripts halt; each halted stream's upstream request was closed early.
    assert halting["halted_streams"] > 0
    assert halting["upstream_closed_early"] == halting["halted_streams"]
    assert halting["rss_peak_mb"] >= halting["rss_idle_mb"] > 0
