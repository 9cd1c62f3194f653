"""Shared helpers for benchmarks: timing, medians, machine description, result files."""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"  # the committed results behind docs/benchmarks.md
# `python -m bench.run --quick` points this at a scratch folder, so a smoke run never
# overwrites the committed results, figures or page.
RESULTS_ENV = "GUARDRAIL_BENCH_RESULTS"


def results_dir() -> Path:
    """Where results are written: ``$GUARDRAIL_BENCH_RESULTS``, else bench/results."""
    return Path(os.environ.get(RESULTS_ENV) or RESULTS)


def figures_dir() -> Path:
    """Where plots are written: docs/ for real runs, next to the results for scratch runs."""
    return results_dir() if os.environ.get(RESULTS_ENV) else ROOT / "docs"


def machine() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
    }


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) for one call."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def describe_monitors(policy: dict[str, Any]) -> str:
    """"`harmful-content` on the onnx observer": a policy's monitors, for result pages."""
    names = ", ".join(f"`{m['use']}`" for m in policy.get("monitors", []))
    observer = policy.get("observer")
    return f"{names} on the {observer['backend']} observer" if observer else names


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def p95(xs: list[float]) -> float:
    if not xs:
        return float("nan")
    ordered = sorted(xs)
    return float(ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))])


def write_result(name: str, data: dict[str, Any]) -> Path:
    out = results_dir()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    payload = {"benchmark": name, "machine": machine(),
               "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **data}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def free_port() -> int:
    """A free loopback port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_healthy(port: int, proc: subprocess.Popen[Any], timeout_s: float) -> None:
    """Wait until the ``guardrail serve`` process ``proc`` answers ``/health`` on ``port``;
    raises ``RuntimeError`` if it exits or ``timeout_s`` passes first."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).is_success:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"guardrail serve did not start (exit {proc.poll()})")
        time.sleep(0.1)
