"""The batched observer alone at many concurrent streams, on a GPU: run by hand on a lent machine.

    python -m bench.observer_batch_device --model-dir DIR --device cuda --random-weights
    python -m bench.observer_batch_device --model-dir DIR --device cpu --random-weights --tiny \\
        --concurrency 1 4 --dtypes float32 --reads 3    # the same code path, small, on a CPU

``DIR`` holds SmolLM2-135M-Instruct's ``config.json`` and tokenizer files (the converted model
directory in the guardrail cache has them). ``--random-weights`` builds the model from that config
with random weights, saves it as safetensors and loads it back through the observer's own loader
(``load_model_dir`` with ``observer.options.device``/``dtype``): the real weights (540 MB) need not
travel to the machine, and a forward's speed does not depend on the weights' values. ``--tiny``
shrinks the widths (same layers, same vocabulary) for a quick check on a CPU.

What runs is the Guard's observer: a ``BatchedObserver`` (one scheduler thread, the streams' tokens
packed in one forward, attention per stream) over a ``TorchObserver``, with the gather time the
default policy gives it. N client threads (N = 1, 8, 32, 128, 256) each open a stream (one short
user message through the chat template), read one warm-up read, then ``READS`` reads of
``TOKENS_PER_READ`` tokens (fewer at 256 streams: as many forwards) as fast as the observer answers
(a closed loop: the most the observer can do, not a paced stream). The read profile is the default
policy's: every layer its monitors read, full logits and top-100 (``Guard.default().needs``;
``DEFAULT_NEEDS`` where the monitor plugins are not installed). Measured: aggregate tokens/s (all
reads' tokens over the wall time from the first read to the last), each batched forward's latency
as the scheduler sees it (packing, the model, the rows copied back to the CPU and split per stream;
median and p95), and the model part alone (synchronised). *Sequential*: the same streams read one
after another by one thread, as a Ray observer replica reads its batch today
(``guardrail_server.ray._shard``). Results: ``bench/results/observer_batch_cuda.json`` (``--out``
elsewhere), rendered after the CPU section of ``observer_batch`` in docs/benchmarks.md.

``--paths padded packed`` reads on both batched forwards in one run, one after the other on the
same model: *padded*, the accelerators' default (guardrail/observer/padded.py), and *packed*, the
CPU's; results with both go to ``bench/results/observer_batch_cuda_padded.json`` (``--out``),
rendered after the section above.

On the lent machine this needs ``guardrail/``, ``bench/`` and ``DIR`` (config and tokenizer
files, about 4 MB), torch and transformers, and guardrail's core dependencies (pydantic and the
wheels it needs, carried as cp312 wheels where the machine has no registry).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from .common import median, p95

GPU_NAME = "observer_batch_cuda"
CONCURRENCY = [1, 8, 32, 128, 256]
SEQUENTIAL = [1, 32]  # a stream read alone costs the same whatever N: two points suffice
DTYPES = ["float32", "bfloat16"]
TOKENS_PER_READ = 4
READS = 24  # timed reads per stream (batched)
SEQUENTIAL_READS = 8  # timed reads per stream (sequential)
# Guard.default().needs when this was written (entity-hallucination, harmful-content, router):
# used where the monitor plugins are not installed (the lent machine).
# (layers, logits, top_k)
DEFAULT_NEEDS: tuple[tuple[int, ...], bool, int] = ((6, 9, 12, 15, 18, -1), True, 100)
# An English paragraph whose token ids are the streams' tokens (the values do not change speed).
TEXT = ("The river rises in the hills north of the town and runs south through farmland for "
        "about forty miles before it reaches the sea. In spring the snowmelt raises it quickly, "
        "and the old stone bridge has been rebuilt twice after floods. Most of the valley grows "
        "wheat and barley; the orchards on the western slopes give apples and pears.")


def default_needs() -> tuple[Any, str]:
    """The default policy's read profile and where it came from."""
    from guardrail.monitor import Needs

    try:
        from guardrail.guard import build_monitors, default_policy
        from guardrail.plugins import get_host

        policy = default_policy()
        needs = Needs()
        for _, monitor in build_monitors(policy, get_host()):
            needs = needs.union(monitor.needs())
        if needs.observer:
            return needs, "Guard.default().needs"
    except Exception as exc:  # noqa: BLE001 - no plugins (or their weights) here: the constant
        print(f"[observer_batch_device] default policy unavailable ({exc}); using DEFAULT_NEEDS",
              file=sys.stderr)
    layers, logits, top_k = DEFAULT_NEEDS
    return Needs(layers=frozenset(layers), logits=logits, top_k=top_k), "DEFAULT_NEEDS"


def random_model_dir(model_dir: Path, dtype: str, tiny: bool, into: Path) -> Path:
    """A model directory like ``model_dir`` with random weights (safetensors) and its tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    if tiny:  # same layers and vocabulary, narrow: a quick check of the code path on a CPU
        config.hidden_size, config.intermediate_size = 64, 128
        config.num_attention_heads, config.num_key_value_heads, config.head_dim = 4, 2, 16
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    target = into / f"random-{dtype}"
    model.save_pretrained(target)
    for name in os.listdir(model_dir):
        if name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(model_dir / name, target / name)
    return target


def load(model_dir: Path, device: str, dtype: str) -> Any:
    """The TorchObserver the policy ``observer: {options: {device, dtype}}`` loads."""
    from guardrail.observer.hf import load_model_dir

    return load_model_dir(model_dir, name="smollm2-135m", window=2048, backend="torch",
                          options={"device": device, "dtype": dtype})


def _sync(device: Any) -> None:
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        torch.cuda.synchronize(device)


class Timings:
    """Each batched forward's wall time (and its model part), recorded by wrapping the
    scheduler's own methods on this instance only."""

    def __init__(self, observer: Any) -> None:
        self.groups: list[tuple[float, int, int]] = []  # (seconds, streams, tokens)
        self.model: list[float] = []
        device = observer.inner.device
        group, forward = observer._forward_group, observer._forward

        def timed_group(rows: list[Any]) -> None:
            t0 = time.perf_counter()
            group(rows)
            self.groups.append((time.perf_counter() - t0, len(rows),
                                sum(len(r.ids) for r in rows)))

        def timed_forward(rows: list[Any]) -> Any:
            t0 = time.perf_counter()
            out = forward(rows)
            _sync(device)  # the rows' copies to the CPU right after wait for it anyway
            self.model.append(time.perf_counter() - t0)
            return out

        observer._forward_group = timed_group
        observer._forward = timed_forward

    def reset(self) -> None:
        self.groups.clear()
        self.model.clear()


def _spans(ids: list[int]) -> list[Any]:
    from guardrail.stream import TokenSpan

    return [TokenSpan(0, 0, i) for i in ids]


def _messages(k: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Question {k}: tell me about the river valley."}]


def run_batched(observer: Any, timings: Timings, needs: Any, ids: list[int], n: int,
                per_read: int, reads: int) -> dict[str, Any]:
    """N streams, one client thread each, ``reads`` closed-loop reads of ``per_read`` tokens."""
    def chunk(k: int, r: int) -> list[Any]:
        at = (k * 7 + r * per_read) % (len(ids) - per_read)
        return _spans(ids[at:at + per_read])

    streams = [observer.start(_messages(k), needs) for k in range(n)]
    for future in [observer.submit(s, chunk(k, 0), needs) for k, s in enumerate(streams)]:
        future.result()  # context reads and a first read: outside the timing
    timings.reset()
    stats0 = observer.stats.forwards, observer.stats.reads
    latencies: list[list[float]] = [[] for _ in range(n)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(n + 1)

    def one(k: int) -> None:
        barrier.wait()
        try:
            for r in range(1, reads + 1):
                t0 = time.perf_counter()
                observer.extend(streams[k], chunk(k, r), needs)
                latencies[k].append(time.perf_counter() - t0)
        except BaseException as exc:  # noqa: BLE001 - reported, not hung
            errors.append(exc)
        finally:
            observer.release(streams[k])  # a finished stream holds no batch back (gather)

    threads = [threading.Thread(target=one, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} stream(s) failed: {errors[0]!r}") from errors[0]
    tokens = n * reads * per_read
    forwards = observer.stats.forwards - stats0[0]
    group_s = [g[0] for g in timings.groups]
    flat = [x for xs in latencies for x in xs]
    return {"streams": n, "reads": reads, "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "forwards": forwards,
            "streams_per_forward": (observer.stats.reads - stats0[1]) / max(1, forwards),
            "forward_ms_median": 1000 * median(group_s), "forward_ms_p95": 1000 * p95(group_s),
            "model_ms_median": 1000 * median(timings.model),
            "model_ms_p95": 1000 * p95(timings.model),
            "read_ms_median": 1000 * median(flat), "read_ms_p95": 1000 * p95(flat)}


def run_sequential(inner: Any, needs: Any, ids: list[int], n: int, per_read: int,
                   reads: int) -> dict[str, Any]:
    """The same streams read one after another by one thread (a Ray observer replica today)."""
    def chunk(k: int, r: int) -> list[Any]:
        at = (k * 7 + r * per_read) % (len(ids) - per_read)
        return _spans(ids[at:at + per_read])

    states = [inner.start(_messages(k), needs) for k in range(n)]
    for k, state in enumerate(states):
        inner.extend(state, chunk(k, 0), needs)
    times: list[float] = []
    t0 = time.perf_counter()
    for r in range(1, reads + 1):
        for k, state in enumerate(states):
            t1 = time.perf_counter()
            inner.extend(state, chunk(k, r), needs)
            times.append(time.perf_counter() - t1)
    wall = time.perf_counter() - t0
    tokens = n * reads * per_read
    return {"streams": n, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "read_ms_median": 1000 * median(times), "read_ms_p95": 1000 * p95(times)}


def profile_forward(observer: Any, needs: Any, ids: list[int], n: int,
                    per_read: int) -> dict[str, Any]:
    """One batched forward of N streams under torch's profiler: GPU kernel time and launches
    against its wall time (how much of a forward the GPU is busy)."""
    from torch.profiler import ProfilerActivity, profile

    streams = [observer.start(_messages(k), needs) for k in range(n)]
    for future in [observer.submit(s, _spans(ids[:per_read]), needs) for s in streams]:
        future.result()
    with observer.hold():  # every read in one batch
        futures = [observer.submit(s, _spans(ids[per_read:2 * per_read]), needs)
                   for s in streams]
        cuda = observer.inner.device.type == "cuda"
        activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
        prof = profile(activities=activities)
        prof.__enter__()
        t0 = time.perf_counter()
    for future in futures:
        future.result()
    wall = time.perf_counter() - t0
    prof.__exit__(None, None, None)
    from torch.autograd import DeviceType  # type: ignore[attr-defined]

    kernels = [e for e in prof.events() if getattr(e, "device_type", None) == DeviceType.CUDA]
    busy = sum(e.time_range.elapsed_us() for e in kernels)
    for s in streams:
        observer.release(s)
    return {"streams": n, "wall_ms": 1000 * wall, "gpu_kernel_ms": busy / 1000,
            "kernels": len(kernels)}


def measure(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    import torch
    import transformers

    from guardrail.observer.batch import BatchedObserver, default_gather_ms
    from guardrail.policy import ObserverSpec, ReleaseSpec

    needs, source = default_needs()
    spec = ObserverSpec()
    gather = default_gather_ms(spec.max_delay_ms, ReleaseSpec().hold_back_tokens)
    device = torch.device(args.device)
    result: dict[str, Any] = {
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "random_weights": args.random_weights, "tiny": args.tiny,
        "needs": {"layers": sorted(needs.layers), "logits": needs.logits, "top_k": needs.top_k,
                  "source": source},
        "paths": args.paths, "tokens_per_read": args.tokens_per_read, "reads": args.reads,
        "sequential_reads": args.sequential_reads, "gather_ms": gather, "dtypes": {}}
    started = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="observer-batch-device-"))
    try:
        for dtype, path in [(d, p) for d in args.dtypes for p in args.paths]:
            t0 = time.perf_counter()
            if path == args.paths[0]:  # one model per dtype, read on each path in turn
                model_dir = (random_model_dir(Path(args.model_dir), dtype, args.tiny, scratch)
                             if args.random_weights else Path(args.model_dir))
                inner = load(model_dir, args.device, dtype)
            inner.padded = path == "padded"  # before any stream opens: its cache kind follows
            observer = BatchedObserver(inner, gather_ms=gather)
            timings = Timings(observer)
            ids = inner.hf_tokenizer(TEXT * 4, add_special_tokens=False)["input_ids"]
            row: dict[str, Any] = {"load_s": time.perf_counter() - t0, "path": path,
                                   "workers": observer.workers, "packed": inner.packed is not None,
                                   "batched_path": observer._batched,
                                   "batched": {}, "sequential": {}, "profile": {}}
            label = dtype if len(args.paths) == 1 else f"{dtype} {path}"
            result["dtypes"][label] = row
            run_batched(observer, timings, needs, ids, 8, args.tokens_per_read, 3)  # warm-up
            for n in args.concurrency:
                if time.monotonic() - started > args.budget_s:
                    print(f"[observer_batch_device] budget spent: {label} N={n} skipped",
                          file=sys.stderr)
                    row["skipped"] = [*row.get("skipped", []), n]
                    continue
                reads = max(8, min(args.reads, 3072 // n))  # fewer at 256: the same forwards
                cell = run_batched(observer, timings, needs, ids, n, args.tokens_per_read, reads)
                row["batched"][str(n)] = cell
                print(f"[observer_batch_device] {label} batched N={n}: "
                      f"{cell['tokens_per_s']:.0f} tok/s, forward {cell['forward_ms_median']:.1f}"
                      f" ms (p95 {cell['forward_ms_p95']:.1f}), model "
                      f"{cell['model_ms_median']:.1f} ms, {cell['streams_per_forward']:.1f} "
                      "streams/forward", file=sys.stderr, flush=True)
                _write(out, result)
            for n in args.sequential:
                if time.monotonic() - started > args.budget_s:
                    continue
                cell = run_sequential(inner, needs, ids, n, args.tokens_per_read,
                                      args.sequential_reads)
                row["sequential"][str(n)] = cell
                print(f"[observer_batch_device] {label} sequential N={n}: "
                      f"{cell['tokens_per_s']:.0f} tok/s, read {cell['read_ms_median']:.1f} ms",
                      file=sys.stderr, flush=True)
                _write(out, result)
            for n in args.profile:
                if time.monotonic() - started < args.budget_s:
                    try:
                        row["profile"][str(n)] = profile_forward(observer, needs, ids, n,
                                                                 args.tokens_per_read)
                    except Exception as exc:  # noqa: BLE001 - a profiler quirk loses one row
                        row["profile"][str(n)] = {"error": repr(exc)}
                    print(f"[observer_batch_device] {label} profile N={n}: "
                          f"{row['profile'][str(n)]}", file=sys.stderr, flush=True)
            if device.type == "cuda":
                row["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            if observer.stats.padded:
                row["padded_forwards"] = observer.stats.padded
            _write(out, result)
            del observer, timings
            if path == args.paths[-1]:
                del inner
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return result


def _write(out: Path, result: dict[str, Any]) -> None:
    """Every finished cell written at once: a run cut short keeps what it measured."""
    from .common import machine

    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": out.stem, "machine": machine(),
               "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **result}
    out.write_text(json.dumps(payload, indent=2) + "\n")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", required=True,
                        help="SmolLM2's model directory (config.json and tokenizer; weights "
                             "unless --random-weights)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--dtypes", nargs="+", default=DTYPES)
    parser.add_argument("--concurrency", type=int, nargs="+", default=CONCURRENCY)
    parser.add_argument("--sequential", type=int, nargs="*", default=SEQUENTIAL)
    parser.add_argument("--profile", type=int, nargs="*", default=[32, 128])
    parser.add_argument("--paths", nargs="+", choices=["padded", "packed"], default=None,
                        help="the batched forward: padded (the accelerators' default: pooled "
                             "caches, one attention call for all streams) or packed (attention "
                             "stream by stream, the CPU's); several: one after the other; "
                             "default: the device's own")
    parser.add_argument("--tokens-per-read", type=int, default=TOKENS_PER_READ)
    parser.add_argument("--reads", type=int, default=READS)
    parser.add_argument("--sequential-reads", type=int, default=SEQUENTIAL_READS)
    parser.add_argument("--budget-s", type=float, default=300.0,
                        help="skip the cells left once this long has passed")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.tiny and not args.random_weights:
        parser.error("--tiny needs --random-weights")
    if args.paths is None:
        args.paths = ["packed" if args.device == "cpu" else "padded"]
    if args.out is None:
        from .common import results_dir

        args.out = results_dir() / f"{GPU_NAME}.json"
    result = measure(args, args.out)
    _write(args.out, result)
    return args.out


PACE = 25.0  # tokens/s of one live stream (docs/scaling.md sizes replicas by it)
PADDED_NAME = "observer_batch_cuda_padded"  # --paths padded packed, both in one run


def render(result: dict[str, Any]) -> str:
    weights = ("random weights in SmolLM2-135M-Instruct's exact architecture (built from its "
               "config.json: the real weights did not travel to the machine; a forward's speed "
               "does not depend on the weights' values)"
               if result.get("random_weights") else "SmolLM2-135M-Instruct's weights")
    needs = result["needs"]
    machine = result.get("machine", {})
    out = [
        f"### The batched observer on a GPU ({result['device']})",
        "",
        "Run by hand on a lent machine (`python -m bench.observer_batch_device --device cuda "
        f"--random-weights`; {machine.get('cpu_count', '?')} CPU cores beside the GPU), with "
        f"{weights}; torch {result['torch']}, transformers {result['transformers']}. The Guard's "
        "batched observer alone (no monitors; `observer.options.device: cuda`): N streams, one "
        f"client thread each, reading {result['tokens_per_read']} tokens at a time as fast as "
        "the observer answers (a closed loop, after a warm-up read; gather "
        f"{result['gather_ms']:.0f} ms as the default policy sets it), with the default "
        f"policy's read profile: layers {', '.join(str(x) for x in needs['layers'])}, "
        f"{'full logits and ' if needs['logits'] else ''}top-{needs['top_k']}. Tokens/s: all "
        "streams' tokens over the wall time; *per stream*: that over N. *Forward*: one batched "
        "forward as the scheduler sees it (packing, the model, each stream's rows copied to "
        "the CPU), median and p95 over the run's forwards; *model*: its model part alone "
        "(synchronised). *Read*: one stream's read from submit to result. *Sequential*: the "
        "same streams read one after another by one thread, as a Ray observer replica reads "
        "its batch today.",
        "",
        "| dtype | streams | reads each | tokens/s | per stream | streams/forward | "
        "forward ms (median / p95) | model ms (median / p95) | read ms (median / p95) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for dtype, row in result["dtypes"].items():
        for n, c in row["batched"].items():
            out.append(f"| {dtype} | {n} | {c.get('reads', result['reads'])} | "
                       f"{c['tokens_per_s']:.0f} | {c['tokens_per_s'] / int(n):.1f} | "
                       f"{c['streams_per_forward']:.1f} | {c['forward_ms_median']:.1f} / "
                       f"{c['forward_ms_p95']:.1f} | {c['model_ms_median']:.1f} / "
                       f"{c['model_ms_p95']:.1f} | {c['read_ms_median']:.1f} / "
                       f"{c['read_ms_p95']:.1f} |")
        for n, c in row["sequential"].items():
            out.append(f"| {dtype}, sequential | {n} | {result['sequential_reads']} | "
                       f"{c['tokens_per_s']:.0f} | {c['tokens_per_s'] / int(n):.1f} | 1.0 | "
                       f"- | - | {c['read_ms_median']:.1f} / {c['read_ms_p95']:.1f} |")
    out += ["", *_pace_lines(result)]
    profiles = [(dtype, n, p) for dtype, row in result["dtypes"].items()
                for n, p in row.get("profile", {}).items() if "error" not in p]
    if profiles:
        share = max(p["gpu_kernel_ms"] / p["wall_ms"] for _, _, p in profiles)
        out += ["", "One batched forward under torch's profiler (which slows the host: "
                "compare its kernel time with the forward times above): " + "; ".join(
            f"{dtype}, {n} streams: {p['gpu_kernel_ms']:.0f} ms of GPU kernels in "
            f"{p['wall_ms']:.0f} ms, {p['kernels']} kernels ({p['kernels'] / int(n):.0f} per "
            "stream)" for dtype, n, p in profiles) + "."]
        if share < 0.5:
            out[-1] += (f" The GPU is busy at most {100 * share:.0f}% of a forward: the forward "
                        "is bound by the host launching small kernels one stream at a time "
                        "(attention over each stream's own cache in every block, each stream's "
                        "new keys and values appended to its cache, each stream's rows copied "
                        "to the CPU), so its cost grows with the streams in it and the "
                        "aggregate stops growing once a forward carries a few dozen; bfloat16 "
                        "saves no time where the arithmetic is not the cost.")
    out += _other_reads(result)
    out += ["", f"_Written {result['written']}._", ""]
    return "\n".join(out)


def render_padded(result: dict[str, Any]) -> str:
    """Both batched paths in one run (``--paths padded packed``): the padded one against the
    packed one it replaced on accelerators."""
    needs = result["needs"]
    out = [
        f"### The padded batched forward on a GPU ({result['device']})",
        "",
        "Run by hand on a lent machine (`python -m bench.observer_batch_device --device cuda "
        "--random-weights --paths padded packed`), set up as in the section above (random weights "
        "in SmolLM2-135M-Instruct's architecture, the default policy's read profile: layers "
        f"{', '.join(str(x) for x in needs['layers'])}, full logits and top-{needs['top_k']}; "
        f"reads of {result['tokens_per_read']} tokens in a closed loop, {result['reads']} reads "
        f"per stream; torch {result['torch']}), both batched paths in the same run: *padded*, "
        "the accelerators' path (every stream's cache in one pooled buffer per block, one "
        "attention call for all the streams of a forward with a mask, one write of all their "
        "new keys and values, the rows copied back in one copy; `guardrail/observer/padded.py`)"
        ", and *packed*, the path of the section above (attention, appends and copies stream by "
        "stream), which the CPU keeps. This run was on another machine start than the one "
        "above, where the packed path measured faster: compare the rows of one table with each "
        "other. *Model* includes the copy back to the CPU on the padded path.",
        "",
        "| dtype, path | streams | tokens/s | per stream | forward ms (median / p95) | "
        "model ms (median) | read ms (median / p95) |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = result["dtypes"]
    for label, row in rows.items():
        for n, c in row["batched"].items():
            out.append(_batched_row(label, n, c))
    gains = []
    for label, row in rows.items():
        if row.get("path") != "padded":
            continue
        other = rows.get(label.replace("padded", "packed"), {}).get("batched", {})
        both = [n for n in row["batched"] if n in other]
        if both:
            gains.append(f"{label.split()[0]}: " + ", ".join(
                f"{row['batched'][n]['tokens_per_s'] / other[n]['tokens_per_s']:.1f}x at {n} "
                "streams" for n in both))
    if gains:
        out += ["", "Padded against packed, tokens/s in the same run: " + "; ".join(gains) + "."]
    profiles = [(label, n, p) for label, row in rows.items()
                for n, p in row.get("profile", {}).items() if "error" not in p]
    if profiles:
        out += ["", "One batched forward under torch's profiler: " + "; ".join(
            f"{label}, {n} streams: {p['gpu_kernel_ms']:.1f} ms of GPU kernels in "
            f"{p['wall_ms']:.0f} ms, {p['kernels']} kernels ({p['kernels'] / int(n):.0f} per "
            "stream)" for label, n, p in profiles) + "."]
    out += ["", *_pace_lines(result)]
    skipped = [f"{label} at {', '.join(map(str, row['skipped']))} streams"
               for label, row in rows.items() if row.get("skipped")]
    if skipped:
        out += ["", f"Not measured (the run's time budget was spent): {'; '.join(skipped)}."]
    out += ["", f"_Written {result['written']}._", ""]
    return "\n".join(out)


def _batched_row(label: str, n: str, c: dict[str, Any]) -> str:
    """One table row of a batched run: tokens/s, per stream, forward, model and read times."""
    return (f"| {label} | {n} | {c['tokens_per_s']:.0f} | {c['tokens_per_s'] / int(n):.1f} | "
            f"{c['forward_ms_median']:.0f} / {c['forward_ms_p95']:.0f} | "
            f"{c['model_ms_median']:.0f} | {c['read_ms_median']:.0f} / {c['read_ms_p95']:.0f} |")


def _other_reads(result: dict[str, Any]) -> list[str]:
    """Runs with other tokens per read (``--tokens-per-read``), merged into the result by hand
    as ``other_reads``: how a forward's cost depends on the tokens in it."""
    other = result.get("other_reads")
    if not other:
        return []
    out = ["", "The same with other read lengths, float32. "
           f"{result.get('other_reads_note', '')}".rstrip(), "",
           "| tokens per read | streams | tokens/s | per stream | forward ms (median / p95) | "
           "model ms (median) | read ms (median / p95) |",
           "|---|---|---|---|---|---|---|"]
    for k, run in other.items():
        for n, c in run["batched"].items():
            out.append(_batched_row(k, n, c))
        for n, c in run["sequential"].items():
            out.append(f"| {k}, sequential | {n} | {c['tokens_per_s']:.0f} | "
                       f"{c['tokens_per_s'] / int(n):.1f} | - | - | "
                       f"{c['read_ms_median']:.0f} / {c['read_ms_p95']:.0f} |")
    lengths = sorted(other, key=int)
    if len(lengths) >= 2:  # the longest reads against the shortest, at the streams both ran
        short, long = other[lengths[0]]["batched"], other[lengths[-1]]["batched"]
        gains = [f"{long[n]['tokens_per_s'] / short[n]['tokens_per_s']:.1f}x the tokens/s for "
                 f"{long[n]['forward_ms_median'] / short[n]['forward_ms_median']:.1f}x the "
                 f"forward time at {n} streams" for n in short if n in long]
        if gains:
            out += ["", f"Reads of {lengths[-1]} tokens against reads of {lengths[0]}: "
                    + "; ".join(gains) + ". Most of a forward's cost is per stream, not per "
                    "token, so a stream whose tokens pile up while the observer is busy is read "
                    "in fewer, longer reads and the total rises, at the cost of a later verdict."]
    return out


def _pace_lines(result: dict[str, Any]) -> list[str]:
    """How many streams one observer like this keeps at ``PACE`` tokens/s, from the figures."""
    lines = []
    for dtype, row in result["dtypes"].items():
        cells = {int(n): c["tokens_per_s"] for n, c in row["batched"].items()}
        if not cells:
            continue
        kept = [n for n, rate in cells.items() if rate / n >= PACE]
        best = max(cells.values())
        seq = [c["tokens_per_s"] for c in row["sequential"].values()]
        lines.append(
            f"{dtype}: every stream kept {PACE:.0f} tokens/s up to {max(kept, default=0)} "
            f"streams of those measured; the aggregate peaks at {best:.0f} tokens/s, about "
            f"{int(best // PACE)} streams at {PACE:.0f} tokens/s"
            + (f" (read one after another: {median(seq):.0f} tokens/s, about "
               f"{int(median(seq) // PACE)} streams)" if seq else "") + ".")
    return [" ".join(lines)] if lines else []


if __name__ == "__main__":
    main()
