"""Monitoring cost against stream length: our incremental session against the peers' schemes,
with the same monitors (the same Guard) doing the scoring.

- ours: one session, fed delta by delta (each token scored once, observer KV cache reused);
- litellm: re-scan the whole accumulated text every 5 deltas, and once at the end
  (LiteLLM's ``streaming_sampling_rate`` = 5);
- nemo: every 200 deltas, score the last 200 + 50 deltas (NeMo's chunk_size / context_size);
- guardrails_ai: score each sentence once when it completes (Guardrails AI's default chunking).

Each scheme's scan of a text is a fresh session fed that text in one step, so all four pay the
same per-token price; what differs is how many tokens each one scores. Deltas are words (about one
token each, like API deltas).
"""

from __future__ import annotations

import argparse
import math
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


def litellm(guard: Guard, deltas: list[str], every: int = 5) -> None:
    for end in range(every, len(deltas) + 1, every):
        scan(guard, "".join(deltas[:end]))
    scan(guard, "".join(deltas))


def nemo(guard: Guard, deltas: list[str], chunk: int = 200, context: int = 50) -> None:
    for end in range(chunk, len(deltas) + chunk, chunk):
        scan(guard, "".join(deltas[max(0, end - chunk - context):min(end, len(deltas))]))


def guardrails_ai(guard: Guard, deltas: list[str]) -> None:
    text = "".join(deltas)
    for sentence in re.split(r"(?<=[.!?])\s+", text):
        if sentence.strip():
            scan(guard, sentence)


SCHEMES: dict[str, Callable[[Guard, list[str]], None]] = {
    "ours": ours, "litellm": litellm, "nemo": nemo, "guardrails_ai": guardrails_ai,
}


def growth_exponent(lengths: list[int], seconds: list[float]) -> float:
    """Slope of log(cost) against log(length) between the shortest and longest stream."""
    return math.log(seconds[-1] / seconds[0]) / math.log(lengths[-1] / lengths[0])


def run(guard: Guard, label: str, lengths: list[int], repeats: int) -> dict[str, Any]:
    out: dict[str, Any] = {"guard": repr(guard), "lengths": lengths, "schemes": {}}
    for name, scheme in SCHEMES.items():
        rows: list[dict[str, Any]] = []
        for n in lengths:
            deltas = make_deltas(n)
            samples = [timed(partial(scheme, guard, deltas)) for _ in range(repeats)]
            rows.append({"tokens": n, "wall_s": [w for w, _ in samples],
                         "cpu_s": [c for _, c in samples],
                         "median_wall_s": median([w for w, _ in samples]),
                         "median_cpu_s": median([c for _, c in samples])})
        cpu = [r["median_cpu_s"] for r in rows]
        out["schemes"][name] = {"rows": rows, "growth_exponent": growth_exponent(lengths, cpu)}
    for n_i in range(len(lengths)):
        base = out["schemes"]["ours"]["rows"][n_i]["median_cpu_s"]
        for name in SCHEMES:
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


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    lengths = [250, 1000] if args.quick else [250, 1000, 4000]
    repeats = 1 if args.quick else 3
    results = {"quick": args.quick, "text_monitors": run(text_guard(), "text", lengths, repeats)}
    return write_result("stream_cost", results)


if __name__ == "__main__":
    main()


def render(result: dict[str, Any]) -> str:
    """The docs/benchmarks.md section for this benchmark."""
    lines = ["## Monitoring cost against stream length", "",
             "CPU seconds to monitor one stream (median of the runs), and the ratio to ours. "
             "Same Guard and monitors for every scheme; only what gets re-scored differs "
             "(bench/stream_cost.py).", ""]
    for key, title in (("text_monitors", "Text monitors (keywords + regex, no observer)"),
                       ("observer_monitors", "Hidden-state monitors on the SmolLM2 observer")):
        block = result.get(key)
        if not block:
            continue
        lengths = block["lengths"]
        lines += [f"### {title}", "",
                  "| scheme | " + " | ".join(f"{n} tokens" for n in lengths)
                  + " | growth exponent |",
                  "|---|" + "---|" * (len(lengths) + 1)]
        for name, scheme in block["schemes"].items():
            cells = [f"{r['median_cpu_s']:.3f} s ({r['cpu_ratio_to_ours']:.1f}x)"
                     for r in scheme["rows"]]
            lines.append(f"| {name} | " + " | ".join(cells)
                         + f" | {scheme['growth_exponent']:.2f} |")
        lines.append("")
    return "\n".join(lines)
