"""The ONNX Runtime backend matches the torch backend on a tiny Llama (to 1e-4)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from guardrail import ObserverError
from guardrail.monitor import Needs
from guardrail.observer.hf import load_model_dir

pytest.importorskip("onnxruntime")

TOL = 1e-4
TEXT = ("The capital of France is Paris. Marie Curie was born in Warsaw in 1867 and won two "
        "Nobel prizes. Café 🙂 déjà vu. ") * 2
MESSAGES = [{"role": "user", "content": "Tell me some facts."}]


@pytest.fixture(scope="module")
def model_copy(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A private copy so the export lands in a fresh directory.
    return Path(shutil.copytree(tiny_llama, tmp_path_factory.mktemp("onnx") / "llama"))


@pytest.mark.parametrize("needs", [
    # the whole model: its export takes seconds, so make test only
    pytest.param(Needs(layers=frozenset({0, 2, -1}), logits=True, top_k=3),
                 marks=pytest.mark.slow),
    Needs(layers=frozenset({1})),  # only the first two blocks run
], ids=["all-layers-and-logits", "shallow"])
def test_onnx_matches_torch_chunk_by_chunk_through_window_drops(model_copy: Path,
                                                                needs: Needs) -> None:
    torch_obs = load_model_dir(model_copy, name="t", window=48, options={"matmul": "float32"})
    onnx_obs = load_model_dir(model_copy, name="t", window=48, backend="onnx")
    tokens = torch_obs.tokenizer.tokenize(TEXT)
    a, b = torch_obs.start(MESSAGES, needs), onnx_obs.start(MESSAGES, needs)
    for i in range(0, len(tokens), 5):
        x = torch_obs.extend(a, tokens[i:i + 5], needs)
        y = onnx_obs.extend(b, tokens[i:i + 5], needs)
        assert set(y.hidden) == set(needs.layers)
        for layer in needs.layers:
            torch.testing.assert_close(y.hidden[layer], x.hidden[layer], atol=TOL, rtol=TOL)
        if needs.logits:
            torch.testing.assert_close(y.logits, x.logits, atol=TOL, rtol=TOL)
            torch.testing.assert_close(y.top_logits, x.top_logits, atol=TOL, rtol=TOL)
        else:
            assert y.logits is None and y.top_logits is None
        assert b.kv.length() == a.kv.length() <= 48
    assert b.dropped > 0
    torch_obs.truncate(a, 7)
    onnx_obs.truncate(b, 7)
    x = torch_obs.extend(a, tokens[:4], needs)
    y = onnx_obs.extend(b, tokens[:4], needs)
    for layer in needs.layers:
        torch.testing.assert_close(y.hidden[layer], x.hidden[layer], atol=TOL, rtol=TOL)
    assert list((model_copy / "onnx").glob("step-*.onnx"))  # cached next to the model


def test_onnx_backend_refuses_non_llama_models(tiny_gpt2: Path) -> None:
    with pytest.raises(ObserverError, match="Llama-family.*'torch'"):
        load_model_dir(tiny_gpt2, name="g", window=64, backend="onnx")


def test_int8_option_runs_close_to_torch_and_bad_value_names_the_option(model_copy: Path) -> None:
    needs = Needs(layers=frozenset({1}))
    torch_obs = load_model_dir(model_copy, name="t", window=256)
    int8 = load_model_dir(model_copy, name="t", window=256, backend="onnx",
                          options={"quantize": "int8"})
    tokens = torch_obs.tokenizer.tokenize(TEXT)[:12]
    x = torch_obs.extend(torch_obs.start(MESSAGES, needs), tokens, needs).hidden[1]
    y = int8.extend(int8.start(MESSAGES, needs), tokens, needs).hidden[1]
    # Quantized, so not to 1e-4; but the same states, not noise.
    assert torch.nn.functional.cosine_similarity(x, y, dim=-1).min() > 0.9
    assert list((model_copy / "onnx").glob("step-*-int8.onnx"))
    with pytest.raises(ObserverError, match="quantize"):
        load_model_dir(model_copy, name="t", window=256, backend="onnx",
                       options={"quantize": "int4"})
