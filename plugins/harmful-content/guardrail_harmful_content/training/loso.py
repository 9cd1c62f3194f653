"""Leave-one-source-out (LOSO) validation for the harmful-content head.

A fold holds out every record of one source tag (``data/tags.py``) and trains on the records of
all the others, so a head is always scored on text written by a source it never saw: another
dataset, another template family, another generator. ``loso_folds`` never puts a tag on both
sides. ``pool_sample`` draws the pool the selection reads: every split of a build, at most
``per_cell`` records of each (tag, label) cell, responses cut at a sentence end (feature
extraction on CPU is the cost; the cut keeps the opening of every answer, which is what a
streaming rule that halts early reads).
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["WHOLE", "Fold", "cut_record", "loso_folds", "main", "pool_sample", "read_pool_records"]


@dataclass(frozen=True)
class Fold:
    """One held-out source: the indices to train on and those to score."""

    held_out: str
    train: tuple[int, ...]
    test: tuple[int, ...]


def loso_folds(tags: Sequence[str], sources: Iterable[str] | None = None) -> list[Fold]:
    """One fold per tag in ``sources`` (default: every tag in ``tags``, sorted): the records of
    that tag are the test side, every other record the train side."""
    by_tag: dict[str, list[int]] = defaultdict(list)
    for i, tag in enumerate(tags):
        if not tag:
            raise ValueError(f"record {i}: empty source tag")
        by_tag[tag].append(i)
    held = sorted(by_tag) if sources is None else list(sources)
    folds = []
    for tag in held:
        if tag not in by_tag:
            raise ValueError(f"source {tag!r}: no record carries it (have {sorted(by_tag)})")
        test = tuple(by_tag[tag])
        train = tuple(i for i, t in enumerate(tags) if t != tag)
        folds.append(Fold(tag, train, test))
    return folds


def cut_record(record: Mapping[str, Any], max_chars: int) -> dict[str, Any]:
    """``record`` with its response cut at the last sentence end at or before ``max_chars``
    (at ``max_chars`` when no sentence ends there); spans and sentence labels clipped."""
    out = dict(record)
    response = str(record["response"])
    if len(response) <= max_chars:
        return out
    sentences = list(record.get("sentences") or [])
    ends = [int(s["end"]) for s in sentences if int(s["end"]) <= max_chars]
    cut = max(ends) if ends else max_chars
    out["response"] = response[:cut]
    out["spans"] = [{**s, "end": min(int(s["end"]), cut)} for s in record.get("spans") or []
                    if int(s["start"]) < cut]
    out["sentences"] = [{**s, "end": min(int(s["end"]), cut)} for s in sentences
                        if int(s["start"]) < cut]
    return out


def read_pool_records(data: Path) -> list[dict[str, Any]]:
    """Every record of a build's train/val/test files, each with its ``split``."""
    out = []
    for split in ("train", "val", "test"):
        path = data / f"{split}.jsonl"
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not record.get("source_tag"):
                raise ValueError(f"{path}:{n}: no source_tag (rebuild the data)")
            out.append({**record, "split": split})
    return out


WHOLE = ("handwritten:",)
"""Tag prefixes of the sources the pool takes whole: the hand-written sets are small and are
the closest thing to text nobody here generated."""


def pool_sample(records: Sequence[Mapping[str, Any]], per_cell: int, max_chars: int,
                seed: int = 0, whole: Sequence[str] = WHOLE) -> list[dict[str, Any]]:
    """At most ``per_cell`` records of each (source_tag, label) cell, cut to ``max_chars``, in
    their original order; every record of a tag that starts with one of ``whole``, uncut (their
    answers can turn harmful late). A cell taken whole draws nothing from the seeded sample, so
    the other cells' draws do not change when a hand-written set is added."""
    cells: dict[tuple[str, int], list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        cells[(str(r["source_tag"]), int(r["label"]))].append(i)
    rng = random.Random(f"{seed}:pool")
    keep: list[int] = []
    for key in sorted(cells):
        members = cells[key]
        if key[0].startswith(tuple(whole)):
            keep.extend(members)
            continue
        keep.extend(rng.sample(members, min(per_cell, len(members))))
    return [dict(records[i]) if str(records[i]["source_tag"]).startswith(tuple(whole))
            else cut_record(records[i], max_chars) for i in sorted(keep)]


def main(argv: list[str] | None = None) -> int:
    """``python -m guardrail_harmful_content.training.loso --data BUILD --out POOL.jsonl``:
    write the pool the LOSO selection reads."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m guardrail_harmful_content.training.loso")
    parser.add_argument("--data", type=Path, required=True, help="a data build folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--per-cell", type=int, default=80)
    parser.add_argument("--max-chars", type=int, default=700)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--whole", nargs="*", default=list(WHOLE),
                        help="tag prefixes of sources taken whole (default: the hand-written)")
    args = parser.parse_args(argv)
    pool = pool_sample(read_pool_records(args.data), args.per_cell, args.max_chars, args.seed,
                       args.whole)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in pool), encoding="utf-8")
    print(json.dumps({"out": str(args.out), "records": len(pool)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

