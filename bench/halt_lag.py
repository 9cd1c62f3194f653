"""How far the upstream runs past a halt: the default guard behind the sync OpenAI wrapper.

    python -m bench.halt_lag            # full run (writes bench/results/halt_lag.json)
    python -m bench.halt_lag --quick    # one repeat

A recorded harmful replay that the default guard halts (guardrail/data/demo_replays.jsonl, the
knockout guide) is served word by word by the loopback upstream (guardrail.testing.upstream,
``DELAY`` s between chunks) to ``guard.wrap(openai.OpenAI(...))``. Per read scheme (a read per
delta, ``observer.max_delay_ms: 0``; reads when due, the default), one process, one observer
(torch, 1 thread), the schemes taking turns: the chunks the upstream wrote before the wrapper
closed the connection, and how many of them came after the chunk that holds the halting token.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

from .common import median, write_result

NAME = "halt_lag"
DELAY = 0.04  # s between upstream chunks: 25 words/s
REPLAY = "harmful: knockout guide (recorded, pyrit violence eval)"
READS = {"per delta": 0.0, "when due": None}


def _guards() -> dict[str, Any]:
    from guardrail import Guard
    from guardrail.guard import default_policy

    base = default_policy()
    assert base.observer is not None
    guards: dict[str, Any] = {}
    for scheme, delay in READS.items():
        update: dict[str, Any] = {"options": {**base.observer.options, "threads": 1}}
        if delay is not None:
            update["max_delay_ms"] = delay
        policy = base.model_copy(update={"observer": base.observer.model_copy(update=update)})
        first = next(iter(guards.values()), None)
        guards[scheme] = Guard(policy, observer=first.observer if first else None)
    return guards


def _once(guard: Any, replay: dict[str, Any]) -> dict[str, Any]:
    import openai

    from guardrail.testing.upstream import Script, UpstreamServer, split_words

    chunks = split_words(replay["response"])
    with UpstreamServer() as server:
        server.enqueue(Script(chunks=chunks, delay=DELAY))
        client = guard.wrap(openai.OpenAI(base_url=server.base_url, api_key="bench"))
        t0 = time.perf_counter()
        stream = client.chat.completions.create(
            model="scripted", stream=True,
            messages=[{"role": "user", "content": replay["prompt"]}])
        for _ in stream:
            pass
        wall = time.perf_counter() - t0
        record = server.requests[-1]
        record.wait()
    report = stream.reports.get(0)
    halt = report.halt if report is not None else None
    halt_chunk = None
    if halt is not None:
        end = 0
        for i, chunk in enumerate(chunks):
            end += len(chunk)
            if end > halt.at_char:
                halt_chunk = i + 1
                break
    return {"chunks": len(chunks), "written": record.chunks_written, "halt_chunk": halt_chunk,
            "past_halt": record.chunks_written - halt_chunk if halt_chunk else None,
            "wall_s": wall, "reads": report.observer_reads if report is not None else None}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    lines = resources.files("guardrail").joinpath("data/demo_replays.jsonl").read_text("utf-8")
    replay = next(r for r in map(json.loads, filter(str.strip, lines.splitlines()))
                  if r["title"] == REPLAY)
    guards = _guards()
    runs: dict[str, list[dict[str, Any]]] = {scheme: [] for scheme in guards}
    for rep in range(1 if args.quick else 3):
        order = list(guards) if rep % 2 == 0 else list(reversed(guards))
        for scheme in order:
            runs[scheme].append(_once(guards[scheme], replay))
            print(f"[halt_lag] {scheme}: {runs[scheme][-1]}", file=sys.stderr)
    rows = []
    for scheme, done in runs.items():
        past = [r["past_halt"] for r in done if r["past_halt"] is not None]
        rows.append({"reads_scheme": scheme, "runs": done, "halted": len(past),
                     "written_median": median([r["written"] for r in done]),
                     "past_halt_median": median(past), "wall_median_s":
                     median([r["wall_s"] for r in done]), "chunks": done[0]["chunks"],
                     "halt_chunk": done[0]["halt_chunk"]})
    return write_result(NAME, {"quick": args.quick, "delay_s": DELAY, "replay": REPLAY,
                               "rows": rows})


def render(result: dict[str, Any]) -> str:
    out = [
        "## How far the upstream runs past a halt",
        "",
        f"The default guard (torch, 1 thread) behind `guard.wrap(openai.OpenAI(...))`; the "
        f"loopback upstream serves the recorded replay \"{result['replay']}\" one word per chunk, "
        f"{result['delay_s'] * 1000:.0f} ms apart (bench/halt_lag.py). *Written*: chunks the "
        "upstream sent before the wrapper closed the connection; *past the halt*: those after "
        "the chunk holding the halting token (medians of the runs, schemes taking turns on one "
        "observer). The machine was shared while we measured.",
        "",
        "| reads | chunks | halting token in chunk | written | past the halt | wall s | runs |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        out.append(f"| {r['reads_scheme']} | {r['chunks']} | {r['halt_chunk']} | "
                   f"{r['written_median']:.0f} | {r['past_halt_median']:.0f} | "
                   f"{r['wall_median_s']:.1f} | {len(r['runs'])} ({r['halted']} halted) |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
