"""``observer.options.matmul: q4_1``: products on the GGUF Q4_1 blocks a model's float32
weights were converted from (``guardrail.observer.blockq``). The blocks are recovered bit for
bit or refused, the kernel gives float32's products, an observer on it float32's states, and
the option is an error naming the field where it cannot run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from guardrail import Needs
from guardrail.errors import ObserverError
from guardrail.observer import blockq
from guardrail.observer.hf import load_model_dir
from guardrail.observer.llama_step import AUTO_MATMUL, matmul_unsupported
from guardrail.observer.model import TorchObserver

from .streams import read_in_steps

UNAVAILABLE = blockq.kernel_unavailable()
needs_kernel = pytest.mark.skipif(UNAVAILABLE is not None,
                                  reason=f"the q4_1 kernel cannot run here: {UNAVAILABLE}")

TEXT = ("The capital of France is Paris. Marie Curie was born in Warsaw in 1867 and won two "
        "Nobel prizes. Café 🙂 déjà vu. ") * 2
MESSAGES = [{"role": "user", "content": "Who was Marie Curie?"}]
NEEDS = Needs(layers=frozenset({0, 1, 2, -1}), logits=True, top_k=5)


def q4_1(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` quantized to Q4_1 blocks of 32 and dequantized, as GGUF's quantizer and
    dequantizer do: d = (max - min) / 15 and m = min as float16, q = round((w - min) / d)."""
    w = weight.detach().reshape(weight.shape[0], -1, 32).float()
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    d = ((hi - lo) / 15).half().float()
    m = lo.half().float()
    q = torch.round((w - lo) / torch.where(d > 0, d, 1)).clamp(0, 15)
    return (q * d + m).reshape(weight.shape)


def q8_0(weight: torch.Tensor) -> torch.Tensor:
    w = weight.detach().reshape(weight.shape[0], -1, 32).float()
    d = (w.abs().amax(-1, keepdim=True) / 127).half().float()
    q = torch.round(w / torch.where(d > 0, d, 1)).clamp(-127, 127)
    return (q * d).reshape(weight.shape)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@needs_kernel
@pytest.mark.parametrize("k", [32, 64, 96, 576, 1536])
def test_kernel_gives_float32_products(k: int) -> None:
    torch.manual_seed(k)
    n = 37  # odd: the output rows' chunks end mid-chunk
    w4 = q4_1(torch.randn(n, k) * 0.1 - 0.02)
    w8 = q8_0(torch.randn(n, k) * 0.05)
    for w, kind in ((w4, blockq.Q4_1Weight), (w8, blockq.Q8_0Weight)):
        product = kind.of(w)
        for rows in (*range(1, 21), 64, 70):  # 1-4 rows one way, 5-63 another, a panel from 64
            x = torch.randn(rows, k)
            want = torch.nn.functional.linear(x.double(), w.double()).float()
            assert _relative(product(x), want) <= 2e-6, (kind.__name__, rows)
        assert product(torch.empty(0, k)).shape == (0, n)
        x = torch.randn(2, 3, k)  # leading dimensions kept, a strided input copied
        assert product(x).shape == (2, 3, n)
        assert _relative(product(x.transpose(0, 1)), torch.nn.functional.linear(
            x.transpose(0, 1), w)) <= 2e-6


@needs_kernel
@pytest.mark.parametrize("k", [96, 1536])
def test_a_rows_products_do_not_depend_on_the_rows_beside_it(k: int) -> None:
    """``guardrail_q4_1_fixed`` (before int8 blocks) gives a row the same floats alone, among
    a few rows, or in a panel of 70; the plain product does from 5 rows."""
    torch.manual_seed(k)
    w = q4_1(torch.randn(38, k) * 0.1)  # 38: the last four output rows are two
    qs, d, m = blockq.q4_1_blocks(w)
    fixed = blockq.Q4_1Weight((qs, d, m), k, fn_name="guardrail_q4_1_fixed")
    plain = blockq.Q4_1Weight.of(w)
    x = torch.randn(70, k)
    whole = fixed(x)
    assert torch.equal(plain(x), whole)
    for size in (1, 2, 3, 4, 5, 9, 20, 63):
        for start in range(0, 70 - size, 17):
            assert torch.equal(fixed(x[start:start + size]), whole[start:start + size]), size
            if size >= 5:
                assert torch.equal(plain(x[start:start + size]), whole[start:start + size])


@needs_kernel
def test_blocks_rebuild_every_weight_bit_for_bit() -> None:
    torch.manual_seed(0)
    w = q4_1(torch.randn(9, 96))
    qs, d, m = blockq.q4_1_blocks(w)
    nb = 96 // 32
    low, high = (qs & 15).long(), (qs >> 4).long()
    # the kernel's order: byte j < 8 holds weights j and j + 8, byte 8 + j 16 + j and 24 + j
    q = torch.cat((low[..., :8], high[..., :8], low[..., 8:], high[..., 8:]), dim=-1)
    rebuilt = q.float() * d[:, :nb, None] + m[:, :nb, None].float()
    assert torch.equal(rebuilt.reshape(9, 96), w)
    w8 = q8_0(torch.randn(9, 96))
    q8, d8 = blockq.q8_0_blocks(w8)
    assert torch.equal((q8.float() * d8[:, :nb, None]).reshape(9, 96), w8)


@needs_kernel
def test_weights_that_are_not_exact_blocks_are_refused() -> None:
    torch.manual_seed(1)
    with pytest.raises(blockq.BlockqError, match="not exact Q4_1 blocks"):
        blockq.q4_1_blocks(torch.randn(8, 64))
    w = q4_1(torch.randn(8, 64))
    w[3, 40] = torch.nextafter(w[3, 40], torch.tensor(1.0))  # one weight one ulp off
    with pytest.raises(blockq.BlockqError, match=r"\(1 of 16 blocks"):
        blockq.q4_1_blocks(w)
    with pytest.raises(blockq.BlockqError, match="not exact Q8_0 blocks"):
        blockq.q8_0_blocks(q4_1(torch.randn(8, 64)) + 0.001)
    with pytest.raises(blockq.BlockqError, match="blocks of 32"):
        blockq.q4_1_blocks(q4_1(torch.randn(8, 64))[:, :48])
    with pytest.raises(blockq.BlockqError, match="blocks of 32"):
        blockq.q4_1_blocks(q4_1(torch.randn(8, 64)).half())


def _with(observer: Any, matmul: str) -> Any:
    return TorchObserver(observer.name, observer.model, observer.hf_tokenizer, observer.window,
                         matmul=matmul)


def _quantized(tiny_llama: Path, head: bool = True) -> Any:
    """The tiny Llama observer with its projections (and the tied embedding/head, as Q8_0)
    replaced by their GGUF round trip, as SmolLM2's are."""
    observer = load_model_dir(tiny_llama, name="tiny-llama", window=4096,
                              options={"matmul": "float32"})
    model = observer.model
    with torch.no_grad():
        for layer in model.base_model.layers:
            a, m = layer.self_attn, layer.mlp
            for p in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj,
                      m.down_proj):
                p.weight.copy_(q4_1(p.weight))
        if head:
            out = model.get_output_embeddings().weight
            out.copy_(q8_0(out))
    return _with(observer, "float32")  # packed anew: the loaded observer packed the old weights


def _distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1)).max())


@needs_kernel
@pytest.mark.parametrize("head", [True, False])
def test_q4_1_observer_reads_float32_states(tiny_llama: Path, head: bool) -> None:
    """On Q4_1-exact weights the option's states and logits are float32's to float32 noise
    whatever the read sizes (the head on Q8_0 blocks, or in float32 where it is not them)."""
    exact = _quantized(tiny_llama, head)
    fast = _with(exact, "q4_1")
    assert fast.matmul == "q4_1"
    assert isinstance(fast.packed.blocks[0].qkv.weight, blockq.Q4_1Weight)
    assert isinstance(fast.packed.head.weight, blockq.Q8_0Weight) is head
    tokens = exact.tokenizer.tokenize(TEXT)
    want_hidden, want_logits = read_in_steps(exact, MESSAGES, NEEDS, tokens, 5)
    for step in (1, 2, 4, 9):
        hidden, logits = read_in_steps(fast, MESSAGES, NEEDS, tokens, step)
        for layer in NEEDS.layers:
            assert _distance(hidden[layer], want_hidden[layer]) <= 1e-5, (layer, step)
        assert _distance(logits, want_logits) <= 1e-5, step


def _refused(call: Any) -> str:
    with pytest.raises(ObserverError) as info:
        call()
    assert "observer.options.matmul" in str(info.value)
    return str(info.value)


def test_q4_1_is_refused_where_it_cannot_run(tiny_llama: Path, tiny_gpt2: Path,
                                            monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    def load(path: Path, options: dict[str, Any], backend: str = "torch") -> Any:
        return load_model_dir(path, name="tiny", window=256, backend=backend,
                              options={"matmul": "q4_1", **options})

    if UNAVAILABLE is None:  # the random tiny model's weights are not Q4_1 blocks
        assert "not exact Q4_1 blocks" in _refused(lambda: load(tiny_llama, {}))
    assert "torch backend" in _refused(lambda: load(tiny_llama, {}, backend="onnx"))
    assert "bfloat16" in _refused(lambda: load(tiny_llama, {"dtype": "bfloat16"}))
    assert "not a Llama-family model" in _refused(lambda: load(tiny_gpt2, {}))
    # no compiler (a fresh cache: nothing built yet)
    monkeypatch.setenv("GUARDRAIL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GUARDRAIL_CC", str(tmp_path / "no-such-cc"))
    assert "no C compiler" in _refused(lambda: load(tiny_llama, {}))
    monkeypatch.setattr(torch.cpu, "get_capabilities", dict)  # a CPU without AVX2
    assert "AVX2" in _refused(lambda: load(tiny_llama, {}))


@needs_kernel
def test_kernel_is_built_once_into_the_cache(monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    monkeypatch.setenv("GUARDRAIL_CACHE", str(tmp_path))
    assert blockq.kernel_unavailable() is None
    built = list((tmp_path / "kernels").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"  # no temporary left behind
    monkeypatch.setenv("GUARDRAIL_CC", str(tmp_path / "no-such-cc"))
    assert blockq.kernel_unavailable() is None  # built: no compiler needed again


def test_default_falls_back_quietly_without_the_kernel(tiny_llama: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    """``auto`` where q4_1 cannot run (no compiler, weights not Q4_1 blocks): the next
    choice, never an error; where the blocks cannot run in one call (another activation),
    q4_1 on the torch step rather than q4_1_tail_q8."""
    monkeypatch.setenv("GUARDRAIL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GUARDRAIL_CC", str(tmp_path / "no-such-cc"))
    later = [m for m in AUTO_MATMUL if not m.startswith("q4_1")]
    fallback = next((m for m in later if matmul_unsupported(m) is None), "float32")
    exact = _quantized(tiny_llama)
    assert _with(exact, "auto").matmul == fallback
    monkeypatch.delenv("GUARDRAIL_CC")
    monkeypatch.delenv("GUARDRAIL_CACHE")
    random_weights = load_model_dir(tiny_llama, name="tiny", window=256)
    assert random_weights.matmul == fallback
    if UNAVAILABLE is None:  # where it runs, on exact blocks, q4_1_tail_q8 is the default
        assert _with(exact, "auto").matmul == "q4_1_tail_q8"
        exact.model.config.hidden_act = "gelu"
        try:
            assert _with(exact, "auto").matmul == "q4_1"
        finally:
            exact.model.config.hidden_act = "silu"


@pytest.mark.real_model
@needs_kernel
def test_smollm2_q4_1_states_are_float32s() -> None:
    """SmolLM2's float32 weights are its GGUF's Q4_1 blocks (the head Q8_0): ``q4_1`` takes
    them all and reads float32's states and logits to float32 noise, whatever the read sizes."""
    from guardrail.observer.hf import load_smollm2, smollm2_gguf
    from guardrail.policy import ObserverSpec

    try:
        smollm2_gguf()
    except Exception as exc:  # noqa: BLE001 - the wheel is optional on a dev machine
        pytest.skip(str(exc))
    exact = load_smollm2(ObserverSpec(window=512, options={"matmul": "float32"}))
    fast = _with(exact, "q4_1")
    assert isinstance(fast.packed.head.weight, blockq.Q8_0Weight)
    needs = Needs(layers=frozenset({15, -1}), logits=True)
    tokens = exact.tokenizer.tokenize(TEXT)
    want_hidden, want_logits = read_in_steps(exact, MESSAGES, needs, tokens, 9)
    for step in (1, 4, 9):
        hidden, logits = read_in_steps(fast, MESSAGES, needs, tokens, step)
        # measured: at most 8e-6 (states) and 1.1e-5 (logits); float16 8e-4 and 5.5e-3
        for layer in needs.layers:
            assert _distance(hidden[layer], want_hidden[layer]) <= 5e-5, (layer, step)
        assert _distance(logits, want_logits) <= 5e-5, step
