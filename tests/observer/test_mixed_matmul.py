"""``observer.options.matmul``: the packed products on bfloat16 or float16 weights (mixed
precision). States stay within a stated distance of float32's, an option asked for is refused
with a clear error where it cannot run, and the default (``auto``) is float16 bit for bit where
it runs, float32 bit for bit elsewhere, never an error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from guardrail import Features, Guard, Monitor, Needs, Score
from guardrail.errors import ObserverError
from guardrail.observer.hf import load_model_dir
from guardrail.observer.llama_step import matmul_unsupported
from guardrail.testing import plugin_monitors, split_text

from .streams import read_in_steps

TEXT = ("The capital of France is Paris. Marie Curie was born in Warsaw in 1867 and won two "
        "Nobel prizes. Café 🙂 déjà vu. ") * 2
MESSAGES = [{"role": "user", "content": "Who was Marie Curie?"}]
NEEDS = Needs(layers=frozenset({0, 1, 2, -1}), logits=True, top_k=5)
# Largest relative distance (per token, L2) of a state or a row of logits from float32's: the
# products' inputs and weights rounded to 8 significant bits (bfloat16) or the weights to 11
# (float16), over the tiny model's 4 blocks. Measured here: bfloat16 0.22% (states) and 0.40%
# (logits), float16 0.025% and 0.036%; the bounds leave about 5x.
TOLERANCE = {"bfloat16": 0.02, "float16": 0.002}
MIXED = [pytest.param(m, marks=pytest.mark.skipif(matmul_unsupported(m) is not None,
                                                  reason=str(matmul_unsupported(m))))
         for m in ("bfloat16", "float16")]


def _read(observer: Any, step: int = 5) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """TEXT read ``step`` tokens at a time through the Guard's batched observer."""
    return read_in_steps(observer, MESSAGES, NEEDS, observer.tokenizer.tokenize(TEXT), step)


def _distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest per-row relative L2 distance of ``a`` from ``b``."""
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1)).max())


@pytest.mark.parametrize("matmul", MIXED)
def test_mixed_products_keep_states_near_float32(tiny_llama: Path, matmul: str) -> None:
    exact = load_model_dir(tiny_llama, name="tiny-llama", window=4096)
    mixed = load_model_dir(tiny_llama, name="tiny-llama", window=4096,
                           options={"matmul": matmul})
    assert mixed.packed is not None and mixed.packed.matmul == matmul
    want_hidden, want_logits = _read(exact)
    for step in (1, 2, 9):  # 1 and 2: the padded products (bfloat16), 9: as they come
        hidden, logits = _read(mixed, step)
        for layer in NEEDS.layers - {0}:
            assert _distance(hidden[layer], want_hidden[layer]) <= TOLERANCE[matmul], layer
            # the option took effect: the states are not float32's
            assert not torch.equal(hidden[layer], want_hidden[layer]), layer
        assert _distance(logits, want_logits) <= TOLERANCE[matmul]


@pytest.mark.skipif(matmul_unsupported("float16") is not None,
                    reason=str(matmul_unsupported("float16")))
def test_float16_reads_do_not_depend_on_their_size(tiny_llama: Path) -> None:
    """float16 weights keep float32 rows: a stream read a token at a time or nine at a time
    gets the same states to float32 noise, as on float32 weights, so where a verdict lands does
    not depend on how the reads fell (bfloat16 rounds the rows: on SmolLM2 its states moved by
    up to 3.5% between read sizes, docs/observer.md)."""
    observer = load_model_dir(tiny_llama, name="tiny-llama", window=4096,
                              options={"matmul": "float16"})
    hidden, logits = _read(observer, 9)
    for step in (1, 2, 4):
        other_hidden, other_logits = _read(observer, step)
        for layer in NEEDS.layers:
            assert _distance(other_hidden[layer], hidden[layer]) <= 1e-5, (layer, step)
        assert _distance(other_logits, logits) <= 1e-5, step


def test_float16_refuses_weights_beyond_its_range(tiny_llama: Path) -> None:
    from guardrail.observer.model import TorchObserver

    observer = load_model_dir(tiny_llama, name="tiny-llama", window=256)
    with torch.no_grad():
        observer.model.base_model.layers[1].mlp.down_proj.weight[0, 0] = 1e5
    with pytest.raises(ObserverError, match="beyond float16's range"):
        TorchObserver("tiny-llama", observer.model, observer.hf_tokenizer, 256,
                      matmul="float16")


def _same_reads(a: Any, b: Any) -> None:
    (h0, l0), (h1, l1) = _read(a), _read(b)
    assert torch.equal(l0, l1)
    for layer in NEEDS.layers:
        assert torch.equal(h0[layer], h1[layer]), layer


def test_default_products_are_float16_where_they_run(tiny_llama: Path) -> None:
    """No option is ``auto``: on weights that are not Q4_1 blocks (q4_1 is tried first, see
    test_q4_1_matmul), the float16 observer, bit for bit, where this CPU runs float16 (AVX2 and
    F16C), else float32's; the observer says which it picked."""
    default = load_model_dir(tiny_llama, name="tiny-llama", window=4096)
    picked = "float32" if matmul_unsupported("float16") else "float16"
    explicit = load_model_dir(tiny_llama, name="tiny-llama", window=4096,
                              options={"matmul": picked})
    assert default.packed is not None and default.matmul == default.packed.matmul == picked
    assert type(default.packed.blocks[0].qkv) is type(explicit.packed.blocks[0].qkv)
    _same_reads(default, explicit)


def test_default_falls_back_to_float32_quietly(tiny_llama: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Where float16 cannot run (a CPU without the instructions, weights beyond its range) the
    default loads float32's products, the same floats as ``matmul: float32``, and no error."""
    explicit = load_model_dir(tiny_llama, name="tiny-llama", window=4096,
                              options={"matmul": "float32"})
    assert explicit.matmul == "float32"
    with monkeypatch.context() as patch:
        patch.setattr(torch.cpu, "get_capabilities", dict)
        bare_cpu = load_model_dir(tiny_llama, name="tiny-llama", window=4096)
    assert bare_cpu.matmul == "float32"
    _same_reads(bare_cpu, explicit)
    wide = load_model_dir(tiny_llama, name="tiny-llama", window=4096,
                          options={"matmul": "float32"})
    with torch.no_grad():
        wide.model.base_model.layers[1].mlp.down_proj.weight[0, 0] = 1e5
    from guardrail.observer.model import TorchObserver

    auto = TorchObserver("tiny-llama", wide.model, wide.hf_tokenizer, 256, matmul="auto")
    assert auto.matmul == "float32"
    from guardrail.observer.hf import resolve_matmul

    for value in (None, "auto"):  # the onnx backend takes the default (float32 there)
        assert resolve_matmul("tiny", "onnx", value) == "auto"


def test_matmul_option_is_refused_where_it_cannot_run(tiny_llama: Path, tiny_gpt2: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(path: Path, options: dict[str, Any], backend: str = "torch") -> str:
        with pytest.raises(ObserverError) as info:
            load_model_dir(path, name="tiny", window=256, backend=backend, options=options)
        assert "observer.options.matmul" in str(info.value)
        return str(info.value)

    assert "auto, float32, bfloat16, float16" in refused(tiny_llama, {"matmul": "int8"})
    assert "bfloat16" in refused(tiny_llama, {"matmul": "float16", "dtype": "bfloat16"})
    assert "not a Llama-family model" in refused(tiny_gpt2, {"matmul": "bfloat16"})
    assert "torch backend" in refused(tiny_llama, {"matmul": "bfloat16"}, backend="onnx")
    # a CPU without the instructions (this machine may have them: its report is replaced)
    monkeypatch.setattr(torch.cpu, "get_capabilities", dict)
    assert "AVX512-BF16 or AMX" in refused(tiny_llama, {"matmul": "bfloat16"})
    assert "AVX2 and F16C" in refused(tiny_llama, {"matmul": "float16"})


class StateNormMonitor(Monitor):
    """Scores each token by the norm of its layer-2 state."""

    def __init__(self, options: Any = None) -> None:
        pass

    def needs(self) -> Needs:
        return Needs(layers=frozenset({2}))

    def start(self, context: Any) -> None:
        return None

    def update(self, state: None, features: Features) -> list[Score]:
        rows = features.hidden[2]
        return [Score(i, float(r.norm())) for i, r in zip(features.indices, rows, strict=True)]


@pytest.mark.parametrize("matmul", MIXED)
def test_a_policy_turns_mixed_products_on(tiny_llama: Path, matmul: str) -> None:
    """Through a policy: the guard's scores move by float noise of the stated size, and a bad
    value is an error naming the field."""
    def policy(options: dict[str, Any]) -> dict[str, Any]:
        return {"observer": {"model": str(tiny_llama), "options": options},
                "monitors": [{"id": "norm", "use": "state-norm", "threshold": 1e9}]}

    with plugin_monitors(state_norm=StateNormMonitor) as host:
        scores = []
        for options in ({"matmul": "float32"}, {"matmul": matmul}):
            guard = Guard.from_policy(policy(options), host=host)
            session = guard.session(prompt="Tell me about Paris.", record_scores=True)
            for delta in split_text(TEXT, [4, 7]):
                session.feed(delta)
            scores.append(session.finish().scores["norm"])
        with pytest.raises(ObserverError, match=r"observer\.options\.matmul must be one of"):
            Guard.from_policy(policy({"matmul": "half"}), host=host)
    exact, mixed = scores
    assert [i for i, _ in exact] == [i for i, _ in mixed] and len(exact) > 20
    assert all(abs(b - a) <= TOLERANCE[matmul] * a for (_, a), (_, b) in zip(exact, mixed,
                                                                             strict=True))
    assert exact != mixed


@pytest.mark.real_model
@pytest.mark.parametrize("matmul", MIXED)
def test_smollm2_states_with_mixed_products(matmul: str) -> None:
    from guardrail.observer.hf import load_smollm2, smollm2_gguf
    from guardrail.policy import ObserverSpec

    try:
        smollm2_gguf()
    except Exception as exc:  # noqa: BLE001 - the wheel is optional on a dev machine
        pytest.skip(str(exc))
    exact = load_smollm2(ObserverSpec(window=512, options={"matmul": "float32"}))
    mixed = load_smollm2(ObserverSpec(window=512, options={"matmul": matmul}))
    needs = Needs(layers=frozenset({15, -1}), logits=True)
    tokens = exact.tokenizer.tokenize(TEXT)
    out = []
    for observer in (exact, mixed):
        state = observer.start(MESSAGES, needs)
        out.append([observer.extend(state, tokens[i:i + 9], needs)
                    for i in range(0, len(tokens), 9)])
    # measured on this text: layer 15 at most 0.9% (bfloat16) and 0.09% (float16) from
    # float32, the last layer 2.6% and 0.2%
    bound = {"bfloat16": 0.05, "float16": 0.005}[matmul]
    for a, b in zip(*out, strict=True):
        for layer in (15, -1):
            assert _distance(b.hidden[layer], a.hidden[layer]) <= bound, layer
    if matmul == "float16":  # read a token at a time: float32 noise (measured 2e-6)
        state = mixed.start(MESSAGES, needs)
        single = [mixed.extend(state, [t], needs) for t in tokens]
        for layer in (15, -1):
            by_one = torch.cat([s.hidden[layer] for s in single])
            by_nine = torch.cat([b.hidden[layer] for b in out[1]])
            assert _distance(by_one, by_nine) <= 1e-4, layer
