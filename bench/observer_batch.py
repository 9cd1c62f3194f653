"""Concurrent streams on one Guard: the batched observer against per-session reads.

    python -m bench.observer_batch            # full run (writes bench/results/observer_batch.json)
    python -m bench.observer_batch --quick    # 1 and 4 streams, one thread, 16 tokens each

The default policy (every built-in monitor on SmolLM2-135M, torch, the default products) guards N
concurrent streams (N = 1, 8, 32), one thread per stream, each fed SmolLM2's own answers word by
word as fast as the guard takes them (``TOKENS`` tokens per stream). *Batched*: the Guard's
observer as it ships, one scheduler thread reading all pending streams in one forward, spread over
forward workers (``observer.options.workers: auto``) while they get the cores. *Batched, 1 worker*:
the same, never spread. *Per session*: the same model read by each session in its own thread (the
scheme before). Each thread count (``observer.options.threads``, torch intra-op) runs in its own
process; inside it the schemes take turns, ``REPEATS`` times, so all see the same machine load.
Aggregate tokens/s: every stream's tokens over the wall time from the first feed to the last
finish; medians of the repeats, and the median of the per-repeat ratios (batched over per session).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .common import median, write_result
from .observer_batch_device import GPU_NAME, PADDED_NAME, render_padded
from .observer_batch_device import render as render_gpu

NAME = "observer_batch"
CONCURRENCY = [1, 8, 32]
QUICK_CONCURRENCY = [1, 4]
THREADS = [1, 2]
TOKENS = 32
QUICK_TOKENS = 16
REPEATS = 3
SCHEMES = ("batched", "batched, 1 worker", "per session")


class PerSession:
    """The backend observer without the Guard's scheduler: each session reads for itself."""

    batchable = False

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _streams(tokenizer: Any, n: int, budget: int) -> list[tuple[str, list[str]]]:
    """(prompt, word deltas) of SmolLM2's own answers, each cut to ``budget`` tokens."""
    from importlib import resources

    text = resources.files("guardrail_harmful_content").joinpath(
        "training/data/own_answers.jsonl").read_text("utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    out = []
    for k in range(n):
        row = rows[k % len(rows)]
        words = row["response"].split(" ")
        deltas = [w + " " for w in words]
        while len(tokenizer.tokenize("".join(deltas))) > budget:
            deltas.pop()
        out.append((row["prompt"], deltas))
    return out


def _run(guard: Any, streams: list[tuple[str, list[str]]]) -> dict[str, Any]:
    """Every stream in its own thread, started together; wall from start to the last finish."""
    barrier = threading.Barrier(len(streams) + 1)
    tokens = [0] * len(streams)
    halted = [False] * len(streams)

    def one(k: int) -> None:
        prompt, deltas = streams[k]
        session = guard.session(prompt=prompt)
        barrier.wait()
        for delta in deltas:
            session.feed(delta)
            if session.halted is not None:
                break
        report = session.finish()
        tokens[k], halted[k] = report.tokens, report.halted

    threads = [threading.Thread(target=one, args=(k,)) for k in range(len(streams))]
    for t in threads:
        t.start()
    barrier.wait()
    t0, c0 = time.perf_counter(), time.process_time()
    for t in threads:
        t.join()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"tokens": sum(tokens), "wall": wall, "tokens_per_s": sum(tokens) / wall,
            "cpu_ms_per_token": 1000 * cpu / max(1, sum(tokens)), "halted": sum(halted)}


def worker(config: dict[str, Any]) -> dict[str, Any]:
    """In a child process: both schemes on one model, taking turns, for every concurrency."""
    import torch

    from guardrail import Guard
    from guardrail.guard import default_policy
    from guardrail.observer.batch import BatchedObserver

    base = default_policy()
    assert base.observer is not None
    update = {"options": {**base.observer.options, "threads": config["threads"]}}
    policy = base.model_copy(update={"observer": base.observer.model_copy(update=update)})
    batched = Guard(policy)
    inner = batched.observer.inner
    guards = {"batched": batched,
              "batched, 1 worker": Guard(policy, observer=BatchedObserver(inner, workers=1)),
              "per session": Guard(policy, observer=PerSession(inner))}
    streams_all = _streams(batched.tokenizer, max(config["concurrency"]), config["tokens"])
    for guard in guards.values():  # warm-up: first forwards, the batched step for each depth
        _run(guard, streams_all[:2])
    out: dict[str, Any] = {}
    for n in config["concurrency"]:
        runs: dict[str, list[dict[str, Any]]] = {s: [] for s in SCHEMES}
        stats0 = batched.observer.stats.forwards, batched.observer.stats.reads
        spread0 = batched.observer.stats.spread
        for r in range(config["repeats"]):
            order = SCHEMES if r % 2 == 0 else tuple(reversed(SCHEMES))
            for scheme in order:
                runs[scheme].append(_run(guards[scheme], streams_all[:n]))
                print(f"[observer_batch] {config['threads']}t N={n} run {r} {scheme}: "
                      f"{runs[scheme][-1]['tokens_per_s']:.1f} tok/s", file=sys.stderr,
                      flush=True)
        forwards = batched.observer.stats.forwards - stats0[0]
        reads = batched.observer.stats.reads - stats0[1]
        ratios = [b["tokens_per_s"] / p["tokens_per_s"]
                  for b, p in zip(runs["batched"], runs["per session"], strict=True)]
        out[str(n)] = {
            scheme: {"tokens_per_s": median([x["tokens_per_s"] for x in done]),
                     "tokens_per_s_runs": [round(x["tokens_per_s"], 2) for x in done],
                     "cpu_ms_per_token": median([x["cpu_ms_per_token"] for x in done]),
                     "tokens": done[0]["tokens"], "halted": done[0]["halted"]}
            for scheme, done in runs.items()}
        out[str(n)]["ratio"] = median(ratios)
        out[str(n)]["ratios"] = [round(x, 2) for x in ratios]
        out[str(n)]["streams_per_forward"] = reads / forwards if forwards else 0.0
        out[str(n)]["spread"] = batched.observer.stats.spread - spread0
        out[str(n)]["workers"] = batched.observer.workers
        print(f"[observer_batch] {config['threads']}t N={n}: batched "
              f"{out[str(n)]['batched']['tokens_per_s']:.1f} tok/s, per session "
              f"{out[str(n)]['per session']['tokens_per_s']:.1f} tok/s, ratio "
              f"{out[str(n)]['ratio']:.2f}", file=sys.stderr)
    out["torch_threads"] = torch.get_num_threads()
    return out


def _run_worker(config: dict[str, Any]) -> dict[str, Any]:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root),
                                                                     os.environ.get("PYTHONPATH")]))}
    env.pop("OMP_NUM_THREADS", None)  # the policy's observer.options.threads decides
    out = subprocess.run([sys.executable, "-m", "bench.observer_batch", "--worker",
                          json.dumps(config)], env=env, cwd=root, stdout=subprocess.PIPE,
                         text=True, check=False)  # its progress lines go to our stderr
    if out.returncode != 0:
        raise RuntimeError(f"observer_batch worker {config} failed (exit {out.returncode})")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> Path | None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, nargs="+", default=None)
    parser.add_argument("--threads", type=int, nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return None
    concurrency = args.concurrency or (QUICK_CONCURRENCY if args.quick else CONCURRENCY)
    threads = args.threads or (THREADS[:1] if args.quick else THREADS)
    repeats = args.repeats or (1 if args.quick else REPEATS)
    tokens = QUICK_TOKENS if args.quick else TOKENS
    header = {"quick": args.quick, "tokens_per_stream": tokens, "repeats": repeats,
              "load_average_before": os.getloadavg()[0]}
    rows = []
    path = None
    for t in threads:
        config = {"threads": t, "concurrency": concurrency, "tokens": tokens, "repeats": repeats}
        rows.append({"threads": t, **_run_worker(config)})
        path = write_result(NAME, {**header, "load_average_after": os.getloadavg()[0],
                                   "rows": rows})
    return path


def render(result: dict[str, Any]) -> str:
    out = [
        "## Concurrent streams: one batched observer against per-session reads",
        "",
        "The default policy on SmolLM2-135M (torch, the default products: float16 where the "
        "CPU runs them), N streams on one Guard, one thread per "
        f"stream, each fed {result['tokens_per_stream']} tokens of SmolLM2's own answers word by "
        "word as fast as the guard takes them (bench/observer_batch.py). *Batched*: the Guard's "
        "observer, one scheduler thread reading every pending stream in one forward (the "
        "streams' tokens packed in one sequence, attention per stream), spread over forward "
        "workers while they get the cores (`workers: auto`; *spread*: batches spread, of those "
        "run; *1 worker*: never spread). *Per session*: each session reads the same model in "
        "its own thread (the scheme before). Aggregate tokens/s over the wall time of all N "
        f"streams, median of {result['repeats']} runs, the schemes taking turns in one process; "
        "ratio: batched over per session, median of the per-run ratios. *Streams/forward*: "
        "reads per batched forward (the default scheme). Load "
        f"average {result['load_average_before']:.1f} before the run and "
        f"{result['load_average_after']:.1f} after, on a 2-core machine shared with other "
        "work: absolute figures are noisy, compare within a row. On a machine this contended "
        "the operating system shares the cores among runnable threads, so N per-session "
        "threads get up to N shares where the batched scheme's one model thread gets one: CPU "
        "ms per token is the cost measure.",
        "",
        "| torch threads | streams | batched tokens/s | batched, 1 worker | per-session "
        "tokens/s | ratio | streams/forward | spread | CPU ms/token (batched / 1 worker / "
        "per session) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        for n, cell in row.items():
            if not isinstance(cell, dict):
                continue
            b, p = cell["batched"], cell["per session"]
            one = cell.get("batched, 1 worker")
            out.append(f"| {row['threads']} | {n} | {b['tokens_per_s']:.1f} | "
                       + (f"{one['tokens_per_s']:.1f}" if one else "-")
                       + f" | {p['tokens_per_s']:.1f} | {cell['ratio']:.2f}x | "
                       f"{cell['streams_per_forward']:.1f} | {cell.get('spread', '-')} | "
                       f"{b['cpu_ms_per_token']:.0f} / "
                       + (f"{one['cpu_ms_per_token']:.0f}" if one else "-")
                       + f" / {p['cpu_ms_per_token']:.0f} |")
    for other in result.get("other_runs", []):  # earlier runs kept beside this one
        ratios = ", ".join(f"{k} {v:.2f}x" for k, v in other["ratios"].items())
        out += ["", f"An earlier run ({other['written']}, load average "
                f"{other['load_average_before']:.0f} to {other['load_average_after']:.0f}; "
                f"bench/results/{other['file']}): ratios {ratios}."]
    out.append("")
    return "\n".join(out)


# The batched observer alone on a lent GPU, run by hand (bench/observer_batch_device.py).
EXTRA_RESULTS = {GPU_NAME: render_gpu, PADDED_NAME: render_padded}


if __name__ == "__main__":
    main()
