"""What a smaller ``observer.window`` changes in the shipped monitors' scores on long streams.

The harmful-content and entity monitors (SmolLM2 on ONNX) score the same texts with windows of
2048, 1024 and 512 tokens, fed 120 characters at a time in dry runs (every score recorded): the
harm test records with more than 480 response tokens, 6 streams of 10 joined harm test records,
and 4 streams of 25 joined entity test records (joined with spaces, seed 0). Per smaller
window: the largest and mean absolute score difference against 2048 over every token, the mean
over response tokens from three quarters of the smaller window on, and how many streams keep
their first flag at the same token. Run by hand (``python -m bench.observer_window``, about
10 CPU-minutes); the result is rendered under bench/stream_cost.py's section.

Needs the harm and entity data sets in the cache
(``python -m guardrail_harmful_content.training.data``, the entity plugin's data build).
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path
from typing import Any

from guardrail import Guard

from .common import write_result

WINDOWS = [2048, 1024, 512]
STEP = 120  # characters per delta


def _guard(use: str, window: int) -> Guard:
    return Guard.from_policy({"observer": {"model": "smollm2-135m", "backend": "onnx",
                                           "window": window},
                              "monitors": [{"id": use, "use": use}]})


def _run(guard: Guard, prompt: str, text: str) -> tuple[list[Any], int | None, int]:
    session = guard.session(prompt=prompt, dry_run=True, record_scores=True)
    for i in range(0, len(text), STEP):
        session.feed(text[i:i + STEP])
    report = session.finish()
    scores = next(iter(report.scores.values()), [])
    flags = [f.tokens[0] for f in report.flags]
    return scores, (min(flags) if flags else None), report.tokens


def _sets() -> dict[str, tuple[str, list[dict[str, Any]]]]:
    home = Path.home() / ".cache" / "guardrail"
    harm = [json.loads(x) for x in (home / "harmful-content/data/test.jsonl").open()]
    ent = [json.loads(x) for x in (home / "entity-data/test.jsonl").open()]
    tokenizer = _guard("harmful-content", WINDOWS[0]).observer.tokenizer
    rng = random.Random(0)
    long_harm = [r for r in harm if len(tokenizer.tokenize(r["response"])) > 480]
    joined_harm = []
    for _ in range(6):
        picks = rng.sample(harm, 10)
        joined_harm.append({"prompt": picks[0]["prompt"],
                            "response": " ".join(p["response"] for p in picks)})
    joined_ent = []
    for _ in range(4):
        picks = rng.sample(ent, 25)
        joined_ent.append({"prompt": picks[0]["prompt"],
                           "response": " ".join(p["response"] for p in picks)})
    return {"harm: test records > 480 response tokens": ("harmful-content", long_harm),
            "harm: 6 streams of 10 joined test records": ("harmful-content", joined_harm),
            "entity: 4 streams of 25 joined test records": ("entity-hallucination", joined_ent)}


def main(argv: list[str] | None = None) -> Path:
    out: dict[str, Any] = {}
    for name, (use, records) in _sets().items():
        runs = {}
        for window in WINDOWS:
            guard = _guard(use, window)
            t0 = time.process_time()
            runs[window] = [_run(guard, r["prompt"], r["response"]) for r in records]
            print(f"[observer_window] {name} {window}: {time.process_time() - t0:.0f} CPU-s",
                  file=sys.stderr)
        base = runs[WINDOWS[0]]
        row: dict[str, Any] = {"records": len(records), "tokens": [b[2] for b in base]}
        for window in WINDOWS[1:]:
            diffs: list[float] = []
            past: list[float] = []
            same = 0
            for (sa, fa, _), (sb, fb, _) in zip(base, runs[window], strict=True):
                a, b = dict(sa), dict(sb)
                for i in sorted(set(a) & set(b)):
                    diffs.append(abs(a[i] - b[i]))
                    if i >= window - window // 4:
                        past.append(abs(a[i] - b[i]))
                same += fa == fb
            row[str(window)] = {
                "max_abs": round(max(diffs, default=0.0), 4),
                "mean_abs": round(sum(diffs) / len(diffs), 5) if diffs else 0.0,
                "mean_abs_past_window": round(sum(past) / len(past), 5) if past else 0.0,
                "first_flag_same": f"{same}/{len(records)}",
                "first_flags": [[x[1] for x in base], [x[1] for x in runs[window]]]}
        out[name] = row
    return write_result("observer_window_scores", {"sets": out, "windows": WINDOWS})


def render(result: dict[str, Any]) -> str:
    windows = result["windows"]
    lines = [f"### Scores with a smaller observer window ({result['written'][:10]})", "",
             "The shipped harm and entity monitors on long texts, each smaller window against "
             f"{windows[0]} (bench/observer_window.py, run by hand): largest / mean absolute "
             "score difference over every token, the mean over response tokens from three "
             "quarters of the smaller window on (where its drops can matter), streams whose "
             "first flag lands on the same token. With 2048 nothing is dropped in these texts.",
             "",
             "| texts | tokens | window | max diff | mean diff | mean past window "
             "| first flag same |",
             "|---|---|---|---|---|---|---|"]
    for name, row in result["sets"].items():
        tokens = f"{min(row['tokens'])}-{max(row['tokens'])}"
        for window in windows[1:]:
            x = row[str(window)]
            lines.append(f"| {name} ({row['records']}) | {tokens} | {window} | {x['max_abs']} | "
                         f"{x['mean_abs']} | {x['mean_abs_past_window']} | "
                         f"{x['first_flag_same']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
