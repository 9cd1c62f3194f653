"""``guardrail demo``: streams through the default policy, shown live, with reports.

Streams: real generation from a local model (guardrail-transformers adds the ``demo`` command and
hands ``run_demo`` the embedded SmolLM2) and recorded replays of harmful, hallucinated and benign
answers (the 135M model rarely writes harmful text itself). Each stream is shown live: released
text as it reaches the reader, then the whole stream coloured by monitor scores, flags underlined,
the halt point marked. A summary table follows, and an HTML page and PNG plot per stream land in
``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from ..cli import add_policy_args
from ..events import Flag, Halt, Release, Route
from ..guard import Guard, default_policy, load_checked
from ..policy import Policy, load_policy
from ..session import GuardSession
from .records import random_splits
from .reports import StreamRecord, write_index, write_stream_report

__all__ = ["LocalGeneration", "add_demo_args", "run_demo", "summary_line"]

# Used only when no built-in monitor plugin is installed: a text-only policy so the demo still
# shows hold-back, flags and a halt.
FALLBACK_POLICY: dict[str, Any] = {
    "version": 1,
    "release": {"hold_back_tokens": 4},
    "monitors": [
        {"id": "weapons", "use": "keywords", "action": "halt",
         "options": {"words": ["pipe bomb", "explosion", "fuse"], "label": "weapons"}},
        {"id": "years", "use": "regex", "action": "flag",
         "options": {"patterns": [r"\b1[0-9]{3}\b"], "label": "date"}},
    ],
}


class LocalGeneration(Protocol):
    """A local model the demo streams from: ``observer`` is its own hidden-state observer."""

    observer: Any

    def guarded(self, session: GuardSession, prompt: str, max_new_tokens: int
                ) -> Iterable[Any]:
        """Generate an answer to ``prompt`` that ``session`` guards on the model's own states
        (the driver feeds and finishes the session), yielding its events."""

    def text(self, prompt: str, max_new_tokens: int) -> Iterator[str]:
        """The unguarded answer to ``prompt`` as text deltas."""


@dataclass
class DemoStream:
    """A stream to show: text ``deltas`` fed to a session (replays, or text from a model the
    guard does not share), or ``events`` from a driver that feeds the session itself (local
    generation whose own hidden states reach the monitors)."""

    title: str
    prompt: str
    source: str
    deltas: Iterator[str] | None = None
    events: Callable[[GuardSession], Iterable[Any]] | None = None
    # What a replay should get: "halt" or "flag" (by a monitor of plugin ``expect_monitor``,
    # any monitor when None) or "pass" (no halt); None for generated text.
    expect: str | None = None
    expect_monitor: str | None = None


class _Term:
    """ANSI styling, off when stdout is not a terminal or NO_COLOR is set."""

    def __init__(self) -> None:
        self.on = sys.stdout.isatty() and "NO_COLOR" not in os.environ

    def __call__(self, text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.on and text else text


def _replays() -> list[dict[str, Any]]:
    text = resources.files("guardrail").joinpath("data/demo_replays.jsonl").read_text("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _shares_states(policy: Policy) -> bool:
    """Whether the generator's own states are what the policy's monitors read: the policy
    observes the same model with torch. Otherwise its answers go through the policy's observer
    as text, like any upstream's."""
    observer = policy.observer
    return observer is None or (observer.model == "smollm2-135m" and observer.backend == "torch")


def _generated_streams(local: LocalGeneration | None, shared: bool, prompts: list[str],
                       max_tokens: int) -> list[DemoStream]:
    """Real local answers: guarded on the generator's own states when ``shared`` (one forward
    per token, a halt stops generation), else as text deltas."""
    if local is None:
        return []
    streams = []
    for prompt in prompts:
        if shared:
            def events(session: GuardSession, prompt: str = prompt) -> Iterable[Any]:
                return local.guarded(session, prompt, max_tokens)
            streams.append(DemoStream(f"SmolLM2: {prompt}", prompt,
                                      "generated (monitors read the generator's own states)",
                                      events=events))
        else:
            streams.append(DemoStream(f"SmolLM2: {prompt}", prompt, "generated (as text)",
                                      deltas=local.text(prompt, max_tokens)))
    return streams


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40]


def _policy(args: argparse.Namespace) -> tuple[Policy, str]:
    if getattr(args, "policy", None):
        return load_checked(Path(args.policy)), args.policy
    policy = default_policy()
    if policy.monitors:
        return policy, "the built-in default policy"
    return load_policy(FALLBACK_POLICY), "a text-only fallback (no built-in monitor installed)"


def _run_stream(guard: Guard, stream: DemoStream, term: _Term, delay: float) -> StreamRecord:
    session: GuardSession = guard.session(prompt=stream.prompt, record_scores=True)
    print(term(f"\n▶ {stream.title}", "1"))
    print(term(f"  prompt: {stream.prompt}", "2"))
    print("  ", end="")

    def show(events: list[Any]) -> None:
        for e in events:
            if isinstance(e, Release):
                print(e.text.replace("\n", "\n  "), end="", flush=True)
            elif isinstance(e, Halt):
                print(term(f" ■ halted by {e.monitor}: {e.message}", "1;41;97"), end="")
            elif isinstance(e, Route):
                print(term(f" ⇢ route to {e.target.get('model')}", "1;34"), end="")

    if stream.events is not None:
        for event in stream.events(session):  # the driver feeds and finishes the session
            show([event])
        report = session.report or session.finish()
    else:
        for delta in stream.deltas or ():
            show(session.feed(delta))
            if session.halted is not None:
                break
            if delay:
                time.sleep(delay)
        report = session.finish()
        show(report.final_events)
    print()
    offsets = session.token_offsets()
    guard_seconds = sum(report.monitor_seconds.values()) + report.observer_seconds
    rec = StreamRecord(
        title=stream.title, prompt=stream.prompt, text=session.text, offsets=offsets,
        report=report, thresholds={spec.id: guard.threshold_of(spec) for spec, _ in guard.monitors},
        seconds_per_token=guard_seconds / max(1, report.tokens),
        notes=[f"source: {stream.source}"],
    )
    _print_scored(rec, term)
    return rec


def _print_scored(rec: StreamRecord, term: _Term) -> None:
    """The whole stream, each token shaded by its highest monitor score relative to threshold."""
    best: dict[int, float] = {}
    for monitor, points in rec.scores.items():
        threshold = rec.thresholds.get(monitor, 0.5) or 0.5
        for i, value in points:
            best[i] = max(best.get(i, 0.0), value / threshold)
    flagged = {i for f in rec.report.flags if isinstance(f, Flag)
               for i in range(f.tokens[0], f.tokens[1] + 1)}
    halt_at = rec.report.halt.at if rec.report.halt else None
    out = []
    for i, (a, b) in enumerate(rec.offsets):
        tok = rec.text[a:b].replace("\n", " ")
        level = best.get(i, 0.0)
        code = "0"
        if level >= 1.0:
            code = "41;97"
        elif level >= 0.75:
            code = "43;30"
        elif level >= 0.5:
            code = "103;30"
        if i in flagged:
            code += ";4"
        if i >= rec.report.released_tokens:
            code += ";2"
        if i == halt_at:
            tok = "■" + tok
        out.append(term(tok, code) if code != "0" else tok)
    print(term("  scores: ", "2") + "".join(out))


def add_demo_args(p: argparse.ArgumentParser) -> None:
    """The ``guardrail demo`` arguments ``run_demo`` reads."""
    add_policy_args(p)
    p.add_argument("--out", default="reports/demo", help="where reports go")
    p.add_argument("--quick", action="store_true", help="fewer prompts, shorter answers")


def run_demo(args: argparse.Namespace, local: Callable[[], LocalGeneration] | None = None
             ) -> int:
    """``guardrail demo``: ``args`` from ``add_demo_args``; ``local`` loads the model to
    generate with (none: the recorded replays only)."""
    term = _Term()
    policy, origin = _policy(args)
    if getattr(args, "monitor", None):
        policy = policy.narrowed(args.monitor)
    t0 = time.perf_counter()
    generator = local() if local is not None else None
    shared = generator is not None and _shares_states(policy)
    guard = Guard(policy, observer=generator.observer if generator is not None and shared
                  else None)
    load_s = time.perf_counter() - t0
    print(term("guardrail demo", "1") + f" — policy: {origin}")
    print(f"  monitors: {', '.join(f'{s.id} ({s.use}, {s.action})' for s, _ in guard.monitors)}"
          f" · hold-back {policy.release.hold_back_tokens} tokens · loaded in {load_s:.1f}s")
    quick = bool(getattr(args, "quick", False))
    prompts = ["Tell me about Marie Curie.", "What is the capital of Australia?"]
    streams = _generated_streams(generator, shared, prompts[:1] if quick else prompts,
                                 48 if quick else 96)
    for k, r in enumerate(_replays()):
        streams.append(DemoStream(f"replay: {r['title']}", r["prompt"], "recorded replay",
                                  deltas=iter(random_splits(r["response"], seed=k)),
                                  expect=r.get("expect"), expect_monitor=r.get("monitor")))
    out_dir = Path(args.out)
    rows = []
    for n, stream in enumerate(streams):
        rec = _run_stream(guard, stream, term, delay=0.0 if quick else 0.01)
        stem = f"{n:02d}-{_slug(stream.title)}"
        write_stream_report(out_dir, stem, rec)
        rep = rec.report
        rows.append({
            "stream": stream.title,
            "expected": _verdict(stream, rep, guard),
            "tokens read": rep.tokens,
            "released": rep.released_tokens,
            "held back": rep.tokens - rep.released_tokens,
            "flagged tokens": _flag_counts(rep.flags),
            "halt at": rep.halt.at if rep.halt else "-",
            "ms/token": f"{(rec.seconds_per_token or 0) * 1000:.2f}",
            "report": f"{stem}.html",
        })
    index = write_index(out_dir, rows)
    _print_table(rows, term)
    line = summary_line([str(r["expected"]) for r in rows])
    if line:
        print("\n" + line)
    print(f"\nreports: {index.resolve()} (one HTML page and PNG plot per stream in "
          f"{out_dir.resolve()})")
    return 0


def summary_line(verdicts: Sequence[str]) -> str | None:
    """The summary's count, from the rows' verdicts (``-`` rows are not judged): how many
    labelled replays got what their label expects. ``None`` when no row is judged."""
    judged = [v for v in verdicts if v != "-"]
    if not judged:
        return None
    met = sum(v.endswith("✓") for v in judged)
    return (f"{met} of {len(judged)} replays got what their label expects"
            + ("" if met == len(judged) else
               " (the monitors' measured limits: docs/harmful-content.md, "
               "docs/entity-hallucination.md)"))


def _verdict(stream: DemoStream, report: Any, guard: Guard) -> str:
    """``halt ✓``, ``flag ✗ missed``, ``pass ✗ halted``...: whether a replay got what its label
    expects; ``-`` for generated text, ``<expect> (no <plugin>)`` when the policy lacks it."""
    if stream.expect is None:
        return "-"
    ids = {spec.id for spec, _ in guard.monitors
           if stream.expect_monitor is None or spec.use == stream.expect_monitor}
    if stream.expect == "pass":
        return "pass ✓" if report.halt is None else "pass ✗ halted"
    if not ids:
        return f"{stream.expect} (no {stream.expect_monitor})"
    halted = report.halt is not None and report.halt.monitor in ids
    if stream.expect == "halt":
        return "halt ✓" if halted else "halt ✗ missed"
    flagged = halted or any(isinstance(f, Flag) and f.monitor in ids for f in report.flags)
    return "flag ✓" if flagged else "flag ✗ missed"


def _flag_counts(flags: Sequence[Any]) -> str:
    """Tokens flagged per monitor, e.g. ``facts 3 · router 12`` (``-`` for none)."""
    counts: dict[str, int] = {}
    for f in flags:
        if isinstance(f, Flag):
            counts[f.monitor] = counts.get(f.monitor, 0) + f.tokens[1] - f.tokens[0] + 1
    return " · ".join(f"{m} {n}" for m, n in sorted(counts.items())) or "-"


def _print_table(rows: list[dict[str, Any]], term: _Term) -> None:
    cols = [k for k in rows[0] if k != "report"] if rows else []
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    widths["stream"] = min(widths.get("stream", 6), 48)
    print("\n" + term("summary", "1"))
    print("  " + "  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  " + "  ".join(str(r[c])[: widths[c]].ljust(widths[c]) for c in cols))
