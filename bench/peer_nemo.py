"""The real peer: NeMo Guardrails' streaming output rails against our session, on the same
replayed streams, with the same monitors judging.

NeMo runs in its own venv (.cache/peers/nemo: nemoguardrails + langchain-openai + this project,
built once, about 400 MB); its output rail is an action that runs our monitors over the rail's
text. We report, per scheme and per label: words shown to the reader before a block, words the
upstream generated, time to first text, and total time. Without the venv (quick mode, or no
network to PyPI) the NeMo rows are skipped and the results say why.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from guardrail import Guard, default_policy
from guardrail.events import Release

from .common import describe_monitors, median, write_result

ROOT = Path(__file__).resolve().parents[1]
NEMO_VENV = ROOT / ".cache" / "peers" / "nemo"
REPLAYS = ROOT / "plugins" / "harmful-content" / "guardrail_harmful_content" / "replays"
CONFIGS = [
    {"name": "nemo stream_first=True", "chunk_size": 200, "context_size": 50,
     "stream_first": True},
    {"name": "nemo stream_first=False", "chunk_size": 200, "context_size": 50,
     "stream_first": False},
]
FALLBACK_POLICY = {"release": {"hold_back_tokens": 8}, "monitors": [
    {"id": "weapons", "use": "keywords", "action": "halt",
     "options": {"words": ["pipe bomb", "explosive", "detonator"]}}]}


def load_replays(limit: int | None) -> list[dict[str, Any]]:
    rows = []
    for name in ("harmful.jsonl", "benign.jsonl"):
        path = REPLAYS / name
        if path.exists():
            lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
            rows += lines[:limit] if limit else lines
    return rows


def policy_mapping() -> dict[str, Any]:
    """The default policy narrowed to harmful content when it is installed, else a keyword list.
    The observer runs on ONNX Runtime when it is installed: the same model and monitors, about
    twice as fast on this CPU, which keeps `make bench` within its time budget."""
    policy = default_policy()
    harm = [m for m in policy.monitors if m.use == "harmful-content"]
    if not harm:
        return FALLBACK_POLICY
    mapping = policy.narrowed([harm[0].id]).model_dump(mode="json")
    if importlib.util.find_spec("onnxruntime") is not None:
        mapping["observer"]["backend"] = "onnx"
    return mapping


def ensure_venv(build: bool) -> str | None:
    """The NeMo venv's python, built if asked; None (and why) if it is not available."""
    python = NEMO_VENV / "bin" / "python"
    if python.exists():
        return str(python)
    if not build:
        return None
    NEMO_VENV.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(NEMO_VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, "nemoguardrails", "langchain-openai"], check=True)
    extras = [str(ROOT)] + [str(p.parent) for p in sorted(ROOT.glob("plugins/*/pyproject.toml"))]
    subprocess.run([*pip, "-e", ".[observer]", *[f"-e{p}" for p in extras[1:]]], cwd=ROOT,
                   check=True)
    return str(python)


def run_ours(guard: Guard, replays: list[dict[str, Any]], delay: float) -> list[dict[str, Any]]:
    rows = []
    for replay in replays:
        words = replay["response"].split(" ")
        session = guard.session(prompt=replay["prompt"])
        shown, generated, first = "", 0, None
        t0 = time.perf_counter()
        for i, word in enumerate(words):
            if delay:
                time.sleep(delay)
            generated = i + 1
            for event in session.feed(word + (" " if i < len(words) - 1 else "")):
                if isinstance(event, Release):
                    first = first if first is not None else time.perf_counter() - t0
                    shown += event.text
            if session.halted is not None:
                break  # the adapter closes the upstream here
        report = session.finish()
        for event in report.final_events:
            if isinstance(event, Release):
                first = first if first is not None else time.perf_counter() - t0
                shown += event.text
        rows.append({"config": f"ours hold_back={guard.policy.release.hold_back_tokens}",
                     "label": replay.get("label"), "blocked": report.halted,
                     "words_total": len(words), "words_generated": generated,
                     "words_shown": len(shown.split()), "chars_shown": len(shown),
                     "ttft_s": first, "total_s": time.perf_counter() - t0})
    return rows


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in dict.fromkeys(r["config"] for r in rows):
        mine = [r for r in rows if r["config"] == name]
        harmful = [r for r in mine if r["label"] == 1]
        benign = [r for r in mine if r["label"] == 0]
        out[name] = {
            "harmful_blocked": sum(r["blocked"] for r in harmful) / max(1, len(harmful)),
            "harmful_words_shown_median": median([r["words_shown"] for r in harmful]),
            "harmful_share_generated_median": median(
                [r["words_generated"] / r["words_total"] for r in harmful]),
            "benign_blocked": sum(r["blocked"] for r in benign) / max(1, len(benign)),
            "ttft_s_median": median([r["ttft_s"] for r in mine if r["ttft_s"] is not None]),
            "total_s_median": median([r["total_s"] for r in mine]),
        }
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--build-venv", action="store_true", help="create the NeMo venv if absent")
    args = parser.parse_args(argv)
    replays = load_replays(1 if args.quick else None)  # quick: a smoke test
    mapping = policy_mapping()
    guard = Guard.from_policy(mapping)
    delay = 0.0
    rows = run_ours(guard, replays, delay)
    note = None
    python = ensure_venv(build=args.build_venv or (not args.quick and
                                                   os.environ.get("CI") != "true"))
    if python is None:
        note = (f"NeMo Guardrails not run: no venv at {NEMO_VENV} (build it with "
                "python -m bench.peer_nemo --build-venv; it installs nemoguardrails from PyPI)")
    else:
        job = {"replays": replays, "policy": mapping, "configs": CONFIGS, "delay": delay}
        out = subprocess.run([python, str(ROOT / "bench" / "peers" / "nemo_runner.py")],
                             input=json.dumps(job), capture_output=True, text=True,
                             timeout=1800, cwd=ROOT)
        if out.returncode != 0:
            note = f"NeMo run failed: {out.stderr.strip().splitlines()[-1:]}"
        else:
            nemo = json.loads(out.stdout.strip().splitlines()[-1])
            rows += nemo["rows"]
            note = f"nemoguardrails {nemo['nemoguardrails']}"
    result = {"quick": args.quick, "policy": mapping, "replays": len(replays), "rows": rows,
              "summary": summarise(rows), "note": note}
    print(f"[peer_nemo] {note}")
    return write_result("peer_nemo", result)


def render(result: dict[str, Any]) -> str:
    lines = ["## The real peer: NeMo Guardrails streaming output rails", "",
             f"{result['replays']} replayed answers (harmful and benign, from the harmful-content "
             "replay sets), streamed word by word; the same monitors judge in both systems "
             "(NeMo's output rail is an action that runs them over the rail's text). "
             f"Monitors: {describe_monitors(result['policy'])}. {result.get('note') or ''}", "",
             "| scheme | harmful blocked | words of a harmful answer shown (median) | share of "
             "it generated (median) | benign blocked | time to first text (median) |",
             "|---|---|---|---|---|---|"]
    for name, s in result["summary"].items():
        lines.append(f"| {name} | {s['harmful_blocked']:.0%} "
                     f"| {s['harmful_words_shown_median']:.0f} "
                     f"| {s['harmful_share_generated_median']:.0%} | {s['benign_blocked']:.0%} "
                     f"| {s['ttft_s_median'] * 1000:.0f} ms |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(main())
