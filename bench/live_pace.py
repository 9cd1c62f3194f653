"""One live stream: can the default guard keep pace with an API stream fed word by word?

    python -m bench.live_pace            # full run (writes bench/results/live_pace.json)
    python -m bench.live_pace --quick    # torch, one thread, idle, 40 tokens (a smoke test)

The default policy (every built-in monitor on SmolLM2-135M) guards SmolLM2's own answers
(plugins/harmful-content/.../training/data/own_answers.jsonl, the first ``TOKENS`` tokens of
them), one word per delta, for each backend (torch with the default products, float16 where
the CPU runs them; torch with ``matmul: float32``, the baseline; ONNX Runtime), thread count (1, 2;
``observer.options.threads``), load (idle, or with another process keeping one core busy: a
``while True: pass`` subprocess) and read scheme: a read on every delta (``observer.max_delay_ms:
0``), a read when a decision is due (``observer.read_ahead: false``), reads when due with the
deltas that have arrived fed in one ``feed_many`` call (catch-up, as the async drivers do), or
reads sent ahead in the background (``observer.read_ahead``, the default), one ``feed`` per delta
or with the catch-up driver. Each configuration
runs in its own process, its read schemes taking turns stream by stream on one observer.

- *tokens/s*: the stream fed as fast as the guard takes it (feed calls back to back, then finish).
- *added latency*: the stream paced at ``PACE`` tokens/s (word deltas scheduled at the answer's
  token rate); per released token, when the reader got it minus when an instant guard with the
  same hold-back would have released it (the arrival of the delta that put it outside the
  hold-back window, or the end of the stream). A guard that falls behind the pace piles latency.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .common import median, p95, write_result

NAME = "live_pace"
TOKENS = 354
QUICK_TOKENS = 40
PACE = 50.0  # tokens/s of the paced upstream (LLM APIs stream 30-100)
BACKENDS = ["torch", "torch-float32", "onnx"]
# a backend's policy: observer.backend and the observer options it adds; torch-q4_1 (products on
# SmolLM2's GGUF Q4_1 blocks, docs/observer.md) and torch-q4_1_q16 (the same blocks in integer
# products, int16 rows) only asked for (--backends), with --name
BACKEND_SETTINGS: dict[str, tuple[str, dict[str, Any]]] = {
    "torch": ("torch", {}), "torch-float32": ("torch", {"matmul": "float32"}),
    "torch-q4_1": ("torch", {"matmul": "q4_1"}), "torch-float16": ("torch", {"matmul": "float16"}),
    "torch-q4_1_q16": ("torch", {"matmul": "q4_1_q16"}), "onnx": ("onnx", {})}
Q4_1_NAME = "live_pace_q4_1"  # --backends torch torch-q4_1 --name live_pace_q4_1
# --backends torch torch-q4_1_q16 torch-q4_1_q16 torch --name live_pace_q4_1_q16
Q4_1_Q16_NAME = "live_pace_q4_1_q16"
THREADS = [1, 2]
# Read schemes: the observer settings each one sets on the default policy. "catch-up": reads when
# due, and a driver behind its upstream hands the session every delta that has arrived (at most
# hold-back + 1) in one feed_many call, as the async drivers and the proxy do (guardrail.catch_up).
# "read ahead": the default (observer.read_ahead), one feed per delta; "catch-up ahead": the
# default with the catch-up driver (what the async drivers and the proxy run by default).
READS: dict[str, dict[str, Any]] = {
    "per delta": {"max_delay_ms": 0.0, "read_ahead": False},
    "when due": {"read_ahead": False},
    "catch-up": {"read_ahead": False},
    "read ahead": {},
    "catch-up ahead": {},
}
CATCH_UP = {"catch-up", "catch-up ahead"}


def _answers(tokenizer: Any, budget: int) -> list[tuple[str, list[str]]]:
    """(prompt, word deltas) of SmolLM2's own answers, cut to ``budget`` tokens in all."""
    from importlib import resources

    text = resources.files("guardrail_harmful_content").joinpath(
        "training/data/own_answers.jsonl").read_text("utf-8")
    streams: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        row = json.loads(line)
        words = row["response"].split(" ")
        deltas = [w + " " for w in words[:-1]] + words[-1:]
        n = len(tokenizer.tokenize(row["response"]))
        if n > budget:
            m = len(deltas)
            while m > 0 and len(tokenizer.tokenize("".join(deltas[:m]))) > budget:
                m -= 1
            deltas = deltas[:m]
            n = len(tokenizer.tokenize("".join(deltas)))
        if deltas:
            streams.append((row["prompt"], deltas))
        budget -= n
        if budget <= 0:
            break
    return streams


def _stream(guard: Any, prompt: str, deltas: list[str], pace: float | None,
            catch_up: bool = False) -> dict[str, Any]:
    """Feed one answer; per released token, added latency; tokens and wall time. With
    ``catch_up`` the deltas that have arrived (all of them when not paced) go in one
    ``feed_many`` call, at most hold-back + 1 at a time."""
    from guardrail.events import Release
    from guardrail.stream import Aligner

    hold = guard.policy.release.hold_back_tokens
    aligner = Aligner(guard.tokenizer)
    ends: list[int] = []
    counts: list[int] = []  # final tokens after each delta
    for d in deltas:
        ends += [t.end for t in aligner.feed(d)]
        counts.append(len(ends))
    ends += [t.end for t in aligner.flush()]
    per_token = len(ends) / max(1, len(deltas))  # tokens per delta, for the pace
    session = guard.session(prompt=prompt)
    marks: list[tuple[int, float]] = []  # (release end char, time the reader got it)
    arrivals: list[float] = []
    t0 = time.perf_counter()
    c0 = time.process_time()
    limit = hold + 1 if catch_up else 1
    k = 0
    while k < len(deltas):
        if pace:
            due = t0 + k * per_token / pace
            now = time.perf_counter()
            if now < due:
                time.sleep(due - now)
                now = time.perf_counter()
            n = 1  # the deltas due by now, as a driver behind its upstream finds them waiting
            while n < limit and k + n < len(deltas) and t0 + (k + n) * per_token / pace <= now:
                n += 1
            # an instant guard would have each now, however late we are
            arrivals += [t0 + (k + j) * per_token / pace for j in range(n)]
        else:
            n = min(limit, len(deltas) - k)
            arrivals += [time.perf_counter()] * n
        if catch_up:
            events = [e for out in session.feed_many(deltas[k:k + n]) for e in out]
        else:
            events = session.feed(deltas[k])
        k += n
        t = time.perf_counter()
        marks += [(e.end, t) for e in events if isinstance(e, Release)]
        if session.halted is not None:
            break
    end = t0 + len(deltas) * per_token / pace if pace else time.perf_counter()
    report = session.finish()
    t_end = time.perf_counter()
    marks += [(e.end, t_end) for e in report.final_events if isinstance(e, Release)]
    latencies = []
    for i, char_end in enumerate(ends):
        got = next((t for e, t in marks if e >= char_end), None)
        if got is None:
            continue  # never released (halted)
        at = next((k for k, c in enumerate(counts) if c - hold > i), None)
        ideal = arrivals[at] if at is not None and at < len(arrivals) else end
        latencies.append(got - ideal)
    return {"tokens": report.tokens, "wall": t_end - t0, "cpu": time.process_time() - c0,
            "latencies": latencies, "reads": report.observer_reads, "halted": report.halted}


def worker(config: dict[str, Any]) -> dict[str, Any]:
    """In a child process: the answers fed back to back, then paced, through one guard per read
    scheme on one shared observer; the schemes take turns stream by stream, so both see the same
    machine load."""
    from guardrail import Guard
    from guardrail.guard import default_policy

    base = default_policy()
    assert base.observer is not None
    guards: dict[str, Any] = {}
    for scheme, settings in READS.items():
        if scheme not in config.get("reads", READS):
            continue
        backend, options = BACKEND_SETTINGS[config["backend"]]
        update: dict[str, Any] = {"backend": backend,
                                  "options": {**base.observer.options, **options,
                                              "threads": config["threads"]}, **settings}
        policy = base.model_copy(update={"observer": base.observer.model_copy(update=update)})
        first = next(iter(guards.values()), None)
        same = next((g for g in guards.values() if g.policy == policy), None)
        guards[scheme] = same or Guard(policy, observer=first.observer if first else None)
    streams = _answers(next(iter(guards.values())).tokenizer, config["tokens"])
    for guard in guards.values():  # warm-up: first forward, ONNX sessions
        _stream(guard, streams[0][0], streams[0][1][:12], None)
    out: dict[str, Any] = {scheme: {} for scheme in guards}
    for m, (mode, pace) in enumerate((("fast", None), ("paced", PACE))):
        runs: dict[str, list[dict[str, Any]]] = {scheme: [] for scheme in guards}
        for k, (prompt, deltas) in enumerate(streams):
            order = list(guards) if (k + m) % 2 == 0 else list(reversed(guards))
            for scheme in order:
                runs[scheme].append(_stream(guards[scheme], prompt, deltas, pace,
                                            catch_up=scheme in CATCH_UP))
        for scheme, done in runs.items():
            tokens = sum(r["tokens"] for r in done)
            wall = sum(r["wall"] for r in done)
            latencies = [x * 1000 for r in done for x in r["latencies"]]
            out[scheme][mode] = {
                "tokens": tokens, "tokens_per_s": tokens / wall,
                "cpu_ms_per_token": 1000 * sum(r["cpu"] for r in done) / tokens,
                "latency_p50_ms": median(latencies), "latency_p95_ms": p95(latencies),
                "reads": sum(r["reads"] for r in done),
                "halted": sum(bool(r["halted"]) for r in done)}
    import torch

    for scheme in out:
        out[scheme]["torch_threads"] = torch.get_num_threads()
        out[scheme]["matmul"] = getattr(guards[scheme].observer, "matmul", None)
        packed = getattr(getattr(guards[scheme].observer, "inner", None), "packed", None)
        out[scheme]["fused"] = getattr(packed, "fused", None) is not None  # blockstep ran
    return out


def _run_worker(config: dict[str, Any]) -> dict[str, Any]:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root),
                                                                     os.environ.get("PYTHONPATH")]))}
    env.pop("OMP_NUM_THREADS", None)  # the policy's observer.options.threads decides
    hog = None
    if config["busy"]:
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        out = subprocess.run([sys.executable, "-m", "bench.live_pace", "--worker",
                              json.dumps(config)], env=env, cwd=root, capture_output=True,
                             text=True, check=False)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    if out.returncode != 0:
        raise RuntimeError(f"live_pace worker {config} failed:\n{out.stderr[-3000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> Path | None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--backends", nargs="+", default=None, choices=list(BACKEND_SETTINGS))
    parser.add_argument("--name", default=NAME, help="result name (bench/results/NAME.json)")
    parser.add_argument("--tokens", type=int, default=None, help="answer tokens per run")
    parser.add_argument("--threads", nargs="+", type=int, default=None, choices=THREADS)
    parser.add_argument("--loads", nargs="+", default=None, choices=["idle", "busy"])
    parser.add_argument("--reads", nargs="+", default=None, choices=list(READS),
                        help="read schemes (default: all)")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return None
    backends = args.backends or (["torch"] if args.quick else BACKENDS)
    tokens = args.tokens or (QUICK_TOKENS if args.quick else TOKENS)
    header = {"quick": args.quick, "tokens": tokens, "pace": PACE,
              "load_average_before": os.getloadavg()[0]}
    rows: list[dict[str, Any]] = []
    path = None
    for backend in backends:
        for threads in args.threads or (THREADS[:1] if args.quick else THREADS):
            loads = args.loads or (["idle"] if args.quick else ["idle", "busy"])
            for busy in [load == "busy" for load in loads]:
                config = {"backend": backend, "threads": threads, "busy": busy, "tokens": tokens,
                          "reads": args.reads or list(READS)}
                results = _run_worker(config)
                for reads, result in results.items():
                    rows.append({**config, "reads_scheme": reads,
                                 "observer_settings": READS[reads], **result})
                    print(f"[live_pace] {backend} {threads}t busy={busy} {reads}: "
                          f"{result['fast']['tokens_per_s']:.1f} tok/s, p95 "
                          f"{result['paced']['latency_p95_ms']:.0f} ms", file=sys.stderr)
                # written after every configuration: a long run stopped early keeps its rows
                path = write_result(args.name, {**header, "load_average_after": os.getloadavg()[0],
                                           "rows": rows})
    return path


def render(result: dict[str, Any]) -> str:
    rows = result["rows"]

    def find(backend: str, threads: int, busy: bool, reads: str) -> dict[str, Any] | None:
        return next((r for r in rows if (r["backend"], r["threads"], r["busy"],
                                         r["reads_scheme"]) == (backend, threads, busy, reads)),
                    None)

    out = [
        "## One live stream: the default guard fed word by word",
        "",
        f"The default policy on SmolLM2's own answers ({result['tokens']} tokens, one word per "
        "delta; bench/live_pace.py), each configuration in its own process, its read schemes "
        "taking turns stream by stream on one observer. *tokens/s*: fed as "
        "fast as the guard takes it. *Added latency*: paced at "
        f"{result['pace']:g} tokens/s, per released token, when the reader got it minus when an "
        "instant guard with the same hold-back would have (p50 / p95). *Reads*: observer "
        "forwards. *Per delta*: `observer.max_delay_ms: 0` (a read per delta); *when due*: "
        "`observer.read_ahead: false` (reads gathered until a decision is due), one `feed` per "
        "delta; *catch-up*: reads when due, and the deltas that have arrived (all, when fed as "
        "fast as the guard takes them; those due by then, when paced) go in one `feed_many` "
        "call, at most hold-back + 1 at a time, as the async drivers and the proxy do when "
        "behind their upstream; *read ahead*: the default (`observer.read_ahead`: the tokens "
        "that arrived go to the observer in the background while the feed returns, when the "
        "driver waited for them and the observer keeps up), one `feed` per delta; *catch-up "
        "ahead*: the default with the catch-up driver (the async drivers' and the proxy's "
        "default). *Busy*: "
        "another process keeps one core busy. Ratio: tokens/s against per delta, same "
        "configuration. "
        f"Load average {result['load_average_before']:.1f} before the run and "
        f"{result['load_average_after']:.1f} after: the machine was shared, so absolute "
        "figures are noisy; compare rows of one run.",
        "",
    ]
    if result.get("note"):  # what the load was during the run, where it was sampled
        out += [result["note"], ""]
    out += [
        "| backend | threads | load | reads | tokens/s | ratio | added latency ms | reads | "
        "CPU ms/token |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = find(r["backend"], r["threads"], r["busy"], "per delta")
        ratio = (f"{r['fast']['tokens_per_s'] / base['fast']['tokens_per_s']:.1f}x"
                 if base is not None and r["reads_scheme"] != "per delta" else "")
        out.append(
            f"| {r['backend']} | {r['threads']} | {'busy' if r['busy'] else 'idle'} | "
            f"{r['reads_scheme']} | {r['fast']['tokens_per_s']:.1f} | {ratio} | "
            f"{r['paced']['latency_p50_ms']:.0f} / {r['paced']['latency_p95_ms']:.0f} | "
            f"{r['fast']['reads']} | {r['fast']['cpu_ms_per_token']:.1f} |")
    for scheme, what, tests in (
            ("when due", "Reads when due give", "tests/observer/test_deferred_reads.py"),
            ("catch-up", "Catching up (reads when due, arrived deltas in one call) gives",
             "tests/observer/test_catch_up_feed.py"),
            ("read ahead", "Reads ahead give", "tests/observer/test_read_ahead.py")):
        ratios = []
        for r in rows:
            base = find(r["backend"], r["threads"], r["busy"], "per delta")
            if base is not None and r["reads_scheme"] == scheme:
                ratios.append(r["fast"]["tokens_per_s"] / base["fast"]["tokens_per_s"])
        if ratios:
            out += ["", f"{what} {median(ratios):.1f}x the tokens/s of a read per delta "
                    f"(median over the {len(ratios)} configurations; {min(ratios):.1f}x to "
                    f"{max(ratios):.1f}x) with the same releases and verdicts ({tests})."]
    pairs = []
    for r in rows:
        due = find(r["backend"], r["threads"], r["busy"], "when due")
        if r["reads_scheme"] == "read ahead" and due is not None:
            pairs.append((r, due))
    if pairs:
        def cut(key: str) -> list[float]:
            return [b["paced"][key] / a["paced"][key] for a, b in pairs if a["paced"][key]]
        p50, p95s = cut("latency_p50_ms"), cut("latency_p95_ms")
        out += ["", f"Against reads when due in the same configuration, reads ahead cut the added "
                f"latency by {median(p50):.2f}x at p50 and {median(p95s):.2f}x at p95 (medians "
                f"over the {len(pairs)} configurations; p95 {min(p95s):.2f}x to "
                f"{max(p95s):.2f}x; above 1 is better)."]
    products = [(r, base) for r in rows if r["backend"] == "torch"
                and (base := find("torch-float32", r["threads"], r["busy"],
                                  r["reads_scheme"])) is not None
                and r["reads_scheme"] != "per delta"]
    if products:
        picked = sorted({str(r.get("matmul")) for r, _ in products})
        speed = [r["fast"]["tokens_per_s"] / b["fast"]["tokens_per_s"] for r, b in products]
        tail = [b["paced"]["latency_p95_ms"] / r["paced"]["latency_p95_ms"]
                for r, b in products if r["paced"]["latency_p95_ms"]]
        out += ["", f"*torch* is the default observer (its products on {', '.join(picked)} "
                "weights here: `observer.options.matmul: auto`), *torch-float32* the same with "
                "`matmul: float32` (the default until 2026-12-05). Against it, in the same "
                f"configuration: {median(speed):.2f}x the tokens/s ({min(speed):.2f}x to "
                f"{max(speed):.2f}x) and {median(tail):.2f}x less p95 added latency "
                f"({min(tail):.2f}x to {max(tail):.2f}x; medians over the {len(speed)} "
                "configurations with reads when due, catch-up or ahead)."]
    before = result.get("before")
    if before:  # the same configurations on the code before a change, run back to back
        out += ["", before["note"], "",
                "| backend | threads | load | reads | tokens/s | added latency ms | "
                "CPU ms/token | after: CPU ms/token |",
                "|---|---|---|---|---|---|---|---|"]
        for r in before["rows"]:
            now = find(r["backend"], r["threads"], r["busy"], r["reads_scheme"])
            after = f"{now['fast']['cpu_ms_per_token']:.1f}" if now is not None else ""
            out.append(
                f"| {r['backend']} | {r['threads']} | {'busy' if r['busy'] else 'idle'} | "
                f"{r['reads_scheme']} | {r['fast']['tokens_per_s']:.1f} | "
                f"{r['paced']['latency_p50_ms']:.0f} / {r['paced']['latency_p95_ms']:.0f} | "
                f"{r['fast']['cpu_ms_per_token']:.1f} | {after} |")
    out += ["", "Targets (issue 24): >= 100 tokens/s on torch (>= 200 on ONNX), p95 added "
            "latency <= 50 ms, and within 2x of that while another process keeps one core busy.",
            ""]
    return "\n".join(out)


# the same as Q4_1_NAME after q4_1's blocks ran in one C call (guardrail.observer.blockstep)
FUSED_NAME = "live_pace_fused"


def render_fused(result: dict[str, Any]) -> str:
    """``--backends torch torch-q4_1 --name live_pace_fused``: as ``render_q4_1``, with
    ``q4_1``'s blocks in one C call."""
    return _render_against(result, FUSED_NAME, "`q4_1` with its blocks in one C call",
                           " Under `q4_1` the decoder blocks ran in one C call per forward "
                           "(`guardrail.observer.blockstep`; docs/observer.md, \"The blocks of "
                           "a q4_1 read in one C call\").")


def render_q4_1(result: dict[str, Any]) -> str:
    """``--backends torch torch-q4_1 --name live_pace_q4_1``: the default observer against
    ``matmul: q4_1`` in one run."""
    return _render_against(result, Q4_1_NAME, "products on SmolLM2's Q4_1 blocks")


def _render_against(result: dict[str, Any], name: str, title: str, note: str = "") -> str:
    out = [f"### One live stream: {title}", "",
           f"bench/live_pace.py run by hand (`--backends torch torch-q4_1 ... --name {name}`"
           f"; this run: the configurations in the rows' order, {result['tokens']} tokens): the "
           "table above's setting, the default observer (*torch*: "
           "`matmul: auto`, its products on the weights named) against `matmul: q4_1` (the "
           "weights as SmolLM2's GGUF Q4_1 blocks, the head's Q8_0, float32's products), each "
           "configuration in its own process, back to back. Load average "
           f"{result['load_average_before']:.1f} before and {result['load_average_after']:.1f} "
           f"after.{note}", "",
           "| backend | products | threads | load | reads | tokens/s | added latency ms | "
           "reads | CPU ms/token |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        out.append(
            f"| {r['backend']} | {r.get('matmul')} | {r['threads']} | "
            f"{'busy' if r['busy'] else 'idle'} | {r['reads_scheme']} | "
            f"{r['fast']['tokens_per_s']:.1f} | {r['paced']['latency_p50_ms']:.0f} / "
            f"{r['paced']['latency_p95_ms']:.0f} | {r['fast']['reads']} | "
            f"{r['fast']['cpu_ms_per_token']:.1f} |")
    return "\n".join(out) + "\n"


def render_q4_1_q16(result: dict[str, Any]) -> str:
    """``--backends torch torch-q4_1_q16 torch-q4_1_q16 torch --name live_pace_q4_1_q16``."""
    rest = render_q4_1(result).partition("\n\n")[2]
    rest = rest.replace(f"--backends torch torch-q4_1 ... --name {Q4_1_NAME}",
                        f"--backends torch torch-q4_1_q16 torch-q4_1_q16 torch ... --name "
                        f"{Q4_1_Q16_NAME}")
    rest = rest.replace("against `matmul: q4_1` (the weights as SmolLM2's GGUF Q4_1 blocks, the "
                        "head's Q8_0, float32's products)",
                        "against `matmul: q4_1_q16` (the same blocks in integer products, each "
                        "row quantized per block of 32 to int16)")
    return "### One live stream: integer products on SmolLM2's Q4_1 blocks\n\n" + rest


EXTRA_RESULTS = {Q4_1_NAME: render_q4_1, Q4_1_Q16_NAME: render_q4_1_q16}

EXTRA_RESULTS[FUSED_NAME] = render_fused  # q4_1's blocks in one C call

# --backends torch torch-float16 --name live_pace_auto_q4_1: the default (auto: q4_1 since
# session 34) against the default before it, float16
AUTO_Q4_1_NAME = "live_pace_auto_q4_1"


def render_auto_q4_1(result: dict[str, Any]) -> str:
    rest = render_q4_1(result).partition("\n\n")[2]
    rest = rest.replace(f"--backends torch torch-q4_1 ... --name {Q4_1_NAME}",
                        f"--backends torch torch-float16 ... --name {AUTO_Q4_1_NAME}")
    rest = rest.replace("against `matmul: q4_1` (the weights as SmolLM2's GGUF Q4_1 blocks, the "
                        "head's Q8_0, float32's products)",
                        "against `matmul: float16` (the default before; *torch*'s `auto` is "
                        "`q4_1` since session 34: SmolLM2's GGUF Q4_1 blocks, float32's "
                        "products, the decoder blocks in one C call)")
    return "### One live stream: the default on SmolLM2's Q4_1 blocks against float16\n\n" + rest


EXTRA_RESULTS[AUTO_Q4_1_NAME] = render_auto_q4_1


if __name__ == "__main__":
    main()

# --backends torch torch-q4_1 --threads 1 --name live_pace_tail: the default (auto:
# q4_1_tail_q8 since session 36) against q4_1, the default before it
TAIL_NAME = "live_pace_tail"


def render_tail(result: dict[str, Any]) -> str:
    return _render_against(result, TAIL_NAME, "the default's int8 products past the layers read "
                           "against `q4_1`", note=" *torch*'s `auto` is `q4_1_tail_q8` since "
                           "session 36: `q4_1` in the blocks up to the deepest layer a monitor "
                           "reads (21), int8 products after them and in the head.")


EXTRA_RESULTS[TAIL_NAME] = render_tail
