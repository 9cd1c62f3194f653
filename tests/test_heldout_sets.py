"""The hand-written held-out sets (bench/heldout) load with the project's record reader, their
labels are consistent, and no training-data builder can reach them: they are reported, never
trained or tuned on (bench/heldout/README.md)."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from guardrail.toolkit.records import Record, read_records

ROOT = Path(__file__).resolve().parents[1]
HELDOUT = ROOT / "bench" / "heldout"
HARM = HELDOUT / "harm_handwritten.jsonl"
HARM_V2 = HELDOUT / "harm_handwritten_v2.jsonl"  # written after v1 steered a choice (README)
HARM_V3 = HELDOUT / "harm_handwritten_v3.jsonl"  # a third of it multi-turn (README)
HARM_V4 = HELDOUT / "harm_handwritten_v4.jsonl"  # written after v3 was read (README)
HARM_V5 = HELDOUT / "harm_handwritten_v5.jsonl"  # written after v4 was read (README)
HARM_V6 = HELDOUT / "harm_handwritten_v6.jsonl"  # written after v5 was read (README)
HARM_V7 = HELDOUT / "harm_handwritten_v7.jsonl"  # written after the twelfth pass (README)
HARM_V8 = HELDOUT / "harm_handwritten_v8.jsonl"  # written before the fourteenth pass (README)
# benign technical answers (code, configs, logs, security for defenders) and harmful ones in a
# technical register (README)
HARM_TECH = HELDOUT / "harm_technical_v1.jsonl"
HARM_V9 = HELDOUT / "harm_handwritten_v9.jsonl"  # written before the sixteenth pass (README)
ENTITY = HELDOUT / "entity_handwritten.jsonl"
ENTITY_V2 = HELDOUT / "entity_handwritten_v2.jsonl"  # written after v1 was read (README)
ENTITY_V3 = HELDOUT / "entity_handwritten_v3.jsonl"  # written after v2 was read (README)
SOURCE = "handwritten-heldout-v1"
SOURCE_V2 = "handwritten-heldout-v2"
SOURCE_V3 = "handwritten-heldout-v3"
SOURCE_V4 = "handwritten-heldout-v4"
SOURCE_V5 = "handwritten-heldout-v5"
SOURCE_V6 = "handwritten-heldout-v6"
SOURCE_V7 = "handwritten-heldout-v7"
SOURCE_V8 = "handwritten-heldout-v8"
SOURCE_TECH = "handwritten-heldout-technical-v1"
SOURCE_V9 = "handwritten-heldout-v9"
SOURCE_ENTITY_V2 = "handwritten-heldout-entity-v2"
SOURCE_ENTITY_V3 = "handwritten-heldout-entity-v3"
ENTITY_TOPICS = {"bio", "place", "event", "science", "organisation"}
ENTITY_V3_TOPICS = ENTITY_TOPICS | {"work"}  # v3 adds books, films, albums, paintings
ENTITY_V3_REGISTERS = {"prose", "chatty", "qa", "list", "timeline", "comparison"}
SPAN_KINDS = {"person", "place", "organisation", "date", "number", "work", "other"}  # v3
CATEGORIES = {"violence", "weapons", "drugs", "self_harm", "harassment", "hate", "extremism",
              "fraud", "privacy", "cybercrime", "misinformation", "nonviolent_crime"}
REGISTERS = {"plain", "rough", "list", "message", "fiction", "refusal", "explainer", "support",
             "dialogue", "article"}  # v3's to v9's `register` values
# v5 adds turns_benign: a harmful exchange, then a benign last answer (README)
TURN_KINDS = {"continues_harmful", "turns_harmful", "benign_followup", "turns_benign"}
BENIGN_KINDS = {"benign_followup", "turns_benign"}
HARM_SETS = (HARM, HARM_V2, HARM_V3, HARM_V4, HARM_V5, HARM_V6, HARM_V7, HARM_V8, HARM_V9)
ENTITY_SETS = (ENTITY, ENTITY_V2, ENTITY_V3)
# Strings by which a training builder would reach these files.
MARKERS = ("bench/heldout", "harm_handwritten", "entity_handwritten", "handwritten-heldout",
           "harm_technical")


def _raw(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


@pytest.mark.parametrize(("path", "source", "turning_per_category", "word_range"),
                         [(HARM, SOURCE, 2, (30, 250)), (HARM_V2, SOURCE_V2, 1, (30, 250)),
                          (HARM_V3, SOURCE_V3, 2, (30, 250)), (HARM_V4, SOURCE_V4, 2, (30, 250)),
                          (HARM_V5, SOURCE_V5, 2, (30, 250)),
                          (HARM_V6, SOURCE_V6, 2, (20, 300)),  # v6 was briefed for 20-300 words
                          (HARM_V7, SOURCE_V7, 2, (20, 300)),
                          (HARM_V8, SOURCE_V8, 2, (25, 180)),  # v8 was briefed for 25-180
                          (HARM_V9, SOURCE_V9, 2, (25, 210))])
def test_harm_set_loads_and_is_balanced_per_category(path: Path, source: str,
                                                     turning_per_category: int,
                                                     word_range: tuple[int, int]) -> None:
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
    assert min(words) >= word_range[0] and max(words) <= word_range[1]


def test_the_harm_sets_share_no_answer() -> None:
    sets = [{r.response for r in read_records(p)} for p in (*HARM_SETS, HARM_TECH)]
    for i, a in enumerate(sets):
        for b in sets[i + 1:]:
            assert not a & b


@pytest.mark.parametrize(("path", "prefix"), [(HARM_V3, "v3"), (HARM_V4, "v4"), (HARM_V5, "v5"),
                                             (HARM_V6, "v6"), (HARM_V7, "v7"), (HARM_V8, "v8"),
                                             (HARM_V9, "v9")])
def test_multi_turn_records_are_consistent(path: Path, prefix: str) -> None:
    """v3's to v9's extra fields: the conversation before a multi-turn answer ends with the user
    turn that is the record's prompt, and ``harm_start`` marks where a harmful answer turns."""
    rows = _raw(path)
    assert [r["id"] for r in rows] == [f"{prefix}-{n:03d}" for n in range(1, len(rows) + 1)]
    for row in rows:
        rid, response = row["id"], str(row["response"])
        assert row["register"] in REGISTERS, rid
        messages = row.get("messages")
        if row["multi_turn"]:
            assert isinstance(messages, list) and len(messages) >= 3, rid
            roles = [m["role"] for m in messages]
            assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"], rid
            assert all(isinstance(m["content"], str) and m["content"] for m in messages), rid
            assert messages[-1]["content"] == row["prompt"], rid
            assert row["turn_kind"] in TURN_KINDS, rid
            assert (row["turn_kind"] in BENIGN_KINDS) == (row["label"] == 0), rid
        else:
            assert row["multi_turn"] is False and messages is None, rid
        start = row["harm_start"]
        if row["label"] == 1:
            assert isinstance(start, int) and 0 <= start < len(response), rid
            assert row["opens_benign"] == (start > 0), rid
        else:
            assert start is None and row["opens_benign"] is False, rid
    multi = [r for r in rows if r["multi_turn"]]
    assert 0.3 <= len(multi) / len(rows) <= 0.4
    kinds = Counter(r["turn_kind"] for r in multi)
    for kind in ("continues_harmful", "turns_harmful", "benign_followup"):
        assert kinds[kind] >= 10, kinds  # each kind is a slice worth reporting
    rough_benign = [r for r in rows if r["register"] == "rough" and r["label"] == 0]
    assert len(rough_benign) >= 12  # the everyday rough register the monitor over-halts


def _readme_table(heading: str, names: set[str],
                  table: int | None = None) -> dict[str, list[int]]:
    """The rows named in ``names`` of the tables under a README heading: name -> its numbers,
    left to right; only the ``table``-th table of the section when given (v3's topic and
    span-kind tables share row names such as place and work)."""
    text = (HELDOUT / "README.md").read_text(encoding="utf-8")
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    if table is not None:
        section = [b for b in section.split("\n\n") if b.lstrip().startswith("|")][table]
    rows = re.findall(r"^\| (\w+) \|((?: \d+ \|)+)$", section, flags=re.M)
    return {name: [int(x) for x in nums.split("|") if x.strip()] for name, nums in rows
            if name in names}


@pytest.mark.parametrize(("path", "heading"),
                         [(HARM_V3, "## harm_handwritten_v3.jsonl"),
                          (HARM_V4, "## harm_handwritten_v4.jsonl"),
                          (HARM_V5, "## harm_handwritten_v5.jsonl"),
                          (HARM_V6, "## harm_handwritten_v6.jsonl"),
                          (HARM_V7, "## harm_handwritten_v7.jsonl"),
                          (HARM_V8, "## harm_handwritten_v8.jsonl"),
                          (HARM_V9, "## harm_handwritten_v9.jsonl")])
def test_category_counts_match_the_readme_table(path: Path, heading: str) -> None:
    rows = _raw(path)
    table = _readme_table(heading, CATEGORIES)
    assert set(table) == CATEGORIES
    for cat, (harmful, benign, turning, multi) in table.items():
        mine = [r for r in rows if r["category"] == cat]
        assert harmful == sum(r["label"] == 1 for r in mine), cat
        assert benign == sum(r["label"] == 0 for r in mine), cat
        assert turning == sum(bool(r["opens_benign"]) for r in mine), cat
        assert multi == sum(bool(r["multi_turn"]) for r in mine), cat


@pytest.mark.parametrize(("path", "heading"),
                         [(HARM_V4, "## harm_handwritten_v4.jsonl"),
                          (HARM_V5, "## harm_handwritten_v5.jsonl"),
                          (HARM_V6, "## harm_handwritten_v6.jsonl"),
                          (HARM_V7, "## harm_handwritten_v7.jsonl"),
                          (HARM_V8, "## harm_handwritten_v8.jsonl"),
                          (HARM_V9, "## harm_handwritten_v9.jsonl")])
def test_register_and_turn_kind_counts_match_the_readme_tables(path: Path, heading: str) -> None:
    rows = _raw(path)
    registers = _readme_table(heading, REGISTERS)
    assert set(registers) == {r["register"] for r in rows}
    for name, (harmful, benign) in registers.items():
        mine = [r for r in rows if r["register"] == name]
        assert [harmful, benign] == [sum(r["label"] == lab for r in mine) for lab in (1, 0)], name
    kinds = _readme_table(heading, TURN_KINDS)
    assert set(kinds) == {r["turn_kind"] for r in rows if r["multi_turn"]}
    for name, (harmful, benign) in kinds.items():
        mine = [r for r in rows if r.get("turn_kind") == name]
        assert [harmful, benign] == [sum(r["label"] == lab for r in mine) for lab in (1, 0)], name


def test_v4_weights_the_slices_v3_found_hard() -> None:
    """v4 was written for the benign answers the monitor over-halted on v3 (README): benign
    answers after a short follow-up, explainers and the rough register; and its conversations
    are new text, not earlier sets' answers or turns."""
    rows = _raw(HARM_V4)
    followups = [r for r in rows if r.get("turn_kind") == "benign_followup"]
    assert len(followups) >= 30
    short = [r for r in followups if len(str(r["prompt"]).split()) <= 8]
    assert len(short) >= 0.7 * len(followups)  # "what else?", "go on", "and after that?"
    benign = Counter(r["register"] for r in rows if r["label"] == 0)
    assert benign["explainer"] >= 15 and benign["rough"] >= 15, benign
    older: set[str] = set()
    for path in (HARM, HARM_V2, HARM_V3):
        older |= {r.response for r in read_records(path)}
        older |= {str(m["content"]) for row in _raw(path) for m in row.get("messages") or []}
    turns = [str(m["content"]) for row in rows for m in row.get("messages") or []
             if len(str(m["content"])) >= 40]
    assert not [t[:60] for t in turns if t in older]


def _words_by_label(rows: list[dict[str, Any]]) -> dict[int, list[int]]:
    return {lab: sorted(len(str(r["response"]).split()) for r in rows if r["label"] == lab)
            for lab in (0, 1)}


def _assert_similar_medians(words: dict[int, list[int]]) -> None:
    medians = [w[len(w) // 2] for w in words.values()]
    assert max(medians) - min(medians) <= 15, medians  # length says little about the label


def _turn_depths(rows: list[dict[str, Any]]) -> list[float]:
    """Where harm starts in each answer that opens benignly, as a share of its characters."""
    return [r["harm_start"] / len(str(r["response"])) for r in rows if r["opens_benign"]]


def _assert_new_conversations(rows: list[dict[str, Any]], earlier: Sequence[Path]) -> None:
    """No earlier turn of 40 characters or more repeats an answer or turn of an earlier set."""
    older: set[str] = set()
    for path in earlier:
        older |= {r.response for r in read_records(path)}
        older |= {str(m["content"]) for row in _raw(path) for m in row.get("messages") or []}
    turns = [str(m["content"]) for row in rows for m in row.get("messages") or []
             if len(str(m["content"])) >= 40]
    assert not [t[:60] for t in turns if t in older]


def test_v5_register_does_not_give_the_label_away() -> None:
    """v5 was written so a register says little about the label (README): drafted messages and
    lists on both sides, answers that turn harmful late, benign answers after a harmful
    exchange (turns_benign), similar lengths; its conversations are new text."""
    rows = _raw(HARM_V5)
    registers = Counter((r["register"], r["label"]) for r in rows)
    for name in ("message", "list", "rough", "explainer", "plain", "article", "dialogue",
                 "fiction", "support"):
        assert registers[name, 0] >= 2 and registers[name, 1] >= 2, (name, registers)
    for name in ("message", "list"):
        assert abs(registers[name, 0] - registers[name, 1]) <= 2, (name, registers)
    depth = _turn_depths(rows)
    assert sum(d >= 0.5 for d in depth) >= 10 and sum(d < 0.3 for d in depth) >= 3, depth
    assert sum(r.get("turn_kind") == "turns_benign" for r in rows) >= 5
    _assert_similar_medians(_words_by_label(rows))
    _assert_new_conversations(rows, (HARM, HARM_V2, HARM_V3, HARM_V4))


def _assert_broad_brief(rows: list[dict[str, Any]], earlier: Sequence[Path],
                        long: int = 200) -> None:
    """What v6 to v8 were briefed for (README): short and long answers on both sides (long
    meaning over ``long`` words) with similar medians, harm that starts early and late, benign
    answers after a harmful exchange, and conversations that are new text."""
    words = _words_by_label(rows)
    for lab, w in words.items():
        assert sum(n < 50 for n in w) >= 5 and sum(n > long for n in w) >= 5, (lab, w)
    _assert_similar_medians(words)
    depth = _turn_depths(rows)
    assert sum(d < 0.3 for d in depth) >= 5 and sum(d >= 0.5 for d in depth) >= 10, depth
    assert sum(r.get("turn_kind") == "turns_benign" for r in rows) >= 5
    _assert_new_conversations(rows, earlier)


def test_v6_spreads_length_and_turning_depth() -> None:
    """v6 was briefed for breadth (README): answers from 20 to 300 words with short and long ones
    on both sides and similar medians, harm that starts early and late, benign answers after a
    harmful exchange, every register on the benign side; its conversations are new text."""
    rows = _raw(HARM_V6)
    benign_registers = {r["register"] for r in rows if r["label"] == 0}
    assert benign_registers == REGISTERS, benign_registers
    _assert_broad_brief(rows, (HARM, HARM_V2, HARM_V3, HARM_V4, HARM_V5))


@pytest.mark.parametrize(("path", "long"), [(HARM_V7, 200),
                                            (HARM_V8, 150)])  # v8 was briefed for 25-180 words
def test_every_register_has_both_labels(path: Path, long: int) -> None:
    """v7 and v8 were briefed for breadth on both sides (README): every register, fiction and
    refusals included, has harmful and benign answers; lengths spread from short to long with
    similar medians, harm starts early and late, a third of it is multi-turn with turns_benign
    among them; and its conversations are new text, not an earlier set's."""
    rows = _raw(path)
    for lab in (0, 1):
        assert {r["register"] for r in rows if r["label"] == lab} == REGISTERS, lab
    assert sum(r["register"] == "fiction" and r["label"] == 1 for r in rows) >= 5  # wrappers
    _assert_broad_brief(rows, HARM_SETS[:HARM_SETS.index(path)], long)


TECH_CATEGORIES = {"technical", "cybercrime", "fraud", "privacy"}
TECH_FORMATS = {"code", "config", "shell", "trace", "explainer", "docs", "table", "diagram",
                "message"}
TECH_TURN_KINDS = {"continues_harmful", "turns_harmful", "benign_followup"}


def test_the_technical_set_is_mostly_benign_code_with_harm_in_the_same_register() -> None:
    """harm_technical_v1 (README): benign technical answers in the formats a coding assistant
    writes (most with a fenced block), security for defenders among them, and harmful answers in a
    technical register, some opening benignly; harm_start and the conversations are consistent,
    and the README's category table matches the file."""
    records = list(read_records(HARM_TECH))
    rows = _raw(HARM_TECH)
    assert [r["id"] for r in rows] == [f"tech1-{n:03d}" for n in range(1, len(rows) + 1)]
    assert {r.extra["source"] for r in records} == {SOURCE_TECH}
    benign = [r for r in rows if r["label"] == 0]
    harmful = [r for r in rows if r["label"] == 1]
    assert len(rows) >= 80 and len(benign) >= 60 and len(harmful) >= 20
    assert len({r["response"] for r in rows}) == len(rows)
    assert sum("```" in r["response"] for r in benign) >= 0.7 * len(benign)
    assert sum(r["category"] != "technical" for r in benign) >= 15  # security for defenders
    assert {r["category"] for r in harmful} <= TECH_CATEGORIES - {"technical"}
    for row in rows:
        rid, response, start = row["id"], str(row["response"]), row["harm_start"]
        assert row["category"] in TECH_CATEGORIES and row["format"] in TECH_FORMATS, rid
        assert row["topic"].strip() and 30 <= len(response.split()) <= 250, rid
        if row["label"] == 1:
            assert isinstance(start, int) and 0 <= start < len(response), rid
            assert row["opens_benign"] == (start > 0), rid
        else:
            assert start is None and row["opens_benign"] is False, rid
        if row["multi_turn"]:
            messages = row["messages"]
            roles = [m["role"] for m in messages]
            assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"], rid
            assert messages[-1]["content"] == row["prompt"], rid
            assert row["turn_kind"] in TECH_TURN_KINDS, rid
            assert (row["turn_kind"] == "benign_followup") == (row["label"] == 0), rid
        else:
            assert row["multi_turn"] is False and "messages" not in row, rid
    assert sum(r["opens_benign"] for r in harmful) >= 5
    table = _readme_table("## harm_technical_v1.jsonl", TECH_CATEGORIES)
    assert set(table) == TECH_CATEGORIES
    for cat, (harm, ok, turning, multi) in table.items():
        mine = [r for r in rows if r["category"] == cat]
        assert harm == sum(r["label"] == 1 for r in mine), cat
        assert ok == sum(r["label"] == 0 for r in mine), cat
        assert turning == sum(bool(r["opens_benign"]) for r in mine), cat
        assert multi == sum(bool(r["multi_turn"]) for r in mine), cat


def test_v9_has_both_labels_in_every_register() -> None:
    """v9 (README): every register has answers of both labels, lengths spread from short to
    long on both sides with similar medians, harm starts early and late, a third of it is
    multi-turn with turns_benign among them, and its conversations are new text."""
    rows = _raw(HARM_V9)
    for lab in (0, 1):
        assert {r["register"] for r in rows if r["label"] == lab} == REGISTERS, lab
    assert len(rows) >= 120 and sum(r["label"] for r in rows) * 2 == len(rows)
    _assert_broad_brief(rows, HARM_SETS[:HARM_SETS.index(HARM_V9)], 150)


def _span_text(record: Record, k: int) -> str:
    span = record.spans[k]
    return record.response[span.start:span.end]


@pytest.mark.parametrize(("path", "source"), [(ENTITY, SOURCE), (ENTITY_V2, SOURCE_ENTITY_V2),
                                              (ENTITY_V3, SOURCE_ENTITY_V3)])
def test_entity_set_spans_match_their_text_and_labels(path: Path, source: str) -> None:
    records = list(read_records(path))
    raw = _raw(path)
    assert len(records) >= 60
    assert sum(len(r.spans) for r in records) >= 250
    for rec, row in zip(records, raw, strict=True):
        assert rec.extra["source"] == source
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


@pytest.mark.parametrize("path", ENTITY_SETS)
def test_entity_pairs_differ_only_at_fabricated_spans(path: Path) -> None:
    by_pair: dict[str, dict[str, Record]] = {}
    for rec in read_records(path):
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


def _assert_pairs_and_singles(rows: list[dict[str, Any]]) -> None:
    """24 pairs (one text true, one fabricated, on the same prompt and topic) and 12 single texts
    of each version, as the entity sets v2 and v3 were written."""
    pairs = Counter(r["pair"] for r in rows if r["pair"])
    assert len(pairs) == 24 and set(pairs.values()) == {2}
    for pair in pairs:
        both = [r for r in rows if r["pair"] == pair]
        assert {r["version"] for r in both} == {"true", "fabricated"}, pair
        assert both[0]["prompt"] == both[1]["prompt"] and both[0]["topic"] == both[1]["topic"]
    singles = Counter(r["version"] for r in rows if not r["pair"])
    assert singles == {"true": 12, "fabricated": 12}


def test_entity_v2_is_new_text_with_the_readme_counts() -> None:
    """v2's extra fields (README): ids in order, each fabricated span names the true value it
    replaced, a pair shares its prompt, 1-3 swaps a text, lengths in range, no v1 text reused;
    and the README's topic table matches the file."""
    rows = _raw(ENTITY_V2)
    assert [r["id"] for r in rows] == [f"ev2-{n:03d}" for n in range(1, len(rows) + 1)]
    for row in rows:
        rid = row["id"]
        assert row["topic"] in ENTITY_TOPICS and row["register"] in ("prose", "chatty"), rid
        assert row["prompt"].strip() and 40 <= len(row["response"].split()) <= 130, rid
        for span in row["spans"]:
            if span["label"] == 1:  # a swap: plausible, so never the true value itself
                assert span["true_value"].strip() and span["true_value"] != span["text"], rid
            else:
                assert "true_value" not in span, rid
        if row["version"] == "fabricated":
            assert 1 <= row["fabricated_spans"] <= 3, rid
    _assert_pairs_and_singles(rows)
    assert sum(r["register"] == "chatty" for r in rows) >= 8  # the assistant-answer register
    table = _readme_table("## entity_handwritten_v2.jsonl", ENTITY_TOPICS)
    assert set(table) == ENTITY_TOPICS
    for topic, (true, fabricated, paired, chatty) in table.items():
        mine = [r for r in rows if r["topic"] == topic]
        assert true == sum(r["version"] == "true" for r in mine), topic
        assert fabricated == sum(r["version"] == "fabricated" for r in mine), topic
        assert paired == sum(bool(r["pair"]) for r in mine), topic
        assert chatty == sum(r["register"] == "chatty" for r in mine), topic
    older = {r.response for r in read_records(ENTITY)}
    assert not [r["id"] for r in rows if r["response"] in older]


def test_entity_v3_is_new_text_with_the_readme_counts() -> None:
    """v3's extra fields (README): ids in order, a kind on every span, spans that do not overlap,
    each fabricated span a swap naming the true value or an invented name, a pair shares its
    prompt, 1-3 fabricated spans a text, 40-150 words, no v1 or v2 text reused; and the README's
    topic, register and span-kind tables match the file."""
    rows = _raw(ENTITY_V3)
    assert [r["id"] for r in rows] == [f"ev3-{n:03d}" for n in range(1, len(rows) + 1)]
    for row in rows:
        rid = row["id"]
        assert row["topic"] in ENTITY_V3_TOPICS and row["register"] in ENTITY_V3_REGISTERS, rid
        assert row["prompt"].strip() and 40 <= len(row["response"].split()) <= 150, rid
        spans = row["spans"]
        assert all(a["end"] <= b["start"] for a, b in pairwise(spans)), rid
        for span in spans:
            assert span["kind"] in SPAN_KINDS, rid
            if span["label"] == 0:
                assert "fabrication" not in span and "true_value" not in span, rid
            elif span["fabrication"] == "swap":  # plausible, so never the true value itself
                assert span["true_value"].strip() and span["true_value"] != span["text"], rid
            else:  # a name that does not exist; true_value is what it stands in for, if anything
                assert span["fabrication"] == "invented", rid
                assert span["true_value"] is None or span["true_value"] != span["text"], rid
        if row["version"] == "fabricated":
            assert 1 <= row["fabricated_spans"] <= 3, rid
    _assert_pairs_and_singles(rows)
    heading = "## entity_handwritten_v3.jsonl"
    topics = _readme_table(heading, ENTITY_V3_TOPICS, table=0)
    assert set(topics) == ENTITY_V3_TOPICS
    for topic, (true, fabricated, paired, fab_spans) in topics.items():
        mine = [r for r in rows if r["topic"] == topic]
        assert true == sum(r["version"] == "true" for r in mine), topic
        assert fabricated == sum(r["version"] == "fabricated" for r in mine), topic
        assert paired == sum(bool(r["pair"]) for r in mine), topic
        assert fab_spans == sum(r["fabricated_spans"] for r in mine), topic
    registers = _readme_table(heading, ENTITY_V3_REGISTERS, table=1)
    assert set(registers) == {r["register"] for r in rows}
    for name, (true, fabricated) in registers.items():
        mine = [r for r in rows if r["register"] == name]
        assert [true, fabricated] == [sum(r["version"] == v for r in mine)
                                      for v in ("true", "fabricated")], name
    kinds = _readme_table(heading, SPAN_KINDS, table=2)
    assert set(kinds) == SPAN_KINDS
    spans = [s for r in rows for s in r["spans"]]
    for kind, (true, fabricated, invented) in kinds.items():
        mine = [s for s in spans if s["kind"] == kind]
        assert true == sum(s["label"] == 0 for s in mine), kind
        assert fabricated == sum(s["label"] == 1 for s in mine), kind
        assert invented == sum(s.get("fabrication") == "invented" for s in mine), kind
    older = {r.response for p in (ENTITY, ENTITY_V2) for r in read_records(p)}
    assert not [r["id"] for r in rows if r["response"] in older]


def test_the_markers_name_every_heldout_file_and_source() -> None:
    """The training-data check below looks for MARKERS: every held-out file's name and source
    tag must contain one, or a new set could be read by a builder unnoticed."""
    files = sorted(HELDOUT.glob("*.jsonl"))
    assert set(files) == {*HARM_SETS, HARM_TECH, *ENTITY_SETS}
    for path in files:
        assert any(m in path.name for m in MARKERS), path  # a builder naming the file
        for source in {str(row["source"]) for row in _raw(path)}:
            assert any(m in source for m in MARKERS), (path, source)


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


@pytest.mark.parametrize("path", [*HARM_SETS, HARM_TECH, *ENTITY_SETS])
def test_heldout_text_is_not_in_the_training_data(path: Path) -> None:
    """No held-out response, nor an earlier turn of a held-out conversation, appears verbatim in
    a training builder's data or code."""
    corpus = "\n".join(p.read_text(encoding="utf-8", errors="ignore")
                       for p in _training_modules())
    texts = [r.response for r in read_records(path)]
    texts += [str(m["content"]) for row in _raw(path) for m in row.get("messages") or []
              if len(str(m["content"])) >= 40]  # short follow-ups ("thanks!") are everywhere
    leaked = [t[:60] for t in texts if t[:80] in corpus]
    assert not leaked
