"""Monitoring cost against stream length: our incremental session against the peers' schemes,
with the same monitors (the same Guard) doing the scoring.

- ours: one session, fed delta by delta (each token scored once, observer KV cache reused);
- litellm: re-scan the whole accumulated text every 5 deltas, and once at the end
  (LiteLLM's ``streaming_sampling_rate`` = 5);
- nemo: every 200 deltas, score the last 200 + 50 deltas (NeMo's chunk_size / context_size);
- guardrails_ai: score each sentence once when it completes (Guardrails AI's default chunking).

Each scheme's scan of a text is a fresh session fed that text in one step (one observer forward
over it), so the peers get the cheapest per-token price; what differs is how many tokens each one
scores. Deltas are words (about one token each, like API deltas), and ours reads the observer
when a decision is due (about every 9 tokens with the default hold-back of 8): many small
forwards, where the peers run a few large ones.

Two guards: text monitors only (keywords + regex), and hidden-state monitors on the SmolLM2
observer (ONNX Runtime backend) with a shipped probe head. Re-scanning the whole prefix with the
observer is slow (LiteLLM-style at 4k tokens is 800 forwards over up to 4k tokens, hours on two
cores), so for the observer guard a scheme with many scans times an evenly spaced sample of them
(``--max-scans``) and scales by the share sampled; the result says which rows are estimates.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from guardrail import Guard

from .common import median, timed, write_result

SENTENCES = [
    "The Kepler Space Telescope was launched in 2009 to find planets around other stars.",
    "It watched about 150,000 stars in one patch of sky for four years.",
    "Dips in a star's brightness revealed planets passing in front of it.",
    "The mission confirmed more than 2,600 planets before it ended in 2018.",
    "Many of them are small, rocky worlds in their star's habitable zone.",
    "Engineers saved the mission in 2014 by using sunlight pressure to steady it.",
]


def make_deltas(n_tokens: int) -> list[str]:
    words: list[str] = []
    k = 0
    while len(words) < n_tokens:
        words += [w + " " for w in SENTENCES[k % len(SENTENCES)].split()]
        k += 1
    return words[:n_tokens]


def scan(guard: Guard, text: str) -> None:
    session = guard.session(prompt="Tell me about Kepler.", dry_run=True)
    session.feed(text)
    session.finish()


def ours(guard: Guard, deltas: list[str]) -> None:
    session = guard.session(prompt="Tell me about Kepler.")
    for d in deltas:
        session.feed(d)
    session.finish()


def litellm_texts(deltas: list[str], every: int = 5) -> list[str]:
    """The texts LiteLLM-style re-scanning scores: the whole prefix every 5 deltas, and the end."""
    return ["".join(deltas[:end]) for end in range(every, len(deltas) + 1, every)] \
        + ["".join(deltas)]


def nemo_texts(deltas: list[str], chunk: int = 200, context: int = 50) -> list[str]:
    """NeMo-style windows: every 200 deltas, the last 200 + 50 deltas."""
    return ["".join(deltas[max(0, end - chunk - context):min(end, len(deltas))])
            for end in range(chunk, len(deltas) + chunk, chunk)]


def guardrails_ai_texts(deltas: list[str]) -> list[str]:
    """Guardrails-AI-style: each sentence once, when it completes."""
    return [s for s in re.split(r"(?<=[.!?])\s+", "".join(deltas)) if s.strip()]


RESCANS: dict[str, Callable[[list[str]], list[str]]] = {
    "litellm": litellm_texts, "nemo": nemo_texts, "guardrails_ai": guardrails_ai_texts,
}
SCHEMES = ["ours", *RESCANS]


def sampled(texts: list[str], max_scans: int | None) -> tuple[list[str], float]:
    """An evenly spaced sample of at most ``max_scans`` scans and the factor that scales its cost
    to all of them (1.0 when every scan runs)."""
    if max_scans is None or len(texts) <= max_scans:
        return texts, 1.0
    step = len(texts) / max_scans
    picked = [texts[int(i * step + step / 2)] for i in range(max_scans)]
    return picked, len(texts) / max_scans


def measure(guard: Guard, name: str, deltas: list[str],
            max_scans: int | None) -> tuple[float, float, float]:
    """(wall s, CPU s, scale) of one scheme over one stream; scale > 1 marks an estimate."""
    if name == "ours":
        wall, cpu = timed(partial(ours, guard, deltas))
        return wall, cpu, 1.0
    texts, scale = sampled(RESCANS[name](deltas), max_scans)

    def scan_all() -> None:
        for text in texts:
            scan(guard, text)

    wall, cpu = timed(scan_all)
    return wall * scale, cpu * scale, scale


def growth_exponent(lengths: list[int], seconds: list[float]) -> float:
    """Slope of log(cost) against log(length) between the shortest and longest stream."""
    if len(lengths) < 2 or seconds[0] <= 0:
        return float("nan")
    return math.log(seconds[-1] / seconds[0]) / math.log(lengths[-1] / lengths[0])


def run(guard: Guard, label: str, lengths: list[int], repeats: int,
        max_scans: int | None = None, schemes: list[str] = SCHEMES) -> dict[str, Any]:
    out: dict[str, Any] = {"guard": repr(guard), "lengths": lengths, "max_scans": max_scans,
                           "schemes": {}}
    scan(guard, "warm up " * 8)  # load the observer and export once, outside the timings
    # The schemes take turns run by run, so a change in the machine's load hits them alike.
    samples: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
    for n in lengths:
        deltas = make_deltas(n)
        for _ in range(repeats):
            for name in schemes:
                samples.setdefault((name, n), []).append(measure(guard, name, deltas, max_scans))
    for name in schemes:
        rows: list[dict[str, Any]] = []
        for n in lengths:
            got = samples[(name, n)]
            rows.append({"tokens": n, "wall_s": [w for w, _, _ in got],
                         "cpu_s": [c for _, c, _ in got],
                         "estimated_from_share": 1 / got[0][2],
                         "median_wall_s": median([w for w, _, _ in got]),
                         "median_cpu_s": median([c for _, c, _ in got])})
        cpu = [r["median_cpu_s"] for r in rows]
        out["schemes"][name] = {"rows": rows, "growth_exponent": growth_exponent(lengths, cpu)}
    for n_i in range(len(lengths)):
        base = out["schemes"]["ours"]["rows"][n_i]["median_cpu_s"]
        for name in schemes:
            row = out["schemes"][name]["rows"][n_i]
            row["cpu_ratio_to_ours"] = row["median_cpu_s"] / base if base else None
    print(f"[stream_cost/{label}] " + ", ".join(
        f"{name}: exp {v['growth_exponent']:.2f}" for name, v in out["schemes"].items()))
    return out


def text_guard() -> Guard:
    return Guard.from_policy({"monitors": [
        {"id": "kw", "use": "keywords", "options": {"words": ["bomb", "nerve agent"]}},
        {"id": "years", "use": "regex", "options": {"patterns": [r"\b1[0-9]{3}\b"]}},
    ]})


def observer_guard(window: int | None = None,
                   settings: dict[str, Any] | None = None) -> Guard | None:
    """The SmolLM2 observer (ONNX) with the harmful-content head, else the entity probe; None
    when neither plugin is installed with weights. ``window``: observer.window (default: the
    policy's); ``settings``: other observer fields over these (e.g. the torch backend and its
    ``options.matmul``)."""
    from guardrail.plugins import get_host

    installed = get_host().monitors()
    for use in ("harmful-content", "entity-hallucination"):
        if use not in installed:
            continue
        try:
            observer: dict[str, Any] = {"model": "smollm2-135m", "backend": "onnx",
                                         **(settings or {})}
            if window is not None:
                observer["window"] = window
            return Guard.from_policy({
                "observer": observer,
                "monitors": [{"id": use, "use": use}]})
        except Exception as exc:  # noqa: BLE001 - e.g. weights not trained: try the next one
            print(f"[stream_cost] {use}: {exc}")
    return None


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--max-scans", type=int, default=6,
                        help="observer guard: scans timed per peer stream (the rest estimated)")
    parser.add_argument("--observer-only", action="store_true",
                        help="only the hidden-state guard (results go to stream_cost_observer)")
    parser.add_argument("--schemes", nargs="+", choices=SCHEMES, default=SCHEMES,
                        help="schemes to time ('ours' always runs: ratios are against it)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="--observer-only: runs per scheme and length (medians reported)")
    parser.add_argument("--window", type=int, default=None,
                        help="--observer-only: another observer.window than the default "
                             "(results go to stream_cost_observer_window)")
    parser.add_argument("--observer", type=json.loads, default=None, metavar="JSON",
                        help="--observer-only: observer fields over the ONNX default, e.g. "
                             "'{\"backend\": \"torch\", \"options\": {\"matmul\": \"q4_1\"}}' "
                             "(results go to stream_cost_observer_<--label>)")
    parser.add_argument("--label", default=None,
                        help="with --observer: the results' name suffix (default: the backend)")
    args = parser.parse_args(argv)
    if args.observer is not None and not isinstance(args.observer, dict):
        parser.error("--observer: expected a JSON object of observer fields")
    schemes = ["ours", *[s for s in args.schemes if s != "ours"]]
    if args.observer_only:
        guard = observer_guard(args.window, args.observer)
        if guard is None:
            raise SystemExit("no hidden-state monitor installed")
        load_start = round(os.getloadavg()[0], 2)
        block = run(guard, "observer", [250, 1000, 4000], args.repeats,
                    max_scans=args.max_scans, schemes=schemes)
        block["monitor"] = guard.policy.monitors[0].use
        block["repeats"] = args.repeats
        block["observer_window"] = guard.policy.observer.window if guard.policy.observer else None
        block["observer"] = {"backend": "onnx", **(args.observer or {})}
        picked = getattr(guard.observer, "matmul", None)  # what auto chose on this machine
        if picked is not None:
            block["observer"]["matmul"] = picked
        name = "stream_cost_observer" if args.window is None else "stream_cost_observer_window"
        if args.observer is not None:
            name = f"stream_cost_observer_{args.label or block['observer']['backend']}"
        return write_result(name, {"observer_monitors": block,
                                                     "load_1m_start": load_start,
                                                     "load_1m": round(os.getloadavg()[0], 2)})
    lengths = [250, 1000] if args.quick else [250, 1000, 4000]
    repeats = 1 if args.quick else 3
    results: dict[str, Any] = {
        "quick": args.quick, "text_monitors": run(text_guard(), "text", lengths, repeats)}
    guard = observer_guard()
    if guard is not None:
        observed = [120] if args.quick else [250, 1000, 4000]
        results["observer_monitors"] = run(guard, "observer", observed, 1,
                                           max_scans=3 if args.quick else args.max_scans)
        results["observer_monitors"]["monitor"] = guard.policy.monitors[0].use
    return write_result("stream_cost", results)


def render(result: dict[str, Any]) -> str:
    """The docs/benchmarks.md section for this benchmark."""
    lines = ["## Monitoring cost against stream length", "",
             "CPU seconds to monitor one stream (median of the runs), and the ratio to ours. "
             "Same Guard and monitors for every scheme; only what gets re-scored differs "
             "(bench/stream_cost.py).", ""]
    for key, title in (("text_monitors", "Text monitors (keywords + regex, no observer)"),
                       ("observer_monitors", "A hidden-state monitor on the SmolLM2 observer")):
        block = result.get(key)
        if not block:
            continue
        lengths = block["lengths"]
        note = []
        if key == "observer_monitors":
            note = [f"Monitor `{block.get('monitor')}` on the ONNX observer; ours is fed "
                    "word by word and reads when a decision is due (about 9 tokens per forward "
                    "with the default hold-back), the peers one forward per scan. Cells "
                    "marked * are estimates: an evenly spaced sample of at most "
                    f"{block.get('max_scans')} of that scheme's scans was timed and scaled.", ""]
        lines += [f"### {title}", "", *note,
                  "| scheme | " + " | ".join(f"{n} tokens" for n in lengths)
                  + " | growth exponent |",
                  "|---|" + "---|" * (len(lengths) + 1)]
        for name, scheme in block["schemes"].items():
            cells = [f"{r['median_cpu_s']:.3f} s ({r['cpu_ratio_to_ours']:.1f}x)"
                     + ("*" if r.get("estimated_from_share", 1.0) < 1.0 else "")
                     for r in scheme["rows"]]
            lines.append(f"| {name} | " + " | ".join(cells)
                         + f" | {scheme['growth_exponent']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def render_observer_rerun(result: dict[str, Any]) -> str:
    """``--observer-only`` reruns (bench/results/stream_cost_observer.json): the hidden-state
    rows alone, on the session as it is now, with their own ratios."""
    block = result["observer_monitors"]
    window = block.get("observer_window")
    other = result.get("benchmark") == "stream_cost_observer_window"
    settings = block.get("observer") or {"backend": "onnx"}
    where = ("the ONNX observer" if settings == {"backend": "onnx"}
             else f"the observer `{json.dumps(settings, sort_keys=True)}`")
    title = (f"### The same with `observer.window: {window}`, {result['written'][:10]} "
             f"(`--observer-only --window {window}`)" if other else
             f"### A hidden-state monitor, rerun {result['written'][:10]} (`--observer-only`)"
             if settings == {"backend": "onnx"} else
             f"### A hidden-state monitor on {where}, {result['written'][:10]}")
    lines = [title, "",
             f"Monitor `{block.get('monitor')}` on {where}, ours fed word by word with "
             "the session reading when a decision is due; ratios against ours in this run. "
             f"Process CPU seconds, median of {block.get('repeats', 1)} run(s) per cell, the "
             "schemes taking turns run by run. 1-minute load "
             + (f"{result['load_1m_start']} at the start and " if "load_1m_start" in result
                else "")
             + f"{result.get('load_1m', '?')} at the end (the machine was shared). "
             "Cells marked * are estimates from a sample of scans.", "",
             "| scheme | " + " | ".join(f"{n} tokens" for n in block["lengths"])
             + " | growth exponent |",
             "|---|" + "---|" * (len(block["lengths"]) + 1)]
    for name, scheme in block["schemes"].items():
        cells = [f"{r['median_cpu_s']:.2f} s ({r['cpu_ratio_to_ours']:.2f}x)"
                 + ("*" if r.get("estimated_from_share", 1.0) < 1.0 else "")
                 for r in scheme["rows"]]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {scheme['growth_exponent']:.2f} |")
    return "\n".join(lines) + "\n"


def _render_window_scores(result: dict[str, Any]) -> str:
    from .observer_window import render as window_render

    return window_render(result)


EXTRA_RESULTS = {"stream_cost_observer": render_observer_rerun,
                 "stream_cost_observer_window": render_observer_rerun,
                 "stream_cost_observer_q4_1": render_observer_rerun,
                 "stream_cost_observer_auto": render_observer_rerun,  # session 36: q4_1_tail_q8
                 "observer_window_scores": _render_window_scores}


if __name__ == "__main__":
    main()
