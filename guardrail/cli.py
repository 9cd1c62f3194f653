"""The ``guardrail`` command line.

Every command that takes ``--policy`` defaults to the built-in default policy; ``--monitor ID``
(repeatable) narrows a run to those monitors. Exit codes: 0 ok, 1 a bad policy or input,
2 a usage error, 3 ``guardrail run`` halted the stream (``EXIT_HALTED``).

Plugins add commands (``guardrail_register_commands``; the help's epilog lists them):
``add_policy_args`` and ``policy_from_args`` give theirs the same ``--policy``/``--monitor`` as
the built-in commands.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TextIO

from .errors import GuardrailError, PolicyError
from .events import Event, Flag, Halt, Release, event_to_dict
from .guard import Guard, build_monitors, default_policy, load_checked
from .plugins import MonitorEntry, ObserverEntry, get_host
from .policy import Policy, policy_json_schema, policy_markdown

__all__ = ["EXIT_HALTED", "add_policy_args", "build_parser", "main", "policy_from_args"]

EXIT_HALTED = 3  # `guardrail run`: the guard halted the stream (scripts can tell it from errors)


def policy_from_args(args: argparse.Namespace) -> Policy:
    """The policy that ``--policy`` and ``--monitor`` (``add_policy_args``) name: the file,
    else the built-in default policy, narrowed to the ``--monitor`` ids. Raises
    ``PolicyError`` naming each bad field and its line."""
    policy = load_checked(Path(args.policy)) if args.policy else default_policy()
    if getattr(args, "monitor", None):
        policy = policy.narrowed(args.monitor)
    return policy


def _guard(args: argparse.Namespace) -> Guard:
    return Guard(policy_from_args(args))


def add_policy_args(p: argparse.ArgumentParser) -> None:
    """``--policy FILE`` and ``--monitor ID`` (repeatable), read by ``policy_from_args``."""
    p.add_argument("--policy", "-p", help="policy YAML (default: the built-in default policy)")
    p.add_argument("--monitor", "-m", action="append", metavar="ID",
                   help="run only this monitor (repeatable)")


# -- commands ------------------------------------------------------------------------------


def cmd_plugins(args: argparse.Namespace) -> int:
    host = get_host()
    monitors = host.monitors()
    observers = host.observers()
    trainers = host.trainers()
    adapters = host.adapters()
    if args.json:
        print(json.dumps({
            "plugins": host.plugins(),
            "monitors": {n: {"plugin": e.plugin, "description": e.description}
                         for n, e in sorted(monitors.items())},
            "observers": {n: {"plugin": e.plugin, "description": e.description}
                          for n, e in sorted(observers.items())},
            "trainers": {n: {"plugin": e.plugin, "description": e.description}
                         for n, e in sorted(trainers.items())},
            "adapters": {n: {"plugin": e.plugin, "description": e.description}
                         for n, e in sorted(adapters.items())},
        }, indent=2))
        return 0
    print("plugins:")
    for p in host.plugins():
        origin = p["distribution"] or ("built-in" if p["builtin"] else "registered in code")
        print(f"  {p['name']}  [{origin}]  hooks: {', '.join(p['hooks']) or '-'}")
    sections: list[tuple[str, Mapping[str, MonitorEntry | ObserverEntry]]] = [
        ("monitors", monitors), ("observers", observers), ("trainers", trainers),
        ("adapters (Guard methods)", adapters)]
    for title, entries in sections:
        print(f"{title}:")
        for name, e in sorted(entries.items()):
            print(f"  {name:<24} {e.description}  (from {e.plugin})")
        if not entries:
            print("  (none)")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    try:
        policy = load_checked(Path(args.policy))
        built = build_monitors(policy)
    except PolicyError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(f"{args.policy}: ok ({len(built)} monitors: "
          f"{', '.join(spec.id for spec, _ in built) or 'none'})")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    if args.markdown:
        print(policy_markdown(), end="")
    else:
        print(json.dumps(policy_json_schema(), indent=2))
    return 0


def _read_chunks(stream: TextIO, size: int) -> Iterator[str]:
    """Read ``stream`` as it arrives (a pipe delivers partial input), ``size`` chars at a time."""
    while True:
        chunk = stream.read(size) if size > 0 else stream.readline()
        if not chunk:
            return
        yield chunk


def _describe(event: Event) -> str:
    d = event_to_dict(event)
    kind = d.pop("kind")
    if kind == "release":
        return f"release {d['text']!r}"
    d.pop("released_text", None)
    return f"{kind} " + " ".join(f"{k}={v!r}" for k, v in d.items() if v is not None)


def cmd_run(args: argparse.Namespace) -> int:
    guard = _guard(args)
    if args.file in (None, "-"):
        if isinstance(sys.stdin, io.TextIOWrapper):  # invalid UTF-8 becomes U+FFFD, not a crash
            sys.stdin.reconfigure(errors="replace")
        source: TextIO = sys.stdin
    else:
        source = open(args.file, encoding="utf-8", errors="replace")  # noqa: SIM115
    session = guard.session(prompt=args.prompt)
    out = sys.stdout
    flags = _FlagRuns()
    try:
        for chunk in _read_chunks(source, args.chunk):
            for event in session.feed(chunk):
                _print_event(event, args, out, flags)
        report = session.finish()
        for event in report.final_events:
            _print_event(event, args, out, flags)
        flags.close()
    finally:
        if source is not sys.stdin:
            source.close()
    if args.json:
        out.write(json.dumps({"kind": "report", **report.to_dict()}) + "\n")
    elif not args.events:
        out.write("\n")
    out.flush()
    counts = Counter(f.monitor for f in report.flags)
    by_monitor = f" ({', '.join(f'{m} {n}' for m, n in counts.most_common())})" if counts else ""
    print(f"[{report.tokens} tokens read, {report.released_tokens} released, "
          f"{len(report.flags)} flags{by_monitor}, halted: {report.halted}]", file=sys.stderr)
    return EXIT_HALTED if report.halted else 0


class _FlagRuns:
    """Plain ``guardrail run`` output: flags of one monitor on adjacent tokens make one line
    (a router flags token after token), written when the run ends."""

    def __init__(self) -> None:
        self.run: list[Flag] = []

    def add(self, flag: Flag) -> None:
        if self.run and (flag.monitor != self.run[-1].monitor
                         or flag.tokens[0] > self.run[-1].tokens[1] + 1):
            self.close()
        self.run.append(flag)

    def close(self) -> None:
        if not self.run:
            return
        if len(self.run) == 1:
            print(f"[{_describe(self.run[0])}]", file=sys.stderr)
        else:
            first, last = self.run[0], self.run[-1]
            print(f"[flag monitor={first.monitor!r} x{len(self.run)} "
                  f"tokens={(first.tokens[0], last.tokens[1])!r} "
                  f"span={(first.span[0], last.span[1])!r} "
                  f"max_score={max(f.score for f in self.run):.3f}]", file=sys.stderr)
        self.run = []


def _print_event(event: Event, args: argparse.Namespace, out: TextIO, flags: _FlagRuns) -> None:
    if args.json:
        out.write(json.dumps(event_to_dict(event)) + "\n")
    elif args.events:
        out.write(_describe(event) + "\n")
    elif isinstance(event, Flag):
        flags.add(event)
        return
    elif isinstance(event, Release):
        out.write(event.text)
    elif isinstance(event, Halt):
        flags.close()
        out.write(f"\n[halted by {event.monitor}: {event.message}]")
    else:
        flags.close()
        print(f"[{_describe(event)}]", file=sys.stderr)
    out.flush()


def cmd_train(args: argparse.Namespace) -> int:
    trainers = get_host().trainers()
    if args.name in (None, "--all") or args.all:
        names = sorted(trainers) if args.all else []
        if not names:
            print("trainers: " + (", ".join(sorted(trainers)) or "none installed"))
            return 0 if trainers or not args.all else 1
        return max(trainers[n].factory(list(args.rest)) for n in names)
    if args.name not in trainers:
        print(f"no trainer {args.name!r}; installed: {', '.join(sorted(trainers)) or 'none'}",
              file=sys.stderr)
        return 2
    return int(trainers[args.name].factory(list(args.rest)))


# -- parser ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="guardrail", description="Streaming guardrail middleware for LLM output.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("plugins",
                       help="list loaded plugins, monitors, observers, trainers and adapters")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("check", help="validate a policy file (every error with field and line)")
    p.add_argument("policy")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("schema", help="print the policy JSON Schema")
    p.add_argument("--markdown", action="store_true", help="the Markdown reference instead")
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser("run", help="guard a text stream from stdin or a file",
                       description="Guard a text stream: released text on stdout, flags and a "
                       "summary on stderr. Exit code 0 when the stream ended normally, "
                       f"{EXIT_HALTED} when the guard halted it, 1 on a bad policy.")
    add_policy_args(p)
    p.add_argument("file", nargs="?", help="text file (default: stdin)")
    p.add_argument("--prompt", help="the user prompt the text answers")
    p.add_argument("--chunk", type=int, default=16,
                   help="read this many chars at a time (0: a line at a time)")
    p.add_argument("--events", action="store_true", help="print every event, one a line")
    p.add_argument("--json", action="store_true", help="events and the report as JSON Lines")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("train", help="train a monitor (guardrail train NAME [ARGS...])")
    p.add_argument("name", nargs="?")
    p.add_argument("--all", action="store_true", help="run every installed trainer")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_train)

    host = get_host()
    added = host.add_commands(sub)
    builtin = {p["name"] for p in host.plugins() if p["builtin"]}
    from_plugins = [f"{command} ({plugin})" for command, plugin in added.items()
                    if plugin not in builtin]
    if from_plugins:
        parser.epilog = f"Commands from installed plugins: {', '.join(from_plugins)}."
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
    except GuardrailError as exc:  # a plugin's commands clash
        print(f"error: {exc}", file=sys.stderr)
        return 1
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except PolicyError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    except GuardrailError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `guardrail replay ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
