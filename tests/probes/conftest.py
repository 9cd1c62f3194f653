"""Fixtures: labelled JSON Lines data with a planted signal the fake observer exposes."""

from __future__ import annotations

from pathlib import Path

import pytest

from guardrail.toolkit.fake import PLANTED_WORDS, PlantedObserver, planted_records, write_jsonl


@pytest.fixture
def planted_data(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "planted.jsonl", planted_records(120))


@pytest.fixture
def observer() -> PlantedObserver:
    return PlantedObserver(hidden_size=16, num_layers=4, signal_words=PLANTED_WORDS,
                           signal_layer=2, strength=4.0, prefix_strength=4.0)
