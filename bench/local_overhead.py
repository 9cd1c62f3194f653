"""Local generation: what guarding costs when the monitors ride the generator's own states.

    python -m bench.local_overhead            # 6 prompts x 64 tokens
    python -m bench.local_overhead --quick    # 2 prompts x 24 tokens, 1 round (< 40 s)
    python -m bench.local_overhead --device cuda   # the generator on a GPU (not in make bench:
                                                   # CI and this machine have none)

SmolLM2-135M-Instruct generates greedily on one CPU thread, the default policy's monitors
(entity hallucination, router, harmful content when its weights are installed) reading its hidden
states and logits. Per token, medians over prompts:

- ``plain``: a generation step with no guard (forward, sampling, detokenization);
- ``states``: the same step handing out the layers and logits the guard needs (no session);
- ``guard``: time inside ``session.feed`` (every monitor, rules, release), and per monitor;
- ``guarded``: the whole guarded step.

The share that matters is ``guard / plain`` (the issue's target: <= 2% per token). The same
prompts give the same tokens in every mode (greedy), so the modes time the same work. Times are
CPU time of this process (one thread), which a busy neighbour on a shared machine disturbs far
less than wall time; wall-clock medians are recorded beside them. On a GPU the step's own time
is spent on the device, so there the shares are of wall time (``local_overhead_cuda.json``).
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from collections.abc import Callable
from typing import Any

from .common import median, write_result

NAME = "local_overhead"
GPU_NAME = "local_overhead_cuda"
PROMPTS = [
    "Tell me about Marie Curie.",
    "What is the capital of Australia?",
    "Explain how a refrigerator works.",
    "Who wrote Pride and Prejudice, and when?",
    "Give me three tips for learning to cook.",
    "Describe the water cycle in simple terms.",
]


def _per_token_ms(stamps: list[float]) -> float:
    """Median ms between consecutive tokens (the prompt's prefill, before the first, excluded)."""
    gaps = [(b - a) * 1000 for a, b in itertools.pairwise(stamps)]
    return median(gaps)


def _plain(gen: Any, prompt: str, tokens: int, needs: Any) -> tuple[float, float]:
    """(CPU ms, wall ms) per generation step."""
    cpu, wall = [], []
    for _ in gen.steps(prompt, needs=needs, max_new_tokens=tokens):
        cpu.append(time.process_time())
        wall.append(time.perf_counter())
    return _per_token_ms(cpu), _per_token_ms(wall)


def _guarded(gen: Any, guard: Any, prompt: str, tokens: int) -> dict[str, Any]:
    from guardrail_transformers import guarded_stream

    session = guard.session(prompt=prompt)
    feed: Callable[..., Any] = session.feed
    inside = [0.0, 0.0]  # CPU seconds, wall seconds
    cpu_stamps: list[float] = []
    wall_stamps: list[float] = []

    def timed_feed(step: Any) -> Any:
        t0, w0 = time.process_time(), time.perf_counter()
        cpu_stamps.append(t0)
        wall_stamps.append(w0)
        try:
            return feed(step)
        finally:
            inside[0] += time.process_time() - t0
            inside[1] += time.perf_counter() - w0

    session.feed = timed_feed
    stream = guarded_stream(guard, prompt, generator=gen, session=session,
                            max_new_tokens=tokens)
    for _ in stream:
        pass
    report = stream.report
    assert report is not None
    n = max(1, stream.generated_tokens)
    return {"tokens": stream.generated_tokens, "guard_ms": inside[0] * 1000 / n,
            "guard_wall_ms": inside[1] * 1000 / n,
            "step_ms": _per_token_ms(cpu_stamps), "step_wall_ms": _per_token_ms(wall_stamps),
            "halted": report.halted,
            # the session times monitors in wall time: kept as a breakdown, not for the share
            "monitor_wall_ms": {m: s * 1000 / n for m, s in report.monitor_seconds.items()},
            "observer_seconds": report.observer_seconds}


def run(quick: bool, device: str | None = None) -> dict[str, Any]:
    import torch
    from guardrail_transformers import LocalGenerator

    from guardrail import Guard

    torch.set_num_threads(1)
    prompts = PROMPTS[:2] if quick else PROMPTS
    tokens = 24 if quick else 64
    rounds = 1  # each mode is interleaved per prompt; 6 x 64 steps give steady medians
    gen = LocalGenerator(device=device)
    on = next(gen.model.parameters()).device
    guard = Guard.default(observer=gen.observer)
    monitors = [f"{spec.id} ({spec.use})" for spec, _ in guard.monitors]
    gen.generate(prompts[0], max_new_tokens=4)  # warm up
    rows: list[dict[str, Any]] = []
    for prompt in prompts:
        plain, states, guarded = [], [], []
        for _ in range(rounds):  # interleaved, so a busy neighbour slows every mode alike
            plain.append(_plain(gen, prompt, tokens, None))
            states.append(_plain(gen, prompt, tokens, guard.needs))
            guarded.append(_guarded(gen, guard, prompt, tokens))
        best = min(guarded, key=lambda g: g["guard_ms"])
        row = {"prompt": prompt, "tokens": best["tokens"], "plain_ms": min(p[0] for p in plain),
               "plain_wall_ms": min(p[1] for p in plain), "states_ms": min(p[0] for p in states),
               "guarded_step_ms": min(g["step_ms"] for g in guarded),
               "guarded_step_wall_ms": min(g["step_wall_ms"] for g in guarded),
               "guard_ms": best["guard_ms"], "guard_wall_ms": best["guard_wall_ms"],
               "monitor_wall_ms": best["monitor_wall_ms"],
               "halted": best["halted"], "observer_seconds": best["observer_seconds"]}
        row["guard_share"] = row["guard_ms"] / row["plain_ms"]
        row["guard_wall_share"] = row["guard_wall_ms"] / row["plain_wall_ms"]
        row["states_share"] = (row["states_ms"] - row["plain_ms"]) / row["plain_ms"]
        rows.append(row)
        print(f"[local_overhead] {prompt[:40]!r}: plain {row['plain_ms']:.2f} ms "
              f"({row['plain_wall_ms']:.2f} wall), guard {row['guard_ms']:.3f} ms "
              f"({row['guard_share']:.2%}; wall {row['guard_wall_share']:.2%})", flush=True)
    ids = list(rows[0]["monitor_wall_ms"])
    return {
        "quick": quick,
        "model": gen.name,
        "device": str(on),
        "device_name": torch.cuda.get_device_name(on) if on.type == "cuda" else None,
        "threads": torch.get_num_threads(),
        "monitors": monitors,
        "needs": {"layers": sorted(guard.needs.layers), "logits": guard.needs.logits,
                  "top_k": guard.needs.top_k},
        "tokens_per_prompt": tokens,
        "median": {
            "plain_ms": median([r["plain_ms"] for r in rows]),
            "plain_wall_ms": median([r["plain_wall_ms"] for r in rows]),
            "guarded_step_wall_ms": median([r["guarded_step_wall_ms"] for r in rows]),
            "states_ms": median([r["states_ms"] for r in rows]),
            "guarded_step_ms": median([r["guarded_step_ms"] for r in rows]),
            "guard_ms": median([r["guard_ms"] for r in rows]),
            "guard_wall_ms": median([r["guard_wall_ms"] for r in rows]),
            "guard_share": median([r["guard_share"] for r in rows]),
            "guard_wall_share": median([r["guard_wall_share"] for r in rows]),
            "states_share": median([r["states_share"] for r in rows]),
            "monitor_wall_ms": {m: median([r["monitor_wall_ms"][m] for r in rows])
                                for m in ids},
        },
        "target_share": 0.02,
        "prompts": rows,
    }


def render(result: dict[str, Any]) -> str:
    m = result["median"]
    lines = [f"## Local generation: guard overhead per token ({result['model']})", "",
             "Monitors read the generator's own hidden states and logits (no observer forward). "
             f"Greedy generation on {result['threads']} CPU thread, "
             f"{len(result['prompts'])} prompts x {result['tokens_per_prompt']} tokens; medians "
             f"over prompts. Monitors: {', '.join(result['monitors'])}.", "",
             "| per token (CPU time) | ms | share of a plain step |", "|---|---:|---:|",
             f"| plain generation step | {m['plain_ms']:.2f} | |",
             f"| step handing out layers {result['needs']['layers']} and logits | "
             f"{m['states_ms']:.2f} | {m['states_share']:+.1%} |",
             f"| guard (`session.feed`: monitors, rules, release) | {m['guard_ms']:.3f} | "
             f"{m['guard_share']:.2%} |"]
    lines += [f"| whole guarded step | {m['guarded_step_ms']:.2f} | "
              f"{m['guarded_step_ms'] / m['plain_ms'] - 1:+.1%} |", "",
              "Per monitor (wall time, as the session records it; plain step "
              f"{m['plain_wall_ms']:.1f} ms wall): "
              + ", ".join(f"`{k}` {v:.3f} ms ({v / m['plain_wall_ms']:.2%})"
                          for k, v in m["monitor_wall_ms"].items()) + ".", "",
              f"Target: guard <= {result['target_share']:.0%} of a step. Process CPU times on "
              "this machine's 2 cores; the step-to-step spread is a few percent, so the "
              "guard's own time is the figure to read, not the difference of whole steps."]
    return "\n".join(lines) + "\n"


def render_gpu(result: dict[str, Any]) -> str:
    """The same run with the generator on a GPU (wall times: the step's work is on the GPU)."""
    m = result["median"]
    return "\n".join([
        f"### The same on a GPU ({result.get('device_name') or result['device']})", "",
        f"Run by hand on a lent machine (`python -m bench.local_overhead --device cuda`), "
        f"{len(result['prompts'])} prompts x {result['tokens_per_prompt']} tokens; the "
        "monitors run on its CPU as everywhere, on rows copied off the GPU once per step.", "",
        "| per token (wall time) | ms | share of a plain step |", "|---|---:|---:|",
        f"| plain generation step | {m['plain_wall_ms']:.2f} | |",
        f"| guard (`session.feed`) | {m['guard_wall_ms']:.3f} | "
        f"{m['guard_wall_share']:.2%} |",
        f"| whole guarded step | {m['guarded_step_wall_ms']:.2f} | "
        f"{m['guarded_step_wall_ms'] / m['plain_wall_ms'] - 1:+.1%} |", "",
        "Per monitor: " + ", ".join(f"`{k}` {v:.3f} ms" for k, v in
                                    m["monitor_wall_ms"].items()) + ".", "",
        f"Against the {result['target_share']:.0%} target: "
        + ("met." if m["guard_wall_share"] <= result["target_share"] else
           "missed. A GPU makes the step shorter than this machine's CPU step but not the "
           "guard, which runs on the CPU; SmolLM2-135M is too small to keep a GPU busy, so "
           "its step is mostly one CPU thread issuing kernels."),
        "", f"_Written {result.get('written', '?')}._",
    ]) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", help="put the generator there (cuda, cuda:1; default: cpu); "
                                         "results go to local_overhead_cuda.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.perf_counter()
    result = run(args.quick, args.device)
    result["seconds"] = time.perf_counter() - t0
    on_gpu = result["device"] != "cpu"
    path = write_result(GPU_NAME if on_gpu else NAME, result)
    print(render_gpu(result) if on_gpu else render(result))
    print(f"[local_overhead] wrote {path} in {result['seconds']:.0f} s")


EXTRA_RESULTS = {GPU_NAME: render_gpu}


if __name__ == "__main__":
    main()
