"""Observer benchmark: SmolLM2-135M on torch and ONNX Runtime, text arriving in chunks.

    python -m bench.observer_bench            # full run (writes bench/results/observer_bench.json)
    python -m bench.observer_bench --quick    # torch and ONNX, fewer tokens, no cold start
    python -m bench.observer_bench --backends torch torch-cuda torch-cuda-bf16
                                              # on a GPU machine, by hand (CI and this machine
                                              # have none): writes observer_bench_cuda.json

For each backend (torch float32, torch bfloat16, ONNX Runtime float32) and each chunk size (1, 4,
16 tokens) it streams a response through ``observer.extend`` after a chat context and reports
tokens/s, added latency per chunk (median, p95) and peak resident memory. Each backend runs in
its own process so peak memory and time to first state are its own. Time to first state is
load + start (conversation) + the first chunk, cached (converted model on disk) and cold (the
GGUF conversion, and for ONNX the export, into an empty cache).

Two read profiles: ``mid`` (layer 15 only, what the harm and fact probes read) and ``full``
(layers 15 and -1 plus top-10 logits, what the router reads).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import median, p95, write_result

NAME = "observer_bench"
GPU_NAME = "observer_bench_cuda"
BACKENDS = ["torch", "torch-bf16", "onnx", "onnx-int8"]
GPU_BACKENDS = ["torch-cuda", "torch-cuda-bf16"]  # observer.options.device: cuda
CHUNKS = [1, 4, 16]
PROFILES: dict[str, dict[str, Any]] = {
    "mid": {"layers": [15], "top_k": 0},
    "full": {"layers": [15, -1], "top_k": 10},
}
TEXT = ("Marie Curie was a physicist and chemist who was born in Warsaw in 1867. She moved to "
        "Paris, studied at the Sorbonne, and with Pierre Curie discovered polonium and radium. "
        "She won the Nobel Prize in Physics in 1903 and in Chemistry in 1911. ")
MESSAGES = [{"role": "user", "content": "Tell me about Marie Curie and her discoveries."}]


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(backend: str, tokens_per_run: int, cold: bool,
           states_out: str | None = None) -> dict[str, Any]:
    """Run in a child process: load one backend, stream, measure."""
    import torch

    from guardrail.monitor import Needs
    from guardrail.observer.hf import load_smollm2
    from guardrail.policy import ObserverSpec

    t0 = time.perf_counter()
    options = {"torch-bf16": {"dtype": "bfloat16"},
               "onnx-int8": {"quantize": "int8"},
               "torch-cuda": {"device": "cuda"},
               "torch-cuda-bf16": {"device": "cuda", "dtype": "bfloat16"}}.get(backend, {})
    spec = ObserverSpec(backend="onnx" if backend.startswith("onnx") else "torch",
                        options=options)
    observer = load_smollm2(spec)
    result: dict[str, Any] = {"backend": backend, "threads": torch.get_num_threads()}
    tokens = observer.tokenizer.tokenize(TEXT * 40)
    for name, profile in PROFILES.items():
        needs = Needs(layers=frozenset(profile["layers"]), top_k=int(profile["top_k"]))
        t_start = time.perf_counter()
        state = observer.start(MESSAGES, needs)
        observer.extend(state, tokens[:4], needs)
        if name == "mid":
            result["first_state_s"] = time.perf_counter() - t0
            result["load_s"] = t_start - t0
        if cold:
            continue
        runs = {}
        for chunk in CHUNKS:
            n = tokens_per_run // 4 if chunk == 1 else tokens_per_run
            # The targeted figures (mid profile, chunks of 4 and 16) are the median of 3 passes:
            # single passes on this shared VM swing by up to 1.5x.
            passes = 3 if name == "mid" and chunk > 1 else 1
            latencies, per_pass = [], []
            for _ in range(passes):
                state = observer.start(MESSAGES, needs)
                these = []
                for i in range(0, n, chunk):
                    t1 = time.perf_counter()
                    observer.extend(state, tokens[i:i + chunk], needs)
                    these.append(time.perf_counter() - t1)
                latencies += these
                per_pass.append(n / sum(these))
            runs[str(chunk)] = {
                "tokens": n, "tokens_per_s": median(per_pass), "passes_tokens_per_s": per_pass,
                "median_ms": median(latencies) * 1000, "p95_ms": p95(latencies) * 1000,
            }
        result[name] = runs
    result["peak_rss_mib"] = _peak_mib()
    if states_out:
        # Layer-15 states of one fixed text, so the parent can compare backends with torch fp32.
        needs = Needs(layers=frozenset([15]))
        state = observer.start(MESSAGES, needs)
        batch = observer.extend(state, tokens[:64], needs)
        from safetensors.torch import save_file

        save_file({"layer15": batch.hidden[15].float().contiguous()}, states_out)
    return result


def _drift(reference: Any, other: Any) -> dict[str, float]:
    """Per-token relative L2 error and cosine of ``other`` against the torch fp32 states."""
    import torch

    rel = (reference - other).norm(dim=-1) / reference.norm(dim=-1)
    cos = torch.nn.functional.cosine_similarity(reference, other, dim=-1)
    return {"rel_err_median": float(rel.median()), "rel_err_max": float(rel.max()),
            "cosine_min": float(cos.min())}


def _spawn(backend: str, tokens: int, cache: str | None, cold: bool,
           states_out: str | None = None) -> dict[str, Any]:
    env = dict(os.environ)
    if cache:
        env["GUARDRAIL_CACHE"] = cache
    cmd = [sys.executable, "-m", "bench.observer_bench", "--worker", backend,
           "--tokens", str(tokens)] + (["--cold"] if cold else []) \
        + (["--states-out", states_out] if states_out else [])
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{backend} worker failed:\n{out.stderr[-3000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> Path | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", choices=BACKENDS + GPU_BACKENDS, help=argparse.SUPPRESS)
    parser.add_argument("--backends", nargs="+", choices=BACKENDS + GPU_BACKENDS,
                        help="these backends only (default: the CPU ones); naming a GPU one "
                             f"writes {GPU_NAME}.json")
    parser.add_argument("--tokens", type=int, default=256, help=argparse.SUPPRESS)
    parser.add_argument("--cold", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--states-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.tokens, args.cold, args.states_out)))
        return None
    tokens = 32 if args.quick else 320
    backends = args.backends or (["torch", "onnx"] if args.quick else BACKENDS)
    on_gpu = any(b in GPU_BACKENDS for b in backends)
    if "torch" not in backends:  # the reference the others' drift is measured against
        backends = ["torch", *backends]
    results: dict[str, Any] = {"quick": args.quick, "model": "SmolLM2-135M-Instruct",
                               "profiles": PROFILES, "chunks": CHUNKS, "backends": {}}
    _spawn("torch", 8, None, cold=True)  # make sure the cached conversion exists
    with tempfile.TemporaryDirectory() as states:
        for backend in backends:
            print(f"[observer_bench] {backend} ...", file=sys.stderr)
            results["backends"][backend] = _spawn(backend, tokens, None, cold=False,
                                                  states_out=f"{states}/{backend}.safetensors")
        from safetensors.torch import load_file

        reference = load_file(f"{states}/torch.safetensors")["layer15"]
        for backend in backends:
            other = load_file(f"{states}/{backend}.safetensors")["layer15"]
            results["backends"][backend]["layer15_vs_torch_fp32"] = _drift(reference, other)
    if on_gpu:
        import torch

        results["device_name"] = torch.cuda.get_device_name(0)
    for backend in () if args.quick else [b for b in ("torch", "onnx") if b in backends]:
        # cold starts: full runs only
        with tempfile.TemporaryDirectory() as empty:
            print(f"[observer_bench] {backend} cold start ...", file=sys.stderr)
            cold = _spawn(backend, 8, empty, cold=True)
            results["backends"][backend]["cold_first_state_s"] = cold["first_state_s"]
    path = write_result(GPU_NAME if on_gpu else NAME, results)
    print(render(json.loads(path.read_text())))
    return path


def render(result: dict[str, Any]) -> str:
    lines = [f"## Observer: {result['model']}, torch vs ONNX Runtime", "",
             "Tokens/s and added latency per `extend` call when the response arrives in chunks "
             "of 1, 4 and 16 tokens after a chat context. `mid` reads layer 15 (harm and fact "
             "probes); `full` reads layers 15 and -1 plus top-10 logits (router). Time to first "
             "state = load + reading the conversation + the first chunk. `mid` with chunks of 4 "
             "and 16: median tokens/s of 3 passes (the passes' range in brackets), latencies "
             "pooled; other rows one pass of 320 tokens (80 for chunks of 1).", ""]
    lines += _tables(result)
    lines += ["", "`onnx-int8` is ONNX Runtime with dynamic int8 weights (`options: {quantize: "
              "int8}`): the fastest, but its states drift from the float32 states the shipped "
              "probes were trained on (the last column), so it is opt-in."]
    return "\n".join(lines) + "\n"


def render_gpu(result: dict[str, Any]) -> str:
    """The run on a lent GPU machine: torch on its CPU beside ``observer.options.device: cuda``."""
    lines = [f"### The observer on a GPU ({result.get('device_name', 'CUDA')})", "",
             "Run by hand on a lent machine (`python -m bench.observer_bench --backends torch "
             "torch-cuda torch-cuda-bf16`); `torch` is that machine's CPU "
             "(the drift column compares the GPU's states with it).", ""]
    lines += _tables(result)
    lines += ["", "Float32 on the GPU gives the CPU's states (the drift column), so the shipped "
              "probes apply unchanged. SmolLM2-135M is too small to keep a GPU busy: one token "
              "at a time the GPU is no faster than 16 CPU threads, and the gain grows with the "
              "chunk. `torch-cuda-bf16` was slow on its first passes (the ranges in brackets) "
              "and drifts like bf16 on the CPU.", "", f"_Written {result.get('written', '?')}._"]
    return "\n".join(lines) + "\n"


def _tables(result: dict[str, Any]) -> list[str]:
    lines = ["| backend | profile | chunk | tokens/s | median ms | p95 ms |",
             "|---|---|---:|---:|---:|---:|"]
    for backend, data in result["backends"].items():
        for profile in PROFILES:
            for chunk, run in data.get(profile, {}).items():
                passes = run.get("passes_tokens_per_s", [])
                spread = f" ({min(passes):.0f}-{max(passes):.0f})" if len(passes) > 1 else ""
                lines.append(f"| {backend} | {profile} | {chunk} | {run['tokens_per_s']:.0f}"
                             f"{spread} | {run['median_ms']:.1f} | {run['p95_ms']:.1f} |")
    lines += ["", "| backend | threads | peak RSS MiB | first state, cached s | "
              "first state, cold s | layer-15 rel. error vs torch fp32 (median / max) |",
              "|---|---:|---:|---:|---:|---:|"]
    for backend, data in result["backends"].items():
        cold = data.get("cold_first_state_s")
        drift = data.get("layer15_vs_torch_fp32")
        err = f"{drift['rel_err_median']:.1e} / {drift['rel_err_max']:.1e}" if drift else ""
        lines.append(f"| {backend} | {data['threads']} | {data['peak_rss_mib']:.0f} | "
                     f"{data['first_state_s']:.1f} | "
                     f"{'' if cold is None else f'{cold:.1f}'} | {err} |")
    return lines


EXTRA_RESULTS = {GPU_NAME: render_gpu}


if __name__ == "__main__":
    main()
