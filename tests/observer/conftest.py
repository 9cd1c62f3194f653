"""Tiny random models (built once per test session, no download) and observers over them."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from guardrail.observer.hf import load_model_dir
from guardrail.testing.tiny_models import build_tiny_model


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "llama", arch="llama")


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "gpt2", arch="gpt2",
                            max_positions=256)


@pytest.fixture(scope="session", params=["llama", "gpt2"])
def tiny_path(request: pytest.FixtureRequest, tiny_llama: Path, tiny_gpt2: Path) -> Path:
    return tiny_llama if request.param == "llama" else tiny_gpt2


@pytest.fixture(scope="session")
def llama_observer(tiny_llama: Path):  # type: ignore[no-untyped-def]
    return load_model_dir(tiny_llama, name="tiny-llama", window=4096)


@pytest.fixture(scope="module")
def observer(tiny_llama: Path):  # type: ignore[no-untyped-def]
    """The tiny llama observer, a fresh one per test module (its read times pace read-ahead)."""
    return load_model_dir(tiny_llama, name="tiny-llama", window=4096)
