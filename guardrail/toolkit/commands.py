"""``guardrail replay`` and ``guardrail eval``: labelled records through a policy, as a built-in
plugin (``guardrail_register_commands``), so the command line reaches the toolkit through the
hook like any plugin's command. The toolkit modules load when a command runs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..cli import add_policy_args, policy_from_args
from ..guard import Guard
from ..hookspecs import hookimpl

__all__ = ["cmd_eval", "cmd_replay"]


@hookimpl
def guardrail_register_commands(
        subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("replay", help="replay labelled records; one JSON line per record")
    add_policy_args(p)
    p.add_argument("--data", "-d", required=True, help="JSON Lines records")
    p.add_argument("--limit", type=int)
    p.add_argument("--report", metavar="DIR",
                   help="write an HTML page and plot per stream here")
    p.set_defaults(func=cmd_replay)

    p = subparsers.add_parser("eval", help="metrics of each monitor on labelled records")
    add_policy_args(p)
    p.add_argument("--data", "-d", required=True, help="JSON Lines records")
    p.add_argument("--limit", type=int)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--report", metavar="DIR",
                   help="write an HTML page and plot per stream and ROC curves here")
    p.set_defaults(func=cmd_eval)


def cmd_replay(args: argparse.Namespace) -> int:
    from .records import read_records, replay_record, replay_summary

    guard = Guard(policy_from_args(args))
    pages = _StreamPages(guard, args.report, "guardrail replay") if args.report else None
    rows = []
    for index, record in enumerate(read_records(args.data)):
        if args.limit is not None and index >= args.limit:
            break
        row = replay_record(guard, record, index, on_stream=pages)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps({"summary": replay_summary(rows)}), file=sys.stderr)
    if pages is not None:
        print(f"reports: {pages.finish()}", file=sys.stderr)
    return 0


class _StreamPages:
    """``--report DIR``: an HTML page and a score plot per stream, and an index page."""

    def __init__(self, guard: Guard, out: str, title: str) -> None:
        self.guard, self.out, self.title = guard, Path(out), title
        self.rows: list[dict[str, Any]] = []
        self.images: list[str] = []

    def __call__(self, index: int, record: Any, report: Any,
                 offsets: list[tuple[int, int]]) -> None:
        from .reports import StreamRecord, write_stream_report

        thresholds = {spec.id: self.guard.threshold_of(spec) for spec, _ in self.guard.monitors}
        label = "" if record.label is None else f" (label {record.label})"
        rec = StreamRecord(title=f"record {index}{label}: {record.prompt[:70]}",
                           prompt=record.prompt, text=record.response[:offsets[-1][1]]
                           if offsets else "", offsets=offsets, report=report,
                           thresholds=thresholds)
        stem = f"record-{index:04d}"
        write_stream_report(self.out, stem, rec)
        verdict = report.halt.monitor if report.halt else _would_halt(report)
        self.rows.append({"stream": stem, "report": f"{stem}.html", "label": record.label,
                          "tokens": report.tokens, "released": report.released_tokens,
                          "halted by": verdict, "flags": len(report.flags)})

    def finish(self) -> Path:
        from .reports import write_index

        return write_index(self.out, self.rows, title=self.title, images=self.images)


def _would_halt(report: Any) -> str:
    """A dry run (``guardrail eval``) halts nothing: the monitor whose ``halt`` verdict came
    first, marked as such, or ''."""
    halts = [f for f in report.flags if f.action == "halt"]
    if not halts:
        return ""
    first = min(halts, key=lambda f: f.tokens[1])
    return f"{first.monitor} (would halt at token {first.tokens[1]})"


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate
    from .reports import plot_roc

    guard = Guard(policy_from_args(args))
    pages = _StreamPages(guard, args.report, "guardrail eval") if args.report else None
    curves: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    result = evaluate(guard, args.data, limit=args.limit, progress=not args.json,
                      on_stream=pages, curves=curves)
    if pages is not None:
        for level in ("response", "span"):
            level_curves = {m: c[level] for m, c in curves.items() if level in c}
            name = f"roc-{level}.png"
            if plot_roc(pages.out / name, level_curves, f"ROC, {level} level ({args.data})"):
                pages.images.append(name)
        print(f"reports: {pages.finish()}", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"records: {result['records']}")
        for monitor_id, metrics in result["monitors"].items():
            print(f"{monitor_id}:")
            for k, v in metrics.items():
                print(f"  {k:<22} {v:.4f}" if isinstance(v, float) else f"  {k:<22} {v}")
    return 0
