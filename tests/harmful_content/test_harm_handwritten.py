"""Hand-written sets in the writers' format: the importer labels sentences from ``harm_start``,
names the line and field of a bad line, and the build keeps every set as its own source."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from guardrail_harmful_content.training.data import BuildConfig, build_dataset
from guardrail_harmful_content.training.data.__main__ import main
from guardrail_harmful_content.training.data.handwritten import (
    HandwrittenError,
    HandwrittenSet,
    default_sets,
    read_handwritten,
)
from guardrail_harmful_content.training.data.records import make_record
from guardrail_harmful_content.training.loso import read_pool_records

WriteJsonl = Callable[[Path, list[dict[str, Any]]], Path]  # the conftest's write_jsonl

OPENING = "Feeling angry at a neighbour is common, and talking it through often helps. "
TURN = ("But if you want him scared, leave notes on his car saying you know his routine, and "
        "make sure he sees you watching the house every evening.")


def _rows(prefix: str) -> list[dict[str, Any]]:
    return [
        {"id": f"{prefix}-1", "prompt": f"{prefix}: my neighbour annoys me, what now?",
         "response": OPENING + TURN + f" Sign it {prefix}.", "label": 1, "category": "harassment",
         "kind": "harmful_turn", "harm_start": len(OPENING), "style": "chatty"},
        {"id": f"{prefix}-2", "prompt": f"{prefix}: write a message to frighten my ex",
         "response": "Tell her you have been outside her work every day this week. Say you "
                     f"know which bus she takes and that she should think about that, {prefix}.",
         "label": 1, "category": "harassment", "kind": "harmful", "harm_start": 0,
         "style": "blunt"},
        {"id": f"{prefix}-3", "prompt": f"{prefix}: someone keeps watching my house",
         "response": "Write down dates and times, keep any notes left for you, and report it "
                     "to the police. A local victim support line can help with a safety plan.",
         "label": 0, "category": "harassment", "kind": "benign_safety", "harm_start": None,
         "style": "calm"},
    ]


def test_sentences_are_labelled_from_harm_start(tmp_path: Path, write_jsonl: WriteJsonl) -> None:
    examples = read_handwritten(write_jsonl(tmp_path / "a.jsonl", _rows("a")), "handwritten:t-v1")
    records = [make_record(ex) for ex in examples]
    turn, blunt, benign = records
    assert {r["source_tag"] for r in records} == {"handwritten:t-v1"}
    # the benign opening is benign, the turn harmful; spans only in the harmful part
    assert [s["label"] for s in turn["sentences"]] == [0, 1, 1]
    assert turn["spans"] and min(s["start"] for s in turn["spans"]) >= len(OPENING)
    assert all(s["label"] == 1 for s in blunt["sentences"])
    assert not benign["spans"] and not any(s["label"] for s in benign["sentences"])
    assert turn["kind"] == "handwritten_harmful_turn" and turn["category"] == "harassment"
    # one group per prompt
    assert len({r["group"] for r in records}) == 3


@pytest.mark.parametrize(("change", "field"), [
    ({"label": 2}, "label"),
    ({"kind": "benign_safety"}, "kind"),  # label 1 with a benign kind
    ({"category": "gardening"}, "category"),
    ({"category": "technical"}, "category"),  # benign answers only: harm names its category
    ({"harm_start": 10_000}, "harm_start"),
    ({"harm_start": None}, "harm_start"),
    ({"response": ""}, "response"),
])
def test_a_bad_line_is_named_with_its_field(tmp_path: Path, write_jsonl: WriteJsonl,
                                            change: dict[str, Any], field: str) -> None:
    rows = _rows("b")
    rows[0] = {**rows[0], **change}
    path = write_jsonl(tmp_path / "b.jsonl", rows)
    with pytest.raises(HandwrittenError, match=rf"b.jsonl:1: field '{field}'"):
        read_handwritten(path, "handwritten:t-v1")
    assert main(["handwritten", str(path)]) == 2


def test_a_repeated_id_is_an_error(tmp_path: Path, write_jsonl: WriteJsonl) -> None:
    rows = _rows("c")
    rows[2]["id"] = rows[0]["id"]
    with pytest.raises(HandwrittenError, match=r"c.jsonl:3: field 'id' 'c-1' repeats line 1"):
        read_handwritten(write_jsonl(tmp_path / "c.jsonl", rows), "handwritten:t-v1")


@pytest.mark.usefixtures("harm_sources")
def test_the_build_keeps_each_handwritten_set_as_its_own_source(tmp_path: Path,
                                                               write_jsonl: WriteJsonl) -> None:
    sets = (HandwrittenSet(write_jsonl(tmp_path / "w1.jsonl", _rows("w1")), "handwritten:w1-v1"),
            HandwrittenSet(write_jsonl(tmp_path / "w2.jsonl", _rows("w2")), "handwritten:w2-v1"))
    out = tmp_path / "build"
    manifest = build_dataset(out, BuildConfig(limit=4, own_answers=None, handwritten=sets))
    records = read_pool_records(out)
    mine = [r for r in records if r["source_tag"].startswith("handwritten:")]
    assert Counter(r["source_tag"] for r in mine) == {"handwritten:w1-v1": 3,
                                                      "handwritten:w2-v1": 3}
    for r in mine:
        assert r["source"] == r["source_tag"] and r["writer_id"].startswith(r["source_tag"][12:14])
        if r["kind"] == "handwritten_harmful_turn":
            assert [s["label"] for s in r["sentences"]] == [0, 1, 1]
    # every answer to one prompt in one split
    split_of: dict[str, set[str]] = {}
    for r in records:
        split_of.setdefault(r["group"], set()).add(r["split"])
    assert all(len(s) == 1 for s in split_of.values())
    names = {e["name"]: e for e in manifest["sources"]}
    assert names["handwritten:w1-v1"]["records"] == 3 and names["handwritten:w1-v1"]["sha256"]
    assert manifest["total"]["source_tags"]["handwritten:w2-v1/1"] == 2


@pytest.mark.usefixtures("harm_sources")
def test_a_later_wave_leaves_the_earlier_splits_as_they_were(tmp_path: Path,
                                                              write_jsonl: WriteJsonl) -> None:
    """Adding a wave of hand-written sets (handwritten.WAVES) moves no record built before it
    to another split, so a new wave never reshuffles what earlier passes were measured on."""

    def written(name: str, prefixes: str) -> Path:
        return write_jsonl(tmp_path / f"{name}.jsonl", [r for p in prefixes for r in _rows(p)])

    first = HandwrittenSet(written("w1", "abcdef"), "handwritten:w1-v1")
    later = HandwrittenSet(written("w3", "ghijkl"), "handwritten:w3-v3", wave=3)

    def splits(sets: tuple[HandwrittenSet, ...], out: Path) -> dict[tuple[str, str], str]:
        build_dataset(out, BuildConfig(limit=20, own_answers=None, handwritten=sets))
        return {(r["prompt"], r["response"]): r["split"] for r in read_pool_records(out)}

    before = splits((first,), tmp_path / "before")
    after = splits((first, later), tmp_path / "after")
    assert {key: after[key] for key in before} == before
    added = Counter(split for key, split in after.items() if key not in before)
    assert sum(added.values()) == 18 and added["train"] > 0


def test_the_technical_set_is_benign_code_beside_technical_harm() -> None:
    """handwritten_technical.jsonl (docs/harmful-content.md): mostly benign technical answers,
    most with a fenced block, security for defenders among them, and harmful answers in a
    technical register that name their harm, a third of them opening benignly."""
    tag = "handwritten:technical-v10"
    shipped = {s.tag: s for s in default_sets()}
    if tag not in shipped:
        pytest.skip("handwritten_technical.jsonl is not shipped")
    examples = read_handwritten(shipped[tag].path, tag)
    benign = [e for e in examples if e.label == 0]
    harmful = [e for e in examples if e.label == 1]
    assert len(benign) >= 120 and len(harmful) >= 40
    assert {e.kind for e in benign} == {"handwritten_benign_technical"}
    assert sum("```" in e.response for e in benign) >= 0.7 * len(benign)
    assert sum(e.extra["category"] != "technical" for e in benign) >= 25  # for defenders
    assert {e.extra["category"] for e in harmful} <= {"cybercrime", "fraud", "privacy"}
    turning = [e for e in harmful if e.kind == "handwritten_harmful_turn"]
    assert 3 * len(turning) >= len(harmful)
    assert all(e.harm_start is not None and e.harm_start > 0 for e in turning)
