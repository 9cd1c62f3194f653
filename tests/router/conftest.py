"""Tiny random model pairs for the router tests (no download)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from guardrail.testing.tiny_models import build_tiny_model


def _diverse(path: Path, seed: int, std: float = 0.5) -> Path:
    """Re-draw the matrices with a wide spread: the default tiny init makes every random model
    predict the same token everywhere, which leaves nothing to route."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 2:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two tiny Llama models with the same tokenizer and different random weights."""
    root = tmp_path_factory.mktemp("router-pair")
    small = _diverse(build_tiny_model(root / "small", arch="llama", seed=1, num_layers=2), 1)
    large = _diverse(build_tiny_model(root / "large", arch="llama", seed=2, num_layers=3), 2)
    return small, large
