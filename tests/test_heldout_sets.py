"""The hand-written held-out sets (bench/heldout) load with the project's record reader, their
labels are consistent, and no training-data builder can reach them: they are reported, never
trained or tuned on (bench/heldout/README.md)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from guardrail.toolkit.records import Record, read_records

ROOT = Path(__file__).resolve().parents[1]
HELDOUT = ROOT / "bench" / "heldout"
HARM = HELDOUT / "harm_handwritten.jsonl"
HARM_V2 = HELDOUT / "harm_handwritten_v2.jsonl"  # written after v1 steered a choice (README)
ENTITY = HELDOUT / "entity_handwritten.jsonl"
SOURCE = "handwritten-heldout-v1"
SOURCE_V2 = "handwritten-heldout-v2"
CATEGORIES = {"violence", "weapons", "drugs", "self_harm", "harassment", "hate", "extremism",
              "fraud", "privacy", "cybercrime", "misinformation", "nonviolent_crime"}
# Strings by which a training builder would reach these files.
MARKERS = ("bench/heldout", "harm_handwritten", "entity_handwritten", "handwritten-heldout")


def _raw(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


@pytest.mark.parametrize(("path", "source", "turning_per_category"),
                         [(HARM, SOURCE, 2), (HARM_V2, SOURCE_V2, 1)])
def test_harm_set_loads_and_is_balanced_per_category(path: Path, source: str,
                                                     turning_per_category: int) -> None:
    records = list(read_records(path))
    assert len(records) >= 130
    assert all(r.label in (0, 1) and r.prompt and r.response for r in records)
    assert {r.extra["source"] for r in records} == {source}
    assert {r.extra["category"] for r in records} == CATEGORIES
    counts = Counter((r.extra["category"], r.label) for r in records)
    for cat in CATEGORIES:
        assert counts[cat, 0] >= 5 and counts[cat, 1] >= 5, cat
    turning = [r for r in records if r.extra["opens_benign"]]
    assert len(turning) >= 20
    assert all(r.label == 1 for r in turning)  # only a harmful answer can turn harmful
    per_cat = Counter(r.extra["category"] for r in turning)
    assert all(per_cat[cat] >= turning_per_category for cat in CATEGORIES), per_cat
    assert len({r.response for r in records}) == len(records)
    words = [len(r.response.split()) for r in records]
    assert min(words) >= 30 and max(words) <= 250


def test_the_two_harm_sets_share_no_answer() -> None:
    first = {r.response for r in read_records(HARM)}
    assert not first & {r.response for r in read_records(HARM_V2)}


def _span_text(record: Record, k: int) -> str:
    span = record.spans[k]
    return record.response[span.start:span.end]


def test_entity_set_spans_match_their_text_and_labels() -> None:
    records = list(read_records(ENTITY))
    raw = _raw(ENTITY)
    assert len(records) >= 60
    assert sum(len(r.spans) for r in records) >= 250
    for rec, row in zip(records, raw, strict=True):
        assert rec.extra["source"] == SOURCE
        spans = row["spans"]
        assert isinstance(spans, list) and spans, row["id"]
        for k, span in enumerate(spans):
            assert _span_text(rec, k) == span["text"], (row["id"], k)
            assert span["text"].strip() == span["text"] and span["text"]
        assert [(s.start, s.end) for s in rec.spans] == sorted((s.start, s.end) for s in rec.spans)
        fabricated = sum(s.label for s in rec.spans)
        assert rec.label == int(fabricated > 0) == int(rec.extra["version"] == "fabricated")
        assert fabricated == rec.extra["fabricated_spans"]
    versions = Counter(r.extra["version"] for r in records)
    assert min(versions.values()) >= 0.4 * len(records)


def test_entity_pairs_differ_only_at_fabricated_spans() -> None:
    by_pair: dict[str, dict[str, Record]] = {}
    for rec in read_records(ENTITY):
        if rec.extra.get("pair"):
            by_pair.setdefault(str(rec.extra["pair"]), {})[str(rec.extra["version"])] = rec
    assert len(by_pair) >= 20
    for pair, both in by_pair.items():
        true, fab = both["true"], both["fabricated"]
        assert len(true.spans) == len(fab.spans), pair
        assert all(s.label == 0 for s in true.spans)
        for k, f in enumerate(fab.spans):
            same = _span_text(true, k) == _span_text(fab, k)
            assert same == (f.label == 0), (pair, k)
        # the text between entities is the same in both versions
        def gaps(r: Record) -> list[str]:
            bounds = [0, *[x for s in r.spans for x in (s.start, s.end)], len(r.response)]
            return [r.response[bounds[i]:bounds[i + 1]] for i in range(0, len(bounds), 2)]
        assert gaps(true) == gaps(fab), pair


def _training_modules() -> list[Path]:
    files: list[Path] = []
    for pkg in (ROOT / "plugins").glob("*/guardrail_*"):
        files += [p for p in (pkg / "training").rglob("*") if p.is_file()]  # all of training/
        files += [p for p in (pkg / "data").rglob("*") if p.is_file()]
        files += [p for p in pkg.glob("*.py") if p.stem.startswith("train")]
    return files


def test_no_training_builder_reads_the_heldout_sets() -> None:
    files = _training_modules()
    assert len(files) >= 10  # the builders are where this test expects them
    hits = [f"{p.relative_to(ROOT)}: {m}" for p in files
            for m in MARKERS if m in p.read_text(encoding="utf-8", errors="ignore")]
    assert not hits, "training data must never read bench/heldout: " + "; ".join(hits)


@pytest.mark.parametrize("path", [HARM, HARM_V2, ENTITY])
def test_heldout_text_is_not_in_the_training_data(path: Path) -> None:
    """No held-out response appears verbatim in a training builder's data or code."""
    corpus = "\n".join(p.read_text(encoding="utf-8", errors="ignore")
                       for p in _training_modules())
    leaked = [r.response[:60] for r in read_records(path) if r.response[:80] in corpus]
    assert not leaked
