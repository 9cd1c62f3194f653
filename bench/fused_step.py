"""The decoder blocks of a q4_1 read in one C call (``guardrail.observer.blockstep``) against
the torch step on the same Q4_1 products and against the default float16 products, on SmolLM2.

Parts: ``read``: a read of the default policy's needs (``TorchObserver.extend``) of 1, 2, 4,
9 and 16 new tokens over a short conversation, the three taking turns in one process, CPU ms
medians; ``states``: how far the one-call blocks' states and logits are from the torch step's
on the same products, one text read 1, 4 and 9 tokens at a time and five streams read in one
batched forward. Run by hand: ``python -m bench.fused_step`` (one thread).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from typing import Any

from .common import median, results_dir, write_result

NAME = "fused_step"
SIZES = [1, 2, 4, 9, 16]
VARIANTS = ["float16", "q4_1-torch", "q4_1-fused"]
CONTEXT = "Summarise what the Kepler Space Telescope found, in a few sentences."
ANSWER = ("The telescope watched about 150,000 stars in one patch of sky for four years, and "
          "dips in their light revealed planets. ") * 3


def _say(message: str) -> None:
    print(f"[fused_step] {message}", file=sys.stderr, flush=True)


def observers() -> tuple[Any, Any, Any]:
    """SmolLM2 with float16 products, with q4_1 products (the one-call blocks detached), and
    the blocks in one call; the last two share their packed weights."""
    from guardrail.observer.hf import load_smollm2
    from guardrail.observer.model import TorchObserver
    from guardrail.policy import ObserverSpec

    half = load_smollm2(ObserverSpec(options={"threads": 1, "matmul": "float16"}))
    fused: Any = TorchObserver(half.name, half.model, half.hf_tokenizer, half.window,
                               matmul="q4_1")
    if fused.packed.fused is None:
        raise SystemExit("the one-call blocks do not run here (blockstep.unfused)")
    plain = copy.copy(fused)  # the same packed weights, without the one-call blocks
    plain._steps = {}
    plain.packed = copy.copy(fused.packed)
    plain.packed.fused = None
    return half, plain, fused


def part_read(obs: dict[str, Any], needs: Any, rounds: int) -> dict[str, Any]:
    import torch

    first = obs["float16"]
    messages = [{"role": "user", "content": CONTEXT}]
    words = first.tokenizer.tokenize(ANSWER)
    states = {v: o.start(messages, needs) for v, o in obs.items()}
    cached = states["float16"].kv.length()
    out: dict[str, Any] = {}
    with torch.inference_mode():
        for n in SIZES:
            samples: dict[str, list[float]] = {v: [] for v in obs}
            for r in range(rounds + 1):
                for v in (list(obs) if r % 2 == 0 else list(obs)[::-1]):
                    o, state = obs[v], states[v]
                    c0 = time.thread_time()
                    o.extend(state, words[:n], needs)
                    cpu = time.thread_time() - c0
                    o.truncate(state, 0)
                    if r:
                        samples[v].append(1000 * cpu)
            out[str(n)] = {v: round(median(s), 2) for v, s in samples.items()}
            _say(f"read of {n} over {cached}: {out[str(n)]} (load {os.getloadavg()[0]:.2f})")
    return {"cached_tokens": cached, "rounds": rounds, "cpu_ms": out}


def _distance(a: Any, b: Any) -> float:
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1)).max())


def _read(observer: Any, needs: Any, tokens: list[Any], step: int) -> tuple[dict, Any]:
    import torch

    from guardrail.observer.batch import BatchedObserver

    batched = BatchedObserver(observer)
    stream = batched.start([{"role": "user", "content": CONTEXT}], needs)
    parts = [batched.extend(stream, tokens[i:i + step], needs)
             for i in range(0, len(tokens), step)]
    batched.release(stream)
    hidden = {layer: torch.cat([p.hidden[layer] for p in parts]) for layer in needs.layers}
    return hidden, torch.cat([p.logits for p in parts])


def part_states(obs: dict[str, Any]) -> dict[str, Any]:
    """The largest relative distance per token, one-call blocks against the torch step on the
    same products (and float16's against it, for scale), reads of 1, 4 and 9 tokens."""
    from guardrail import Needs

    needs = Needs(layers=frozenset({6, 15, -1}), logits=True)
    tokens = obs["float16"].tokenizer.tokenize(ANSWER)
    want_hidden, want_logits = _read(obs["q4_1-torch"], needs, tokens, 9)
    out: dict[str, Any] = {}
    for variant in ("q4_1-torch", "q4_1-fused", "float16"):
        for step in (1, 4, 9):
            if variant == "q4_1-torch" and step == 9:
                continue
            hidden, logits = _read(obs[variant], needs, tokens, step)
            row = {f"layer {k}": _distance(hidden[k], want_hidden[k]) for k in sorted(hidden)}
            row["logits"] = _distance(logits, want_logits)
            out[f"{variant}, reads of {step}"] = {k: float(f"{v:.3g}") for k, v in row.items()}
            _say(f"{variant} reads of {step}: {out[f'{variant}, reads of {step}']}")
    return {"tokens": len(tokens), "against": "q4_1-torch, reads of 9", "distance": out}


def part_batch(obs: dict[str, Any], needs: Any, rounds: int) -> dict[str, Any]:
    """One packed forward (``batch._step``) of 8 streams' reads of 1, 4 and 9 tokens each
    (8, 32 and 72 rows), each stream over its own conversation, the caches left as they are:
    CPU ms, the three taking turns."""
    import torch

    from guardrail.observer.batch import _step

    first = obs["float16"]
    words = first.tokenizer.tokenize(ANSWER)
    depth, indices, logits = first.signature(needs)
    prompts = [f"{CONTEXT} Question {k}: what did it find in year {2009 + k}?" for k in range(8)]
    states = {v: [o.start([{"role": "user", "content": p}], needs) for p in prompts]
              for v, o in obs.items()}
    out: dict[str, Any] = {}
    with torch.inference_mode():
        for n in (1, 4, 9):
            ids: list[int] = []
            positions: list[int] = []
            spans: list[tuple[int, int]] = []
            for state in states["float16"]:
                past = state.kv.length()
                spans.append((len(ids), len(ids) + n))
                ids += [t.id for t in words[:n]]
                positions += range(past, past + n)
            causal = torch.ones(n, n, dtype=torch.bool).tril()
            groups = int(first.config.num_attention_heads) // int(first.kv_heads)
            calls = {}
            for v, o in obs.items():
                caches = []
                for state in states[v]:
                    mask = torch.ones(1, 1, n, state.kv.length() + n, dtype=torch.bool)
                    mask[0, 0, :, state.kv.length():] = causal
                    caches.append((state.kv.tensors,
                                   ~mask.repeat(1, 1, groups, 1) if n > 1 else None))
                calls[v] = (o, caches)
            samples: dict[str, list[float]] = {v: [] for v in obs}
            for r in range(rounds + 1):
                for v in (list(obs) if r % 2 == 0 else list(obs)[::-1]):
                    o, caches = calls[v]
                    c0 = time.thread_time()
                    _step(o.model, depth, list(indices), list(range(8)) if logits else [],
                          torch.tensor([ids]), torch.tensor([positions]), spans, caches,
                          o.packed)
                    if r:
                        samples[v].append(1000 * (time.thread_time() - c0))
            out[str(8 * n)] = {v: round(median(x), 2) for v, x in samples.items()}
            _say(f"8 streams of {n}: {out[str(8 * n)]} (load {os.getloadavg()[0]:.2f})")
    cached = [state.kv.length() for state in states["float16"]]
    return {"streams": 8, "cached_tokens": [min(cached), max(cached)], "rounds": rounds,
            "cpu_ms": out}


def part_drift(obs: dict[str, Any]) -> dict[str, Any]:
    """``bench.mixed_matmul``'s drift part (harm and entity test records, the demo's replays;
    the default policy) for q4_1 with its blocks in one call against float32's products."""
    from guardrail.observer.model import TorchObserver

    from .mixed_matmul import part_drift as drift

    half = obs["float16"]
    exact = TorchObserver(half.name, half.model, half.hf_tokenizer, half.window,
                          matmul="float32")
    exact.threads = half.threads
    return drift({"float32": exact, "q4_1": obs["q4_1-fused"]})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", nargs="+", default=["read", "states"],
                        choices=["read", "states", "batch", "drift"],
                        help="drift (not run by default): bench.mixed_matmul's scores and "
                        "verdicts against float32, with q4_1's blocks in one call")
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--name", default=NAME)
    args = parser.parse_args(argv)
    import torch

    from guardrail.guard import build_monitors, default_policy
    from guardrail.monitor import Needs

    torch.set_num_threads(1)
    half, plain, fused = observers()
    obs = {"float16": half, "q4_1-torch": plain, "q4_1-fused": fused}
    needs = Needs()
    for _, monitor in build_monitors(default_policy()):
        needs = needs.union(monitor.needs())
    result: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    previous = results_dir() / f"{args.name}.json"
    if previous.exists():  # keep the parts not run now
        kept = json.loads(previous.read_text())
        result = {**{k: kept[k] for k in ("read", "states", "batch", "drift") if k in kept},
                  **result}
    for part in args.parts:
        start = round(os.getloadavg()[0], 2)
        if part == "read":
            result[part] = part_read(obs, needs, args.rounds)
        elif part == "states":
            result[part] = part_states(obs)
        elif part == "batch":
            result[part] = part_batch(obs, needs, max(5, args.rounds // 3))
        else:
            result[part] = part_drift(obs)
        result[part]["load_1m"] = [start, round(os.getloadavg()[0], 2)]  # before, after
        _say(f"wrote {write_result(args.name, result)}")


def _turns_table(part: dict[str, Any], first: str, what: str) -> list[str]:
    """A part whose three observers took turns: CPU ms per size and the fused ratios."""
    load = part.get("load_1m", ["?", "?"])
    lines = ["", f"{what}, CPU ms, medians of {part['rounds']} (load average {load[0]} before, "
             f"{load[1]} after):", "",
             f"| {first} | float16 | q4_1-torch | q4_1-fused | fused / float16 | "
             "fused / q4_1-torch |", "|---|---|---|---|---|---|"]
    for n, row in part["cpu_ms"].items():
        f16, q4, fu = row["float16"], row["q4_1-torch"], row["q4_1-fused"]
        lines.append(f"| {n} | {f16} | {q4} | {fu} | {f16 / fu:.2f}x faster | "
                     f"{q4 / fu:.2f}x faster |")
    return lines


def render(result: dict[str, Any]) -> str:
    lines = ["## The decoder blocks of a q4_1 read in one C call", "",
             "`python -m bench.fused_step` (run by hand; one thread): SmolLM2 with the default "
             "float16 products, with `matmul: q4_1` on the torch step (*q4_1-torch*: the "
             "one-call blocks detached) and with the blocks in one C call (*q4_1-fused*, "
             "what `q4_1` runs; docs/observer.md, \"The blocks of a q4_1 read in one C call\"). "
             "Other jobs shared this 2-core machine: compare within a table."]
    read = result.get("read")
    if read:
        lines += _turns_table(
            read, "new tokens",
            f"A read of the default policy's needs (30 blocks and the logits) of n new tokens "
            f"over {read['cached_tokens']} cached (`TorchObserver.extend`), the three taking "
            f"turns")
    batch = result.get("batch")
    if batch:
        low, high = batch["cached_tokens"]
        lines += _turns_table(
            batch, "rows",
            f"One packed forward of {batch['streams']} streams' reads (`batch._step`, what the "
            "batched observer runs for streams read together), each stream over its own "
            f"conversation ({low if low == high else f'{low}-{high}'} tokens cached)")
    states = result.get("states")
    if states:
        lines += ["", f"States and logits against the torch step on the same products read 9 "
                  f"tokens at a time ({states['tokens']} tokens; largest relative distance per "
                  "token):", ""]
        rows = states["distance"]
        keys = list(next(iter(rows.values())))
        lines += ["| reads | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        lines += [f"| {name} | " + " | ".join(f"{row[k]:.2g}" for k in keys) + " |"
                  for name, row in rows.items()]
    drift = result.get("drift")
    if drift:
        from .mixed_matmul import render_drift

        rest = render_drift(drift).split("\n", 1)[1].replace(
            "bench.mixed_matmul --parts drift", "bench.fused_step --parts drift")
        load = drift.get("load_1m", ["?", "?"])
        lines += ["", "### The blocks of a q4_1 read in one C call: scores and verdicts against "
                  "float32", "", f"*q4_1*: with its blocks in one C call. Load average {load[0]} "
                  f"before, {load[1]} after.", rest.rstrip()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
