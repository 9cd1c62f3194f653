"""Tiny random model pairs for the router tests (no download)."""

from __future__ import annotations

from pathlib import Path

import pytest

from guardrail.testing.tiny_models import build_tiny_model


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two tiny Llama models with the same tokenizer and different random weights."""
    root = tmp_path_factory.mktemp("router-pair")
    small = build_tiny_model(root / "small", arch="llama", seed=1, num_layers=2, spread=0.5)
    large = build_tiny_model(root / "large", arch="llama", seed=2, num_layers=3, spread=0.5)
    return small, large
