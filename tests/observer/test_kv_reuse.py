"""What a read keeps and reuses: the attention that reads the cache in place equals the plain
one, KV buffers stay within the window, and streams that share a conversation prefix reuse its
keys and values with the states of a fresh read."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from guardrail import ObserverError
from guardrail.monitor import Needs
from guardrail.observer.batch import BatchedObserver
from guardrail.observer.hf import load_model_dir
from guardrail.observer.llama_step import attend

TOL = 1e-4
NEEDS = Needs(layers=frozenset({1, -1}), logits=True, top_k=3)
SYSTEM = ("You are a careful assistant for a museum. Answer in short sentences, name your "
          "sources, and never make up dates or names.")
TEXT = ("The capital of France is Paris. Marie Curie was born in Warsaw in 1867 and won two "
        "Nobel prizes. Café 🙂 déjà vu. ") * 3


@pytest.fixture(scope="module")
def model_copy(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy: ONNX exports land next to the model, not in the shared tiny model."""
    return Path(shutil.copytree(tiny_llama, tmp_path_factory.mktemp("reuse") / "llama"))


def _model(backend: str, tiny_llama: Path, copy: Path) -> Path:
    if backend == "onnx":
        pytest.importorskip("onnxruntime")
        return copy
    return tiny_llama


def conversation(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


@pytest.mark.parametrize("past", [0, 1, 37])
@pytest.mark.parametrize("n", [1, 5])
def test_attend_equals_attention_over_the_concatenated_repeated_cache(past: int, n: int) -> None:
    """Grouped-query attention folded into the query rows, cache and new keys scored apart:
    the same as repeating each key head per query head and attending over [cache, new]."""
    g = torch.Generator().manual_seed(past * 10 + n)
    heads, kv_heads, d, batch = 6, 2, 8, 2
    q = torch.randn(batch, heads, n, d, generator=g)
    k, v = (torch.randn(batch, kv_heads, n, d, generator=g) for _ in range(2))
    pk, pv = (torch.randn(batch, kv_heads, past, d, generator=g) for _ in range(2))
    mask = torch.ones(batch, 1, n, past + n, dtype=torch.bool)
    mask[:, :, :, past:] = torch.ones(n, n, dtype=torch.bool).tril()
    if past > 3:
        mask[1, :, :, :3] = False  # a left-padded row of a batch
    got = attend(q, k, v, pk, pv, mask, 0.3)
    keys = torch.cat([pk, k], 2).repeat_interleave(heads // kv_heads, 1)
    values = torch.cat([pv, v], 2).repeat_interleave(heads // kv_heads, 1)
    want = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                                            scale=0.3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", pytest.param("onnx", marks=pytest.mark.slow)])
def test_kv_buffers_stay_within_the_window_on_a_long_stream(tiny_llama: Path, model_copy: Path,
                                                            backend: str) -> None:
    window = 96
    obs = load_model_dir(_model(backend, tiny_llama, model_copy), name="tiny", window=window,
                         backend=backend)
    needs = Needs(layers=frozenset({1}))
    tokens = obs.tokenizer.tokenize(TEXT * 8)
    assert len(tokens) > 5 * window
    state = obs.start(conversation("Facts?"), needs)
    sizes = set()
    for i in range(0, len(tokens), 3):
        obs.extend(state, tokens[i:i + 3], needs)
        assert state.kv.length() <= state.kv.capacity() <= window
        if state.dropped:
            sizes.add(state.kv.nbytes())
    assert state.dropped > 0 and len(sizes) == 1  # full: the buffers are no longer reallocated


def read(obs: Any, question: str, needs: Needs = NEEDS) -> tuple[Any, Any]:
    state = obs.start(conversation(question), needs)
    tokens = obs.tokenizer.tokenize(TEXT)
    return state, [obs.extend(state, tokens[i:i + 4], needs) for i in range(0, len(tokens), 4)]


def assert_same(got: list[Any], want: list[Any], needs: Needs = NEEDS) -> None:
    for a, b in zip(got, want, strict=True):
        for layer in needs.layers:
            torch.testing.assert_close(a.hidden[layer], b.hidden[layer], atol=TOL, rtol=TOL)
        if needs.logits:
            torch.testing.assert_close(a.logits, b.logits, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("backend", ["torch", pytest.param("onnx", marks=pytest.mark.slow)])
def test_a_shared_system_prompt_is_read_once_with_the_states_of_a_fresh_read(
        tiny_llama: Path, model_copy: Path, backend: str) -> None:
    path = _model(backend, tiny_llama, model_copy)
    needs = NEEDS if backend == "torch" else Needs(layers=frozenset({1}))
    obs = load_model_dir(path, name="tiny", window=256, backend=backend)
    fresh = load_model_dir(path, name="tiny", window=256, backend=backend,
                           options={"prefix_cache_tokens": 0})
    read(obs, "Who was Marie Curie?", needs)
    assert obs.prefix.hits == 0
    state, got = read(obs, "And Paris?", needs)  # same system prompt, another question
    assert obs.prefix.hits == 1
    system_tokens = len(obs.tokenizer.tokenize(SYSTEM))
    assert system_tokens < obs.prefix.reused_tokens < state.context_len
    fresh_state, want = read(fresh, "And Paris?", needs)
    assert fresh.prefix.hits == 0 and fresh_state.kv.length() == state.kv.length()
    assert_same(got, want, needs)
    # the very same conversation again: nothing left to read, still the same states
    _, again = read(obs, "And Paris?", needs)
    assert obs.prefix.hits == 2
    assert_same(again, want, needs)


def test_batched_reads_reuse_the_prefix_with_the_same_states(tiny_llama: Path) -> None:
    inner = load_model_dir(tiny_llama, name="tiny", window=256)
    fresh = load_model_dir(tiny_llama, name="tiny", window=256,
                           options={"prefix_cache_tokens": 0})
    batched = BatchedObserver(inner)
    read(batched, "Who was Marie Curie?")
    _, got = read(batched, "And Paris?")
    assert inner.prefix.hits == 1
    _, want = read(fresh, "And Paris?")
    assert_same(got, want)


def test_the_prefix_cache_stays_within_its_token_bound(tiny_llama: Path) -> None:
    limit = 200
    obs = load_model_dir(tiny_llama, name="tiny", window=256,
                         options={"prefix_cache_tokens": limit})
    needs = Needs(layers=frozenset({1}))
    context = 0
    for i in range(40):  # distinct conversations: every one is stored, the oldest go
        state = obs.start(conversation(f"Question number {i}: what happened in {1800 + i}?"),
                          needs)
        context = state.context_len
        assert obs.prefix.tokens() <= limit
    assert len(obs.prefix) == limit // context
    per_token = obs.prefix.nbytes() // obs.prefix.tokens()
    assert obs.prefix.nbytes() <= limit * per_token
    with pytest.raises(ObserverError, match="prefix_cache_tokens"):
        load_model_dir(tiny_llama, name="tiny", window=256, options={"prefix_cache_tokens": -1})


def test_the_lm_head_runs_only_when_a_monitor_reads_logits(tiny_llama: Path) -> None:
    """Hidden states alone stop at the deepest block asked for and never project onto the
    vocabulary; top-k or logits run the head once per read."""
    obs = load_model_dir(tiny_llama, name="tiny", window=256)
    calls: list[int] = []
    hook = obs.model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: calls.append(out.shape[-2]))
    if obs.packed is not None:  # the packed head (the default on the CPU) runs instead
        head = obs.packed.head
        obs.packed.head = lambda x: (calls.append(x.shape[-2]), head(x))[1]
    try:
        tokens = obs.tokenizer.tokenize(TEXT)[:12]
        for layers in ({1}, {-1}):
            needs = Needs(layers=frozenset(layers))
            obs.extend(obs.start(conversation("Hi"), needs), tokens, needs)
        assert calls == []
        needs = Needs(layers=frozenset({1}), top_k=2)
        out = obs.extend(obs.start(conversation("Hi"), needs), tokens, needs)
        assert calls == [len(tokens)] and out.logits is None and out.top_logits.shape == (12, 2)
    finally:
        hook.remove()
