"""Paired descriptions differ only at the swapped entities; shipped replays are what they claim."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from guardrail.toolkit.records import read_records

Records = list[dict[str, Any]]
REPLAYS = (Path(__file__).resolve().parents[2] / "plugins" / "entity-hallucination"
           / "guardrail_entity_hallucination" / "replays")


def _outside_spans(r: dict[str, Any]) -> list[str]:
    pieces, last = [], 0
    for s in r["spans"]:
        pieces.append(r["response"][last:s["start"]])
        last = s["end"]
    return [*pieces, r["response"][last:]]


def test_each_pair_is_one_text_in_a_true_and_a_fabricated_version(
        full_records: dict[str, Records], full_build: Path) -> None:
    pairs: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in full_records["paired"]:
        pairs[r["pair"]][r["version"]] = r
    assert len(pairs) >= 40
    manifest = json.loads((full_build / "manifest.json").read_text(encoding="utf-8"))
    test_topics = set(manifest["holdout"]["test_topics"])
    for versions in pairs.values():
        true, fake = versions["true"], versions["fabricated"]
        assert true["topic"] in test_topics
        assert [s["label"] for s in true["spans"]] == [0] * len(true["spans"])
        assert any(s["label"] for s in fake["spans"])
        # Same prompt, same wording between entities, same supported entities.
        assert true["prompt"] == fake["prompt"]
        assert _outside_spans(true) == _outside_spans(fake)
        assert len(true["spans"]) == len(fake["spans"])
        for a, b in zip(true["spans"], fake["spans"], strict=True):
            ta, tb = true["response"][a["start"]:a["end"]], fake["response"][b["start"]:b["end"]]
            assert (ta == tb) == (b["label"] == 0), (ta, tb, b)


def test_replays_are_valid_and_labelled_as_their_file_says() -> None:
    fabricated = list(read_records(REPLAYS / "fabricated.jsonl"))
    faithful = list(read_records(REPLAYS / "faithful.jsonl"))
    assert len(fabricated) == len(faithful) == 20
    assert all(r.label == 1 and any(s.label for s in r.spans) for r in fabricated)
    assert all(r.label == 0 and not any(s.label for s in r.spans) for r in faithful)
    assert len({r.response for r in fabricated + faithful}) == 40


def test_replays_come_from_the_current_builds_test_split(full_records: dict[str, Records]) -> None:
    test = {json.dumps(r, sort_keys=True) for r in full_records["test"]}
    for name in ("fabricated", "faithful"):
        for line in (REPLAYS / f"{name}.jsonl").read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            assert record.pop("monitors") == ["entity-hallucination"]  # whose labels, for eval
            assert json.dumps(record, sort_keys=True) in test, (name, line[:120])
