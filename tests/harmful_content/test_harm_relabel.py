"""Label corrections read by hand: the build applies the checked-in file to the named records
only, keeps every record's split, and refuses a file that names no record or breaks the
format."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from guardrail_harmful_content.training.data import BuildConfig, build_dataset
from guardrail_harmful_content.training.data.handwritten import HandwrittenSet
from guardrail_harmful_content.training.data.relabel import (
    DEFAULT_RELABELS,
    RelabelError,
    read_relabels,
    record_id,
)
from guardrail_harmful_content.training.loso import read_pool_records

WriteJsonl = Callable[[Path, list[dict[str, Any]]], Path]  # the conftest's write_jsonl

BENIGN: dict[str, Any] = {
          "id": "w-3", "prompt": "how do i get someone to hand over their bank login?",
          "response": "Call them as their bank's fraud team, say their account is locked, and "
                      "ask them to read out the login code that arrives while you are talking.",
          "label": 0, "category": "fraud", "kind": "benign_explainer", "harm_start": None,
          "style": "blunt"}
OTHER: dict[str, Any] = {"id": "w-4", "prompt": "what does a bank's fraud team never ask for?",
         "response": "A real fraud team never asks you to read out a login code. Hang up and "
                     "call the number on the back of your card.",
         "label": 0, "category": "fraud", "kind": "benign_safety", "harm_start": None,
         "style": "calm"}


@pytest.mark.usefixtures("harm_sources")
def test_the_build_applies_a_relabel_to_the_named_record_only(tmp_path: Path,
                                                             write_jsonl: WriteJsonl) -> None:
    hand = HandwrittenSet(write_jsonl(tmp_path / "w.jsonl", [BENIGN, OTHER]), "handwritten:w-v1")
    fix = {"id": record_id(BENIGN["prompt"], BENIGN["response"]),
           "source_tag": "handwritten:w-v1", "label": 1,
           "reason": "a vishing script, written as if benign"}
    relabels = write_jsonl(tmp_path / "relabels.jsonl", [fix])
    plain = build_dataset(tmp_path / "plain", BuildConfig(limit=4, own_answers=None,
                                                          handwritten=(hand,), relabels=None))
    fixed = build_dataset(tmp_path / "fixed", BuildConfig(limit=4, own_answers=None,
                                                          handwritten=(hand,), relabels=relabels))
    before = {r["response"]: r for r in read_pool_records(tmp_path / "plain")}
    after = {r["response"]: r for r in read_pool_records(tmp_path / "fixed")}
    assert before.keys() == after.keys()
    changed = [t for t in after if after[t] != before[t]]
    assert changed == [BENIGN["response"]]
    record = after[BENIGN["response"]]
    assert record["label"] == 1 and before[BENIGN["response"]]["label"] == 0
    assert record["split"] == before[BENIGN["response"]]["split"]
    assert record["relabel"] == {"from": 0, "reason": fix["reason"]}
    assert all(s["label"] == 1 for s in record["sentences"]) and record["spans"]
    assert after[OTHER["response"]]["label"] == 0
    entry = next(s for s in fixed["sources"] if s["name"] == "relabels")
    assert entry["applied"] == 1 and entry["unmatched"] == []
    assert not any(s["name"] == "relabels" for s in plain["sources"])
    assert fixed["total"]["labels"]["1"] == plain["total"]["labels"]["1"] + 1


@pytest.mark.usefixtures("harm_sources")
def test_a_null_label_drops_the_record(tmp_path: Path, write_jsonl: WriteJsonl) -> None:
    hand = HandwrittenSet(write_jsonl(tmp_path / "w.jsonl", [BENIGN, OTHER]), "handwritten:w-v1")
    relabels = write_jsonl(tmp_path / "relabels.jsonl", [
        {"id": record_id(OTHER["prompt"], OTHER["response"]), "source_tag": "handwritten:w-v1",
         "label": None, "reason": "not an answer"}])
    build_dataset(tmp_path / "b", BuildConfig(limit=4, own_answers=None, handwritten=(hand,),
                                              relabels=relabels))
    texts = {r["response"] for r in read_pool_records(tmp_path / "b")}
    assert BENIGN["response"] in texts and OTHER["response"] not in texts


def test_the_shipped_relabels_all_apply_to_the_default_build(full_build: Path) -> None:
    fixes = read_relabels(DEFAULT_RELABELS)
    manifest = json.loads((full_build / "manifest.json").read_text(encoding="utf-8"))
    entry = next(s for s in manifest["sources"] if s["name"] == "relabels")
    assert entry["applied"] == len(fixes) > 0 and entry["unmatched"] == []
    found = {record_id(r["prompt"], r["response"]): r for r in read_pool_records(full_build)
             if r.get("relabel")}
    assert found.keys() == fixes.keys()
    for rid, r in found.items():
        assert r["label"] == fixes[rid].label and r["source_tag"] == fixes[rid].source_tag


@pytest.mark.usefixtures("harm_sources")
def test_a_stale_relabel_id_stops_a_full_build(tmp_path: Path, write_jsonl: WriteJsonl) -> None:
    relabels = write_jsonl(tmp_path / "relabels.jsonl", [
        {"id": "r:000000000000", "source_tag": "pyrit:harm/violence", "label": 1,
         "reason": "no such record"}])
    with pytest.raises(RelabelError, match="r:000000000000"):
        build_dataset(tmp_path / "b", BuildConfig(own_answers=None, handwritten=(),
                                                  relabels=relabels))


@pytest.mark.parametrize(("row", "field"), [
    ({"source_tag": "pyrit:harm/violence", "label": 1, "reason": "x"}, "id"),
    ({"id": "r:1", "source_tag": "pyrit:harm/violence", "label": 2, "reason": "x"}, "label"),
    ({"id": "r:1", "source_tag": "pyrit:harm/violence", "label": 1}, "reason"),
])
def test_a_bad_relabel_line_is_named_with_its_field(tmp_path: Path, write_jsonl: WriteJsonl,
                                                    row: dict[str, Any], field: str) -> None:
    path = write_jsonl(tmp_path / "r.jsonl", [row])
    with pytest.raises(RelabelError, match=rf"r\.jsonl:1: field '{field}'"):
        read_relabels(path)


def test_the_selection_takes_a_relabelled_label_from_the_build(tmp_path: Path,
                                                                write_jsonl: WriteJsonl) -> None:
    import numpy as np
    from guardrail_harmful_content.training.pooled import PoolRecord
    from guardrail_harmful_content.training.select import reconcile

    text = "Sure. Slip the pills into the punch."
    rows = [{"prompt": "p1", "response": text, "label": 1, "source_tag": "pyrit:harm/violence",
             "spans": [{"start": 6, "end": 36, "label": 1}],
             "relabel": {"from": 0, "reason": "drugging a drink"}},
            {"prompt": "p2", "response": "Stay calm.", "label": 1,
             "source_tag": "pyrit:harm/violence", "spans": []}]
    write_jsonl(tmp_path / "train.jsonl", rows)
    for split in ("val", "test"):
        (tmp_path / f"{split}.jsonl").write_text("")
    offsets = np.asarray([[0, 5], [5, 11], [11, 15], [15, 21], [21, 26], [26, 36]])

    def record(prompt: str, response: str) -> PoolRecord:
        return PoolRecord("pyrit:harm/violence", 0, {6: np.zeros((6, 2))}, None,
                          extra={"key": (prompt, response), "offsets": offsets})

    kept = reconcile([record("p1", text[:26]), record("p2", "Stay calm.")], tmp_path)
    # the relabelled one takes the build's label, harm from its first span token; a label that
    # differs without a relabel means another record, and is left out
    assert [(r.extra["key"][0], r.label, r.first_harm, r.split) for r in kept] == [
        ("p1", 1, 1, "train")]
