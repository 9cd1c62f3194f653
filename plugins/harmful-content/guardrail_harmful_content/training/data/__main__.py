"""``python -m guardrail_harmful_content.training.data build --out DIR [--seed N] [--limit N]
[--own-answers FILE] [--no-handwritten]``, ``python -m guardrail_harmful_content.training.data
handwritten FILE...`` (check writers' files and count them), ``python -m
guardrail_harmful_content.training.data own-answers --out FILE [--count N]`` (the observed model's
own answers to benign prompts; resumable) and ``python -m guardrail_harmful_content.training.data
replays [--out DIR]``."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

from guardrail.errors import ObserverError

from .build import BuildConfig, build_dataset
from .handwritten import read_handwritten
from .longform import default_longfact_dir, read_longfact
from .own_answers import OwnAnswersConfig, generate_own_answers, prompt_order
from .replays import default_replay_dir, write_replays
from .sources import SourceError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m guardrail_harmful_content.training.data")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="write train/val/test JSON Lines and manifest.json")
    build.add_argument("--out", type=Path, required=True, help="output folder")
    build.add_argument("--seed", type=int, default=BuildConfig.seed)
    build.add_argument("--limit", type=int, default=None,
                       help="at most N examples from each source list (tiny builds for tests)")
    build.add_argument("--cache", type=Path, default=None,
                       help="wheel cache (default $GUARDRAIL_CACHE or ~/.cache/guardrail)")
    build.add_argument("--longfact", type=Path, default=None, help="LongFact prompt folder")
    build.add_argument("--own-answers", type=Path, default=None, metavar="FILE",
                       help="the model's own answers (from the own-answers command) as "
                            "harmless records (default: the shipped SmolLM2 answers)")
    build.add_argument("--no-own-answers", action="store_true",
                       help="leave the model's own answers out")
    build.add_argument("--no-handwritten", action="store_true",
                       help="leave the shipped hand-written sets out")
    check = sub.add_parser("handwritten", help="check writers' files (handwritten.py format) "
                                               "and count their records")
    check.add_argument("files", type=Path, nargs="+", metavar="FILE")
    own = sub.add_parser("own-answers", help="the observed model's greedy answers to benign "
                                             "LongFact prompts (appends; resumes a cut run)")
    own.add_argument("--out", type=Path, required=True, help="JSON Lines file")
    own.add_argument("--count", type=int, default=OwnAnswersConfig.count,
                     help="answer the first N prompts of the own-answer order")
    own.add_argument("--max-new-tokens", type=int, default=OwnAnswersConfig.max_new_tokens)
    own.add_argument("--batch-size", type=int, default=OwnAnswersConfig.batch_size)
    own.add_argument("--model", type=Path, default=None,
                     help="local HF model folder (default: the embedded SmolLM2)")
    own.add_argument("--longfact", type=Path, default=None, help="LongFact prompt folder")
    own.add_argument("--quiet", action="store_true", help="no progress bar")
    replays = sub.add_parser("replays", help="write the small bench/demo replay sets")
    replays.add_argument("--out", type=Path, default=None, help="default: the package's replays/")
    replays.add_argument("--cache", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            config = BuildConfig(seed=args.seed, limit=args.limit, cache=args.cache)
            if args.longfact is not None:
                config = replace(config, longfact_dir=args.longfact)
            if args.own_answers is not None or args.no_own_answers:
                config = replace(config, own_answers=None if args.no_own_answers
                                 else args.own_answers)
            if args.no_handwritten:
                config = replace(config, handwritten=())
            manifest = build_dataset(args.out, config)
            summary = {name: manifest["counts"][name]["labels"] for name in manifest["counts"]}
            print(json.dumps({"out": str(args.out), "labels": summary}))
        elif args.command == "handwritten":
            print(json.dumps({str(f): _handwritten_counts(f) for f in args.files}, indent=1))
        elif args.command == "own-answers":
            print(json.dumps(_own_answers(args)))
        else:
            paths = write_replays(args.out or default_replay_dir(), cache=args.cache)
            print(json.dumps({"written": [str(p) for p in paths]}))
    except (SourceError, FileNotFoundError, ValueError, ObserverError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _handwritten_counts(path: Path) -> dict[str, object]:
    examples = read_handwritten(path, "check")
    return {"records": len(examples),
            "labels": dict(Counter(str(ex.label) for ex in examples)),
            "kinds": dict(sorted(Counter(ex.kind for ex in examples).items())),
            "categories": dict(sorted(Counter(f"{ex.extra['category']}/{ex.label}"
                                              for ex in examples).items()))}


def _own_answers(args: argparse.Namespace) -> dict[str, object]:
    from guardrail.observer.hf import FLOAT32_PRODUCTS, load_model_dir, load_smollm2
    from guardrail.policy import ObserverSpec

    prompts = prompt_order(read_longfact(args.longfact or default_longfact_dir()))
    if args.model is None:
        observer = load_smollm2(ObserverSpec(options=FLOAT32_PRODUCTS))
        name = OwnAnswersConfig.model
    else:
        observer = load_model_dir(args.model, name=args.model.name, window=2048,
                                  options=FLOAT32_PRODUCTS)
        name = args.model.name
    config = OwnAnswersConfig(count=args.count, max_new_tokens=args.max_new_tokens,
                              batch_size=args.batch_size, model=name)
    return generate_own_answers(args.out, prompts, observer.model, observer.hf_tokenizer,
                                config, progress=not args.quiet)


if __name__ == "__main__":
    raise SystemExit(main())
