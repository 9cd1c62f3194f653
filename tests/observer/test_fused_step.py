"""Under ``observer.options.matmul: q4_1`` a forward's decoder blocks run in one C call
(``guardrail.observer.blockstep``): its states and logits are the torch step's on the same
products to float32 noise, read alone or batched with other streams, whole or in pieces; the
default guard's verdicts do not move; what it cannot run falls back to the torch step, and bad
arguments are refused clearly."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from guardrail.observer.batch import BatchedObserver
from guardrail.observer.blockstep import BlockStack, unfused

from .streams import PROMPTS, TEXTS, VERDICT_ANSWERS, alone_and_together, read_in_steps, verdicts
from .test_q4_1_matmul import MESSAGES, NEEDS, TEXT, _distance, _quantized, _with, needs_kernel

# Largest relative distance per token from the torch step on the same products. Measured: at
# most 3e-7 on the tiny Llama, 2.7e-6 (states) and 3.9e-6 (logits) on SmolLM2 (two runs), where
# the torch step read 1 and 9 tokens at a time differs from itself by as much (3.4e-6, 4.3e-6).
TOLERANCE = 1e-5

pytestmark = needs_kernel


@pytest.fixture(scope="module")
def fused(tiny_llama: Path) -> Any:
    """The tiny Llama on Q4_1-exact weights with ``matmul: q4_1``: its blocks in one call."""
    observer = _with(_quantized(tiny_llama), "q4_1")
    assert isinstance(observer.packed.fused, BlockStack)
    return observer


def _torch_step(observer: Any) -> Any:
    """``observer`` on the same packed products with the torch step (the one-call blocks
    detached)."""
    plain = copy.copy(observer)
    plain._steps = {}
    plain.packed = copy.copy(observer.packed)
    plain.packed.fused = None
    return plain


def _near(a: torch.Tensor, b: torch.Tensor, what: Any) -> None:
    assert a.shape == b.shape, what
    assert _distance(a, b) <= TOLERANCE, (what, _distance(a, b))


def test_one_stream_reads_the_torch_steps_states(fused: Any) -> None:
    """Read 1, 2, 4 and 9 tokens at a time, through the batched observer (``batch._step``) and
    the unbatched step (``LlamaStep``): the torch step's states and logits."""
    plain = _torch_step(fused)
    tokens = fused.tokenizer.tokenize(TEXT)
    for step in (1, 2, 4, 9):
        want_hidden, want_logits = read_in_steps(plain, MESSAGES, NEEDS, tokens, step)
        hidden, logits = read_in_steps(fused, MESSAGES, NEEDS, tokens, step)
        for layer in NEEDS.layers:
            _near(hidden[layer], want_hidden[layer], (layer, step))
        _near(logits, want_logits, step)
        reads = []
        for observer in (fused, plain):  # unbatched: LlamaStep.forward
            state = observer.start(MESSAGES, NEEDS)
            reads.append([observer.extend(state, tokens[i:i + step], NEEDS)
                          for i in range(0, len(tokens), step)])
        for a, b in zip(*reads, strict=True):
            for layer in NEEDS.layers:
                _near(a.hidden[layer], b.hidden[layer], (layer, step, "unbatched"))
            _near(a.logits, b.logits, (step, "unbatched"))


def test_a_long_cache_is_read_as_the_torch_step_reads_it(fused: Any) -> None:
    """Attention over a cache several blocks of keys and values long (the C code takes them 64
    at a time, ending in a partial block): the torch step's states and logits at every read."""
    plain = _torch_step(fused)
    tokens = fused.tokenizer.tokenize(TEXT * 4)
    assert len(tokens) > 3 * 64 + 7
    states = []
    reads = []
    for observer in (fused, plain):
        state = observer.start(MESSAGES, NEEDS)
        reads.append([observer.extend(state, tokens[i:i + 9], NEEDS)
                      for i in range(0, len(tokens), 9)])
        states.append(state)
    assert states[0].kv.length() == states[1].kv.length() > 3 * 64
    for r, (a, b) in enumerate(zip(*reads, strict=True)):
        for layer in NEEDS.layers:
            _near(a.hidden[layer], b.hidden[layer], (layer, r))
        _near(a.logits, b.logits, r)


def test_streams_read_in_one_forward_match_their_own_reads(fused: Any) -> None:
    """Five streams' reads of different sizes packed in one forward (each attending over its
    own cache) give what each stream read alone gives, and the torch step's rows."""
    plain = _torch_step(fused)
    batched = BatchedObserver(fused)
    tokens = [fused.tokenizer.tokenize(t) for t in TEXTS]
    sizes = [1, 3, 2, 7, 5]
    alone, together = alone_and_together(fused, batched, NEEDS, PROMPTS, tokens, sizes)
    assert batched.stats.largest == len(PROMPTS)  # the first reads shared one forward
    on_torch = alone_and_together(plain, BatchedObserver(plain), NEEDS, PROMPTS, tokens,
                                  sizes)[0]
    for k, mine in enumerate(together):
        for name, reads in (("fused", alone), ("torch", on_torch)):
            theirs = reads[k]
            assert len(mine) == len(theirs)
            for r, (a, b) in enumerate(zip(mine, theirs, strict=True)):
                for layer in NEEDS.layers:
                    _near(a.hidden[layer], b.hidden[layer], (name, k, r, layer))
                _near(a.logits, b.logits, (name, k, r))


def test_a_stream_read_whole_matches_it_read_in_pieces(fused: Any) -> None:
    tokens = fused.tokenizer.tokenize(TEXT)
    whole_hidden, whole_logits = read_in_steps(fused, MESSAGES, NEEDS, tokens, len(tokens))
    for step in (1, 3, 7):
        hidden, logits = read_in_steps(fused, MESSAGES, NEEDS, tokens, step)
        for layer in NEEDS.layers:
            _near(hidden[layer], whole_hidden[layer], (layer, step))
        _near(logits, whole_logits, step)


def test_a_small_window_drops_old_tokens_as_the_torch_step(tiny_llama: Path) -> None:
    """A window the stream overflows: the cache drops old tokens, the blocks read what is
    kept, as the torch step does."""
    fused = _quantized(tiny_llama)
    fused.window = 24
    fused = _with(fused, "q4_1")
    assert fused.packed.fused is not None
    tokens = fused.tokenizer.tokenize(TEXT)
    for step in (1, 4):
        want_hidden, want_logits = read_in_steps(_torch_step(fused), MESSAGES, NEEDS, tokens,
                                                 step)
        hidden, logits = read_in_steps(fused, MESSAGES, NEEDS, tokens, step)
        for layer in NEEDS.layers:
            _near(hidden[layer], want_hidden[layer], (layer, step))
        _near(logits, want_logits, step)


def test_what_it_cannot_run_falls_back_to_the_torch_step(tiny_llama: Path,
                                                       fused: Any) -> None:
    """Another activation: no one-call blocks, the torch step reads (no error: the user asked
    for q4_1, which runs). A mask other than the eager read's: that call on the torch step."""
    from guardrail.observer.llama_step import LlamaStep

    gelu = _quantized(tiny_llama)
    gelu.model.config.hidden_act = "gelu"
    try:
        assert "not silu" in str(unfused(gelu.model, _with(gelu, "q4_1").packed))
        assert _with(gelu, "q4_1").packed.fused is None
    finally:
        gelu.model.config.hidden_act = "silu"
    step = LlamaStep(fused.model, 4, [1, 4], True, fused.packed)
    plain = LlamaStep(fused.model, 4, [1, 4], True, _torch_step(fused).packed)
    ids = torch.tensor([[5, 6, 7]])
    positions = torch.arange(3).view(1, -1)
    empty = [torch.zeros(1, fused.kv_heads, 0, fused.head_dim)] * 8
    with torch.inference_mode():
        for mask in (torch.ones(1, 1, 3, 3, dtype=torch.bool).tril(),  # the eager read's
                     torch.ones(1, 1, 3, 3, dtype=torch.bool)):  # not causal: torch step
            for a, b in zip(step(ids, positions, mask, *empty),
                            plain(ids, positions, mask, *empty), strict=True):
                _near(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), mask)


def test_bad_segments_are_refused(fused: Any) -> None:
    stack = fused.packed.fused
    h = torch.randn(1, 4, fused.model.config.hidden_size)
    positions = torch.arange(4).view(1, -1)
    cache = [torch.zeros(1, fused.kv_heads, 0, fused.head_dim)] * 8
    with torch.inference_mode():
        assert stack.run(h, positions, [(0, 4, cache)], 4, {2})[1].keys() == {2}
        for bad in ([(0, 3, cache)], [(0, 2, cache), (1, 4, cache)], [(0, 5, cache)]):
            with pytest.raises(ValueError, match="segments"):
                stack.run(h, positions, bad, 4, ())
        strided = [torch.zeros(1, fused.kv_heads, fused.head_dim, 3).transpose(2, 3)] * 8
        assert stack.run(h, positions, [(0, 4, strided)], 4, ()) is None  # torch step's


@pytest.mark.real_model
def test_default_guard_verdicts_do_not_move_on_smollm2() -> None:
    """The default policy with ``matmul: q4_1`` on SmolLM2: the same releases, flags and halts
    with its blocks in one call as on the torch step, scores within float32 noise."""
    from guardrail import Guard
    from guardrail.guard import default_policy
    from guardrail.observer.hf import smollm2_gguf

    try:
        smollm2_gguf()
    except Exception as exc:  # noqa: BLE001 - the wheel is optional on a dev machine
        pytest.skip(str(exc))
    policy = default_policy()
    assert policy.observer is not None
    spec = policy.observer.model_copy(update={"options": {**policy.observer.options,
                                                          "matmul": "q4_1"}})
    guard = Guard(policy.model_copy(update={"observer": spec}))
    inner = guard.observer.inner
    assert inner.packed.fused is not None
    texts = [TEXT, *VERDICT_ANSWERS]
    got = [verdicts(guard, t) for t in texts]
    stack, inner.packed.fused = inner.packed.fused, None
    try:
        want = [verdicts(guard, t) for t in texts]
    finally:
        inner.packed.fused = stack
    assert any(kind == "Halt" for events, _ in want for kind, _, _ in events)
    for (events, scores), (events0, scores0) in zip(got, want, strict=True):
        assert events == events0
        for monitor, rows in scores.items():
            assert [i for i, _ in rows] == [i for i, _ in scores0[monitor]], monitor
            for (_, a), (_, b) in zip(rows, scores0[monitor], strict=True):
                assert abs(a - b) <= (5e-5 if monitor == "router" else 1e-5), (monitor, a, b)
