"""``observer.options.matmul: q4_1_q8`` and ``q4_1_q16``: integer products of SmolLM2's GGUF
Q4_1 blocks (the head's Q8_0) with the rows quantized per block of 32 to int8 or int16, as
llama.cpp does on the CPU (``guardrail.observer.blockq``, "Integer products"). The kernel
computes exactly the quantized math (against a float64 reference of it), stays within the
rows' rounding of float32's products, and the options load, read and refuse as ``q4_1``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from guardrail import Needs
from guardrail.errors import ObserverError
from guardrail.observer import blockq
from guardrail.observer.hf import load_model_dir

from .streams import read_in_steps
from .test_q4_1_matmul import (
    MESSAGES,
    NEEDS,
    TEXT,
    UNAVAILABLE,
    _distance,
    _quantized,
    _refused,
    _relative,
    _with,
    needs_kernel,
    q4_1,
    q8_0,
)

# The rows' rounding against float32's products, measured on these random weights and rows
# (largest difference over the largest output): int8 rows up to 1.2e-2, int16 up to 3.6e-5.
NEAR_FLOAT32 = {8: 2e-2, 16: 1e-4}
# An observer's states and logits on the tiny model (relative distance per token): int8 rows
# move them by percents (SmolLM2: 1.4-2.8% median), int16 rows by about 1e-4.
STATES = {"q4_1_q8": 0.15, "q4_1_q16": 1e-3}


def _rows_reference(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, ...]:
    """The rows' quantization as documented: per block of 32, d = max|x| / top (top 127 or
    32767), q = round(x * (top / max|x|)) to nearest even, s = d * sum(q), in float32."""
    top = 127.0 if bits == 8 else 32767.0
    blocks = x.reshape(x.shape[0], -1, 32)
    amax = blocks.abs().amax(-1)
    d = amax / top
    inv = torch.where(amax > 0, top / amax, torch.zeros_like(amax))
    q = torch.round(blocks * inv[..., None])
    return q.reshape(x.shape), d, d * q.sum(-1)


@needs_kernel
@pytest.mark.parametrize("bits", [8, 16])
def test_rows_are_quantized_per_block_as_documented(bits: int) -> None:
    torch.manual_seed(bits)
    x = torch.randn(5, 96) * torch.logspace(-3, 2, 96)  # blocks of very different scales
    x[2, 32:64] = 0.0  # an all-zero block: scale 0, q 0
    q, d, s = blockq.quantize_rows(x, bits)
    want_q, want_d, want_s = _rows_reference(x, bits)
    assert q.dtype == (torch.int8 if bits == 8 else torch.int16)
    assert torch.equal(q.float(), want_q) and torch.equal(d, want_d) and torch.equal(s, want_s)
    assert int(q.abs().max()) == (127 if bits == 8 else 32767)


@needs_kernel
@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("k", [32, 96, 576, 1536])
def test_kernel_computes_the_quantized_math(k: int, bits: int) -> None:
    """Against float64 of the same quantized math (the rows as the kernel quantizes them, the
    blocks' exact weights), every row count the kernel's tiles and paths take (1-4 rows on
    the weights in registers, int16 from 5 rows on widened weights); and within the rows'
    rounding of float32's products."""
    torch.manual_seed(k + bits)
    n = 37  # not a multiple of 8: the last group of output rows is part padding
    w4 = q4_1(torch.randn(n, k) * 0.1 - 0.02)
    w8 = q8_0(torch.randn(n, k) * 0.05)
    for w, kind in ((w4, blockq.Q4_1IntWeight), (w8, blockq.Q8_0IntWeight)):
        product = kind.of(w, bits)
        assert product.out_features == n and product.in_features == k
        for rows in [*range(1, 12), 16, 19]:
            x = torch.randn(rows, k)
            q, d, _ = blockq.quantize_rows(x, bits)
            rows_used = (q.double().reshape(rows, -1, 32) * d.double()[..., None]).reshape(x.shape)
            want = torch.nn.functional.linear(rows_used, w.double())
            got = product(x)
            assert _relative(got.double(), want) <= 2e-6, (kind.__name__, rows)
            assert _relative(got, torch.nn.functional.linear(x, w)) <= NEAR_FLOAT32[bits]
        assert product(torch.empty(0, k)).shape == (0, n)
        x = torch.randn(2, 3, k)  # leading dimensions kept, a strided input copied
        assert product(x).shape == (2, 3, n)
        assert torch.equal(product(x.transpose(0, 1)), product(x.transpose(0, 1).contiguous()))


@needs_kernel
def test_int16_rows_are_closer_to_float32_than_float16_weights() -> None:
    """What the int16 option is for: its products' error (the rows' rounding) is well under
    float16 weights' rounding on the same product."""
    torch.manual_seed(3)
    w = q4_1(torch.randn(64, 576) * 0.05)
    x = torch.randn(9, 576)
    exact = torch.nn.functional.linear(x.double(), w.double())
    half = torch.nn.functional.linear(x.double(), w.half().double())
    q16 = blockq.Q4_1IntWeight.of(w, 16)(x).double()
    assert _relative(q16, exact) * 4 < _relative(half, exact)


@needs_kernel
@pytest.mark.parametrize("matmul", ["q4_1_q8", "q4_1_q16"])
def test_observer_on_integer_products(tiny_llama: Path, matmul: str) -> None:
    """On Q4_1-exact weights the option packs every projection and the head as integer
    blocks, and reads the float32 products' states and logits to the rows' rounding, the same
    whatever the read sizes."""
    exact = _quantized(tiny_llama)
    fast = _with(exact, matmul)
    assert fast.matmul == matmul
    assert isinstance(fast.packed.blocks[0].qkv.weight, blockq.Q4_1IntWeight)
    assert isinstance(fast.packed.head.weight, blockq.Q8_0IntWeight)
    tokens = exact.tokenizer.tokenize(TEXT)
    want_hidden, want_logits = read_in_steps(exact, MESSAGES, NEEDS, tokens, 5)
    first = None
    for step in (1, 4, 9):
        hidden, logits = read_in_steps(fast, MESSAGES, NEEDS, tokens, step)
        for layer in NEEDS.layers:
            assert _distance(hidden[layer], want_hidden[layer]) <= STATES[matmul], (layer, step)
        assert _distance(logits, want_logits) <= STATES[matmul], step
        # each row is quantized on its own: how reads fall changes only the float order of
        # the rest of the forward (which can flip a rounding of the rows: well under the above)
        first = logits if first is None else first
        assert _distance(logits, first) <= STATES[matmul] / 10


@pytest.mark.parametrize("matmul", ["q4_1_q8", "q4_1_q16"])
def test_integer_options_are_refused_where_they_cannot_run(
        tiny_llama: Path, matmul: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def load(options: dict[str, Any], backend: str = "torch") -> Any:
        return load_model_dir(tiny_llama, name="tiny", window=256, backend=backend,
                              options={"matmul": matmul, **options})

    if UNAVAILABLE is None:  # the random tiny model's weights are not Q4_1 blocks
        message = _refused(lambda: load({}))
        assert f"'{matmul}'" in message and "not exact Q4_1 blocks" in message
    assert "torch backend" in _refused(lambda: load({}, backend="onnx"))
    monkeypatch.setenv("GUARDRAIL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GUARDRAIL_CC", str(tmp_path / "no-such-cc"))
    assert "no C compiler" in _refused(lambda: load({}))
    with pytest.raises(ObserverError, match="must be one of"):
        load({"matmul": "q4_1_q4"})


@pytest.mark.real_model
@needs_kernel
@pytest.mark.parametrize("matmul", ["q4_1_q16"])
def test_smollm2_integer_products_keep_the_demo_verdicts(matmul: str) -> None:
    """SmolLM2 on the option: every weight taken as integer blocks, and the default guard's
    verdicts on the demo's recorded answers (fed in its word-sized deltas) where float32's
    products put them."""
    from guardrail import Guard
    from guardrail.guard import default_policy
    from guardrail.observer.hf import load_smollm2, smollm2_gguf
    from guardrail.policy import ObserverSpec
    from guardrail.toolkit.demo import _replays
    from guardrail.toolkit.records import random_splits

    try:
        smollm2_gguf()
    except Exception as exc:  # noqa: BLE001 - the wheel is optional on a dev machine
        pytest.skip(str(exc))
    exact = load_smollm2(ObserverSpec(window=512, options={"matmul": "float32"}))
    fast = _with(exact, matmul)
    assert isinstance(fast.packed.head.weight, blockq.Q8_0IntWeight)

    def verdicts(observer: Any) -> list[list[tuple[str, str, int]]]:
        guard = Guard(default_policy(), observer=observer)
        out = []
        for k, replay in enumerate(_replays()):
            session = guard.session(prompt=replay["prompt"], dry_run=True)
            for delta in random_splits(replay["response"], seed=k):
                session.feed(delta)
            report = session.finish()
            out.append(sorted((f.monitor, str(f.action), f.tokens[1]) for f in report.flags))
        return out

    assert verdicts(fast) == verdicts(exact)
    needs = Needs(layers=frozenset({15, -1}), logits=True)
    tokens = exact.tokenizer.tokenize(TEXT)
    want_hidden, want_logits = read_in_steps(exact, MESSAGES, needs, tokens, 9)
    hidden, logits = read_in_steps(fast, MESSAGES, needs, tokens, 4)
    # measured: 2.1e-4 (states) and 8.7e-4 (logits) at most; float16 weights 1.2e-3 and 3.1e-3
    for layer in needs.layers:
        assert _distance(hidden[layer], want_hidden[layer]) <= 1e-3, layer
    assert _distance(logits, want_logits) <= 2e-3
