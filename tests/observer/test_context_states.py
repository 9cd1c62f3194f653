"""The context's pooled states (``Needs.context``): a monitor that asks gets, on its stream's first
update only, each layer's mean over the rendered conversation from the last user message's content
(an earlier user message's, when the last is a short follow-up) through the assistant header,
equal to a plain HF forward's, whichever path read the context (the unbatched read, the batched
scheduler, the padded path, the ONNX backend, a system prompt restored from the prefix cache);
when nobody asks, nothing changes."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from guardrail import Features, Guard, Monitor, Needs, ObserverError, Score
from guardrail.observer.batch import BatchedObserver
from guardrail.observer.context import SHORT_TURN_TOKENS, prompt_start
from guardrail.observer.hf import load_model_dir
from guardrail.observer.model import render_context
from guardrail.testing import plugin_monitors, split_text
from guardrail.toolkit.fake import PlantedObserver

# float32 products (observer.options.matmul), so reads compare with the HF forward tightly
EXACT = {"matmul": "float32"}

LAYERS = frozenset({1, 3})
ASK = Needs(layers=LAYERS, context=True)
TOL = 1e-4
SYSTEM = ("You are a careful assistant for a museum. Answer in short sentences, name your "
          "sources, and never make up dates or names.")
ANSWER = "The capital of France is Paris. Marie Curie was born in Warsaw in 1867."


def _system(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


CONVERSATIONS = {
    "one user message": [{"role": "user", "content": "Who was Marie Curie?"}],
    "system prompt": _system("Where is Paris?"),
    "several turns": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Who was Marie Curie?"},
        {"role": "assistant", "content": "A physicist, born in Warsaw in 1867."},
        {"role": "user", "content": "And what did she win?"},
    ],
    "no user message": [{"role": "system", "content": SYSTEM}],
    # "Thanks!" is 6 tokens (< 8): the span reaches back to the question it follows
    "a short follow-up": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Who was Marie Curie?"},
        {"role": "assistant", "content": "A physicist, born in Warsaw in 1867."},
        {"role": "user", "content": "Thanks!"},
    ],
    # "Go on" is 4 tokens: two of them make 8, so the span starts at the first "Go on"
    "two short follow-ups": [
        {"role": "user", "content": "Who was Marie Curie?"},
        {"role": "assistant", "content": "A physicist."},
        {"role": "user", "content": "Go on"},
        {"role": "assistant", "content": "She was born in Warsaw."},
        {"role": "user", "content": "Go on"},
    ],
    # short follow-ups all the way back: the span starts at the first user message's content
    "only short turns": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "More"},
    ],
}


# Few enough streams for one batch that no machine spreads over its forward workers
BATCHED = ("one user message", "several turns", "no user message", "a short follow-up")


def _tokens(hf_tokenizer: Any, text: str) -> int:
    return len(hf_tokenizer(text, add_special_tokens=False)["input_ids"])


def expected_start(hf_tokenizer: Any, messages: list[dict[str, str]]) -> int:
    """Where the pooled span starts, counted from the rendered text: the tokens of the text before
    the last user message's content, or, while the user contents from there on hold fewer than
    ``SHORT_TURN_TOKENS`` tokens, an earlier user message's (the tiny tokenizer never merges a
    header's newline into content). Without a user message: after the template's opening of a
    user turn."""
    users = [m for m in messages if m["role"] == "user"]
    if not users:
        return _tokens(hf_tokenizer, "<|im_start|>user\n")
    text = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    starts, at = [], 0
    for m in users:  # each user content's place in the text, in order
        at = text.index(m["content"], at)
        starts.append(at)
        at += len(m["content"])
    j, size = len(users) - 1, _tokens(hf_tokenizer, users[-1]["content"])
    while size < SHORT_TURN_TOKENS and j > 0:
        j -= 1
        size += _tokens(hf_tokenizer, users[j]["content"])
    return _tokens(hf_tokenizer, text[:starts[j]])


def hf_pooled(obs: Any, messages: list[dict[str, str]]) -> dict[int, np.ndarray]:
    """A plain HF forward over the context the observer reads, averaged over the span."""
    ids = render_context(obs.hf_tokenizer, messages)
    cut = max(0, len(ids) - (obs.window - obs.window // 4))
    start = max(0, expected_start(obs.hf_tokenizer, messages) - cut)
    with torch.inference_mode():
        out = obs.model.base_model(input_ids=torch.tensor([ids[cut:]]), output_hidden_states=True)
    return {layer: out.hidden_states[obs.hidden_index(layer)][0, start:].float().mean(0).numpy()
            for layer in LAYERS}


def assert_pooled(got: Any, want: dict[int, np.ndarray]) -> None:
    assert got is not None and set(got) == set(want)
    for layer, vector in want.items():
        assert isinstance(got[layer], np.ndarray) and got[layer].dtype == np.float32
        np.testing.assert_allclose(got[layer], vector, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_the_span_starts_at_the_last_user_messages_content(tiny_llama: Path, name: str) -> None:
    obs = load_model_dir(tiny_llama, name="tiny", window=4096, options=EXACT)
    messages = CONVERSATIONS[name]
    start = prompt_start(lambda m: render_context(obs.hf_tokenizer, m), messages)
    assert start == expected_start(obs.hf_tokenizer, messages)
    ids, pool_from = obs.context_span(messages, ASK)
    assert pool_from == start and ids == obs.context_ids(messages)
    if name != "no user message":  # the span reads the question and the assistant header
        tail = obs.hf_tokenizer.decode(ids[start:])
        assert tail.endswith(messages[-1]["content"] + "<|im_end|>\n<|im_start|>assistant\n")
        first = {"a short follow-up": "Who was Marie Curie?", "two short follow-ups": "Go on",
                 "only short turns": "Hi"}.get(name, messages[-1]["content"])
        assert tail.startswith(first + "<|im_end|>" if first != messages[-1]["content"]
                               else first)
        assert tail.count("<|im_start|>user") == {"a short follow-up": 1,
                                                  "two short follow-ups": 1,
                                                  "only short turns": 1}.get(name, 0)
    assert obs.context_span(messages, Needs(layers=LAYERS)) == (ids, None)


def test_a_cut_context_pools_what_is_left_of_the_span(tiny_llama: Path) -> None:
    # 48 context tokens at most
    obs = load_model_dir(tiny_llama, name="tiny", window=64, options=EXACT)
    messages = _system("Tell me everything: " + "the river flows north past the mill. " * 8)
    ids, pool_from = obs.context_span(messages, ASK)
    assert len(ids) == 48 and pool_from == 0  # the question's start was cut off
    state = obs.start(messages, ASK)
    batch = obs.extend(state, obs.tokenizer.tokenize(ANSWER), ASK)
    assert_pooled(batch.context, hf_pooled(obs, messages))


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_an_unbatched_read_hands_the_pooled_states_over_once(tiny_path: Path, name: str) -> None:
    """The observer's own start/extend (llama's written-out step, GPT-2's HF forward)."""
    obs = load_model_dir(tiny_path, name="tiny", window=256, options=EXACT)
    messages = CONVERSATIONS[name]
    state = obs.start(messages, ASK)
    tokens = obs.tokenizer.tokenize(ANSWER)
    first = obs.extend(state, tokens[:4], ASK)
    assert_pooled(first.context, hf_pooled(obs, messages))
    assert obs.extend(state, tokens[4:], ASK).context is None


def test_a_system_prompt_from_the_prefix_cache_still_pools_the_question(tiny_llama: Path) -> None:
    obs = load_model_dir(tiny_llama, name="tiny", window=256, options=EXACT)
    obs.start(_system("Who was Marie Curie?"), ASK)
    messages = _system("And Paris?")
    state = obs.start(messages, ASK)
    assert obs.prefix.hits == 1  # the system prompt came from the cache ...
    start = expected_start(obs.hf_tokenizer, messages)
    assert len(obs.tokenizer.tokenize(SYSTEM)) < obs.prefix.reused_tokens <= start  # ... not more
    batch = obs.extend(state, obs.tokenizer.tokenize(ANSWER), ASK)
    assert_pooled(batch.context, hf_pooled(obs, messages))
    # the very same conversation again: the span is read again, the opening is not
    again = obs.start(messages, ASK)
    assert obs.prefix.hits == 2 and obs.prefix.reused_tokens <= 2 * start
    assert_pooled(obs.extend(again, obs.tokenizer.tokenize("Yes."), ASK).context,
                  hf_pooled(obs, messages))


@pytest.mark.parametrize("padded", [False, True])
def test_streams_read_in_one_batched_forward_each_get_their_own(tiny_llama: Path,
                                                                padded: bool) -> None:
    obs = load_model_dir(tiny_llama, name="tiny", window=256, options=EXACT)
    obs.padded = padded  # the accelerators' path, run on the CPU
    batched = BatchedObserver(obs)
    plain = [Needs(layers=LAYERS), Needs(layers=frozenset({1}), logits=True)]
    asking = [CONVERSATIONS[name] for name in BATCHED]
    needs = [ASK] * len(asking) + plain  # streams that do not ask share the forwards
    convs = [*asking, _system("Where is Paris?"), _system("Who was Curie?")]
    tokens = obs.tokenizer.tokenize(ANSWER)
    with batched.hold():  # every context read, then every first read, in one batch each
        streams = [batched.start(m, n) for m, n in zip(convs, needs, strict=True)]
        firsts = [batched.submit(s, tokens[:5], n) for s, n in zip(streams, needs, strict=True)]
    got = [f.result().context for f in firsts]
    assert batched.stats.largest == len(streams)
    assert (batched.stats.padded > 0) == padded
    for conv, n, context in zip(convs, needs, got, strict=True):
        if n.context:
            assert_pooled(context, hf_pooled(obs, conv))
        else:
            assert context is None
    later = [batched.extend(s, tokens[5:9], n) for s, n in zip(streams, needs, strict=True)]
    assert all(b.context is None for b in later)


@pytest.mark.slow
def test_the_onnx_backend_pools_the_context(tiny_llama: Path,
                                            tmp_path_factory: pytest.TempPathFactory) -> None:
    pytest.importorskip("onnxruntime")
    copy = Path(shutil.copytree(tiny_llama, tmp_path_factory.mktemp("ctx-onnx") / "llama"))
    obs = load_model_dir(copy, name="tiny", window=256, backend="onnx")
    reference = load_model_dir(tiny_llama, name="tiny", window=256, options=EXACT)
    for question in ("Who was Marie Curie?", "And Paris?"):  # the second from the prefix cache
        messages = _system(question)
        state = obs.start(messages, ASK)
        batch = obs.extend(state, obs.tokenizer.tokenize(ANSWER), ASK)
        assert_pooled(batch.context, hf_pooled(reference, messages))
    assert obs.prefix.hits == 1


class ContextMonitor(Monitor):
    """Keeps what each update's features carried: (first index, context)."""

    def __init__(self, options: Any = None) -> None:
        self.streams: list[list[tuple[int, Any]]] = []

    def needs(self) -> Needs:
        return ASK

    def start(self, context: Any) -> list[tuple[int, Any]]:
        seen: list[tuple[int, Any]] = []
        self.streams.append(seen)
        return seen

    def update(self, state: list[tuple[int, Any]], features: Features) -> list[Score]:
        state.append((features.first_index, features.context))
        return [Score(i, 0.0) for i in features.indices]


class LayerMonitor(ContextMonitor):
    """The same, without asking for the context."""

    def needs(self) -> Needs:
        return Needs(layers=LAYERS)


POLICY = {"monitors": [{"id": "ctx", "use": "ctx", "threshold": 0.5, "action": "flag"}]}


def _stream(guard: Guard, messages: list[dict[str, str]], pieces: int = 3) -> None:
    session = guard.session(messages)
    for delta in split_text(ANSWER, [pieces]):
        session.feed(delta)
    session.finish()


@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_a_monitor_gets_the_pooled_states_on_its_first_update_only(
        tiny_llama: Path, tiny_gpt2: Path, model: str) -> None:
    """Through a Guard (the batched scheduler for llama, one stream at a time for GPT-2)."""
    path = tiny_llama if model == "llama" else tiny_gpt2
    policy = {**POLICY, "observer": {"model": str(path), "window": 256, "options": EXACT},
              "release": {"hold_back_tokens": 0}}  # a read per feed
    with plugin_monitors(ctx=ContextMonitor) as host:
        guard = Guard.from_policy(policy, host=host)
        monitor = guard.monitors[0][1]
        assert isinstance(monitor, ContextMonitor)
        for messages in CONVERSATIONS.values():
            _stream(guard, messages)
    inner = guard.observer.inner
    for messages, seen in zip(CONVERSATIONS.values(), monitor.streams, strict=True):
        assert len(seen) > 2 and seen[0][0] == 0
        assert_pooled(seen[0][1], hf_pooled(inner, messages))
        assert all(context is None for _, context in seen[1:])


def test_nothing_changes_for_monitors_that_do_not_ask(tiny_llama: Path) -> None:
    """No context in any update, the prefix cache reuses the whole conversation as before, and a
    stream's rows are what a guard with a monitor that asks gives."""
    rows: dict[str, list[Any]] = {}
    for use, factory in (("plain", LayerMonitor), ("asks", ContextMonitor)):
        obs = load_model_dir(tiny_llama, name="tiny", window=256, options=EXACT)
        policy = {"monitors": [{"id": "m", "use": use, "threshold": 0.5, "action": "flag"}]}
        with plugin_monitors(None, **{use: factory}) as host:
            guard = Guard.from_policy(policy, host=host, observer=obs)
            monitor = guard.monitors[0][1]
            assert isinstance(monitor, ContextMonitor)
            _stream(guard, _system("Where is Paris?"))
            _stream(guard, _system("Where is Paris?"))
        contexts = [context for seen in monitor.streams for _, context in seen]
        if use == "plain":
            assert all(context is None for context in contexts)
            assert obs.prefix.reused_tokens == len(obs.context_ids(_system("Where is Paris?")))
        else:
            assert sum(context is not None for context in contexts) == 2
        state = obs.start(_system("Where is Paris?"), monitor.needs())
        batch = obs.extend(state, obs.tokenizer.tokenize(ANSWER), monitor.needs())
        rows[use] = [batch.hidden[layer] for layer in sorted(LAYERS)]
    for a, b in zip(rows["plain"], rows["asks"], strict=True):
        torch.testing.assert_close(a, b, atol=TOL, rtol=TOL)


def test_a_guard_whose_observer_cannot_pool_refuses_to_load() -> None:
    observer = PlantedObserver(hidden_size=8, num_layers=4)
    with plugin_monitors(ctx=ContextMonitor) as host, pytest.raises(
            ObserverError, match=r"monitor\(s\) ctx ask for the context's pooled states "
                                 r"\(Needs.context\), which observer 'planted'.*cannot give"):
        Guard.from_policy(POLICY, host=host, observer=observer)
