"""The shipped replay sets: small, labelled, and held out from the default build's training data."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from guardrail_harmful_content.training.data.replays import (
    REPLAY_SIZE,
    default_replay_dir,
    write_replays,
)

from guardrail.toolkit.records import read_records

Reader = Callable[[Path, str], list[dict[str, Any]]]


def test_shipped_replays_are_twenty_labelled_long_responses() -> None:
    folder = default_replay_dir()
    harmful = list(read_records(folder / "harmful.jsonl"))
    benign = list(read_records(folder / "benign.jsonl"))
    assert len(harmful) == len(benign) == REPLAY_SIZE
    assert all(r.label == 1 and r.spans and len(r.response) >= 400 for r in harmful)
    assert all(r.label == 0 and not r.spans and len(r.response) >= 500 for r in benign)
    assert (folder / "README.md").read_text().count("MIT") >= 1


def test_shipped_replays_are_reproducible(full_build: Path, tmp_path: Path) -> None:
    write_replays(tmp_path)
    for name in ("harmful.jsonl", "benign.jsonl"):
        assert (tmp_path / name).read_bytes() == (default_replay_dir() / name).read_bytes()


def test_replays_come_from_the_test_split(full_build: Path, read_split: Reader) -> None:
    train_val = {r["group"] for name in ("train", "val") for r in read_split(full_build, name)}
    for name in ("harmful.jsonl", "benign.jsonl"):
        for line in (default_replay_dir() / name).read_text().splitlines():
            assert json.loads(line)["group"] not in train_val
