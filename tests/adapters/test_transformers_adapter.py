"""guardrail-transformers: local generation whose own hidden states and logits reach the monitors.

Tiny random Llama/GPT-2 models (no download); one test runs the real SmolLM2 from the cache."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from guardrail_transformers import (
    IncrementalDecoder,
    LocalGenerator,
    aguarded_generate,
    guarded_generate,
    guarded_stream,
)
from pydantic import BaseModel

from guardrail import Features, Guard, Monitor, Needs, Score
from guardrail.events import Halt, Release
from guardrail.stream import StreamStep
from guardrail.testing import plugin_monitors
from guardrail.testing.tiny_models import build_tiny_model

PROMPT = "The capital of France is"
# Tiny random models with tied embeddings repeat their last token when greedy; seeded sampling
# gives varied, reproducible text.
VARIED: dict[str, Any] = {"temperature": 1.0, "seed": 7}
HALT_MESSAGE = "Stopped here."


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, int], Path]:
    built: dict[tuple[str, int], Path] = {}

    def make(arch: str = "llama", seed: int = 0) -> Path:
        if (arch, seed) not in built:
            path = tmp_path_factory.mktemp(f"tiny-{arch}-{seed}")
            built[(arch, seed)] = build_tiny_model(path, arch=arch, seed=seed)  # type: ignore[arg-type]
        return built[(arch, seed)]

    return make


@pytest.fixture(scope="module")
def tiny(tiny_dir: Callable[[str, int], Path]) -> LocalGenerator:
    return LocalGenerator(tiny_dir("llama", 0))


class Recorder(Monitor):
    """Keeps every Features it is handed (test-only: real monitors keep no stream state)."""

    def __init__(self, needs: Needs) -> None:
        self._needs = needs
        self.seen: list[Features] = []

    def needs(self) -> Needs:
        return self._needs

    def update(self, state: Any, features: Features) -> Sequence[Score]:
        self.seen.append(features)
        return []


class FireAt(Monitor):
    """Scores 1.0 on token ``index``, 0.0 elsewhere."""

    class Options(BaseModel):
        index: int

    def __init__(self, options: Options) -> None:
        self.index = options.index

    def update(self, state: Any, features: Features) -> Sequence[Score]:
        return [Score(i, 1.0 if i == self.index else 0.0) for i in features.indices]


def _guard(host: Any, hold_back: int, *monitors: dict[str, Any]) -> Guard:
    return Guard.from_policy({"release": {"hold_back_tokens": hold_back},
                              "monitors": list(monitors)}, host=host)


def _reference(gen: LocalGenerator, response: list[int]) -> tuple[Any, torch.Tensor, int]:
    """A full forward over prompt + response: HF hidden states, logits, prompt length."""
    prompt = gen.prompt_ids(PROMPT)
    with torch.no_grad():
        out = gen.model(input_ids=torch.tensor([prompt + response]), output_hidden_states=True)
    return out.hidden_states, out.logits[0], len(prompt)


def _hidden(step: StreamStep, layer: int) -> torch.Tensor:
    assert step.hidden is not None
    return torch.as_tensor(step.hidden[layer])


def _token_id(step: StreamStep) -> int:
    assert step.tokens is not None and len(step.tokens) == 1
    return step.tokens[0].id


class _Forwards:
    """Counts the model's forward passes."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.count = 0
        self._handle = model.register_forward_hook(self._hook)

    def _hook(self, *_: Any) -> None:
        self.count += 1

    def __enter__(self) -> _Forwards:
        return self

    def __exit__(self, *_: Any) -> None:
        self._handle.remove()


# -- the states the monitors read ------------------------------------------------------------


@pytest.mark.real_model
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_monitors_read_the_generators_states_as_a_full_forward_gives_them(
        tiny_dir: Callable[[str, int], Path], arch: str) -> None:
    gen = LocalGenerator(tiny_dir(arch, 0))
    recorder = Recorder(Needs(layers=frozenset({0, 2, -1}), logits=True))
    with plugin_monitors(recorder=lambda: recorder) as host:
        guard = _guard(host, 2, {"id": "rec", "use": "recorder", "action": "flag"})
        stream = guarded_stream(guard, PROMPT, generator=gen, max_new_tokens=12)
        events = list(stream)
    ids = [t.id for f in recorder.seen for t in f.tokens]
    assert len(ids) >= 4 and stream.report is not None
    assert "".join(e.text for e in events if isinstance(e, Release)) == gen.generate(
        PROMPT, max_new_tokens=12)
    hidden_states, logits, n_prompt = _reference(gen, [int(i) for i in ids if i is not None])
    rows = slice(n_prompt - 1, n_prompt - 1 + len(ids))  # the position before each token
    for layer, index in ((0, 1), (2, 3), (-1, gen.num_layers)):
        got = torch.cat([torch.as_tensor(f.hidden[layer]) for f in recorder.seen])
        torch.testing.assert_close(got, hidden_states[index][0, rows], atol=1e-4, rtol=1e-4)
    got_logits = torch.cat([torch.as_tensor(f.logits) for f in recorder.seen])
    torch.testing.assert_close(got_logits, logits[rows], atol=1e-4, rtol=1e-4)
    assert ids == got_logits.argmax(-1).tolist()  # greedy: each token is its row's argmax
    assert all(f.top_logits is None for f in recorder.seen)  # the generator-mode marker


def test_layer_numbering_matches_the_observer(tiny: LocalGenerator) -> None:
    """Row i + 1 of a generator step is the observer's state after token i (same layer keys)."""
    needs = Needs(layers=frozenset({1, -1}))
    steps = list(tiny.steps(PROMPT, needs=needs, max_new_tokens=8))
    observer = tiny.observer
    state = observer.start([{"role": "user", "content": PROMPT}], needs)
    spans = observer.tokenizer.tokenize("".join(s.text for s in steps))
    assert [t.id for t in spans] == [_token_id(s) for s in steps]
    batch = observer.extend(state, spans, needs)
    for layer in (1, -1):
        generated = torch.cat([_hidden(s, layer) for s in steps])
        torch.testing.assert_close(generated[1:], batch.hidden[layer][:-1], atol=1e-4, rtol=1e-4)


def test_steps_send_only_the_layers_asked_for(tiny: LocalGenerator) -> None:
    step = next(iter(tiny.steps(PROMPT, needs=Needs(layers=frozenset({1})), max_new_tokens=2)))
    assert set(step.hidden or {}) == {1} and step.logits is None
    plain = next(iter(tiny.steps(PROMPT, max_new_tokens=2)))
    assert plain.hidden is None and plain.logits is None and plain.tokens


def test_out_of_range_layer_is_a_clear_error(tiny: LocalGenerator) -> None:
    with pytest.raises(Exception, match="layer 9 is out of range"):
        list(tiny.steps(PROMPT, needs=Needs(layers=frozenset({9})), max_new_tokens=1))


# -- halting -----------------------------------------------------------------------------------


def _fire_guard(host: Any, hold_back: int, index: int, action: str = "halt",
                **extra: Any) -> Guard:
    return _guard(host, hold_back, {"id": "stop", "use": "fire-at", "options": {"index": index},
                                    "action": action, "message": HALT_MESSAGE, **extra})


@pytest.mark.parametrize("hold_back", [0, 3])
def test_halt_stops_generation_and_the_reader_sees_the_released_prefix(
        tiny: LocalGenerator, hold_back: int) -> None:
    unguarded = [s.text for s in tiny.steps(PROMPT, max_new_tokens=20, **VARIED)]
    at = 6
    assert len(unguarded) > at + hold_back + 1
    with plugin_monitors(fire_at=FireAt) as host, _Forwards(tiny.model) as forwards:
        out = guarded_generate(_fire_guard(host, hold_back, at), PROMPT, generator=tiny,
                               max_new_tokens=20, **VARIED)
    assert out.halted and out.report.halt is not None and out.report.halt.at == at
    # released: the tokens before the hold-back window, less a word the halt would cut in half;
    # then the message, set apart
    shown = out.report.released_text
    assert "".join(unguarded[: at - hold_back]).startswith(shown)
    assert out.text == shown + ("\n\n" if shown else "") + HALT_MESSAGE
    assert out.report.tokens - (at + 1) <= hold_back + 1
    assert forwards.count == at + 1  # the prompt, then tokens 0 .. at-1: none after the halt


async def test_async_halt_stops_generation(tiny: LocalGenerator) -> None:
    unguarded = [s.text for s in tiny.steps(PROMPT, max_new_tokens=20, **VARIED)]
    with plugin_monitors(fire_at=FireAt) as host, _Forwards(tiny.model) as forwards:
        out = await aguarded_generate(_fire_guard(host, 2, 5), PROMPT, generator=tiny,
                                      max_new_tokens=20, **VARIED)
    shown = out.report.released_text
    assert "".join(unguarded[:3]).startswith(shown)
    assert out.text == shown + ("\n\n" if shown else "") + HALT_MESSAGE
    assert isinstance(out.events[-1], Halt) and forwards.count == 6


@pytest.mark.real_model
async def test_async_states_equal_the_sync_ones(tiny: LocalGenerator) -> None:
    needs = Needs(layers=frozenset({-1}), logits=True)
    sync = [s for s in tiny.steps(PROMPT, needs=needs, max_new_tokens=6)]
    got = [s async for s in tiny.astream(PROMPT, needs=needs, max_tokens=6)]
    assert [s.text for s in got] == [s.text for s in sync]
    for a, b in zip(got, sync, strict=True):
        torch.testing.assert_close(_hidden(a, -1), _hidden(b, -1))
    recorder = Recorder(needs)  # and the async guarded driver hands monitors the same states
    with plugin_monitors(recorder=lambda: recorder) as host:
        guard = _guard(host, 2, {"id": "rec", "use": "recorder", "action": "flag"})
        await aguarded_generate(guard, PROMPT, generator=tiny, max_new_tokens=6)
    handed = torch.cat([torch.as_tensor(f.hidden[-1]) for f in recorder.seen])
    torch.testing.assert_close(handed, torch.cat([_hidden(s, -1) for s in sync]))


def test_leaving_the_stream_early_stops_generation(tiny: LocalGenerator) -> None:
    with plugin_monitors(fire_at=FireAt) as host, _Forwards(tiny.model) as forwards:
        stream = guarded_stream(_fire_guard(host, 0, 99, action="flag"), PROMPT,
                                generator=tiny, max_new_tokens=30)
        events = stream.__iter__()
        next(events)
        before = forwards.count
        events.close()  # what leaving a for loop does once the stream is collected
    assert forwards.count == before
    assert stream.report is not None and stream.report.aborted


async def test_async_consumer_leaving_stops_generation(tiny: LocalGenerator) -> None:
    with _Forwards(tiny.model) as forwards:
        agen = tiny.astream(PROMPT, max_new_tokens=30)
        await agen.__anext__()
        await agen.aclose()
        assert forwards.count <= 2


# -- routing to a larger local model ------------------------------------------------------------


def test_route_hands_one_token_to_the_large_model(tiny_dir: Callable[[str, int], Path]) -> None:
    small = LocalGenerator(tiny_dir("llama", 0))
    large = LocalGenerator(tiny_dir("llama", 1))
    large.model.model.norm.weight.data.mul_(-1)  # so it disagrees with the echoing small model
    at = 4
    with plugin_monitors(fire_at=FireAt) as host:
        guard = _fire_guard(host, 2, at, action="route",
                            route_to={"base_url": "http://unused", "model": "large"})
        stream = guarded_stream(guard, PROMPT, generator=small, route_to={"large": large},
                                max_new_tokens=10)
        text = "".join(e.text for e in stream if isinstance(e, Release))
    report = stream.report
    assert report is not None and report.routes and not report.halted
    assert stream.routed_tokens == [at]
    # the monitor fires on the large model's own token too: that is no second route
    assert [r.at for r in report.routes] == [at]
    small_only = [_token_id(s) for s in small.steps(PROMPT, max_new_tokens=10)]
    prompt = small.prompt_ids(PROMPT)
    with torch.no_grad():
        large_next = int(large.model(torch.tensor([prompt + small_only[:at]])).logits[0, -1]
                         .argmax())
    assert large_next != small_only[at]  # the two random models disagree here
    assert stream.token_ids[: at + 1] == [*small_only[:at], large_next]
    # then the small model goes on, greedily, from the large model's token
    context = prompt + stream.token_ids[: at + 1]
    for token in stream.token_ids[at + 1 :]:
        with torch.no_grad():
            assert int(small.model(torch.tensor([context])).logits[0, -1].argmax()) == token
        context.append(token)
    # what the reader saw is the answer's text (bytes of an unfinished character at the end of a
    # cut-off answer never show)
    assert text == small.hf_tokenizer.decode(stream.token_ids).rstrip("\ufffd")


def test_route_target_without_a_local_model_is_a_clear_error(
        tiny_dir: Callable[[str, int], Path]) -> None:
    small = LocalGenerator(tiny_dir("llama", 0))
    with plugin_monitors(fire_at=FireAt) as host:
        guard = _fire_guard(host, 1, 2, action="route",
                            route_to={"base_url": "http://unused", "model": "big"})
        with pytest.raises(Exception, match="no local model given for it"):
            guarded_generate(guard, PROMPT, generator=small, route_to={"other": small})


# -- text ---------------------------------------------------------------------------------------


def test_detokenizer_never_emits_half_a_character(tiny: LocalGenerator) -> None:
    text = "Café 東京 🙂 naïve"
    ids = tiny.hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    decoder = IncrementalDecoder(tiny.hf_tokenizer)
    deltas = [decoder.push(i) for i in ids]
    assert "".join(deltas) == text
    assert "" in deltas and not any("\ufffd" in d for d in deltas)


def test_stop_string_ends_the_answer_before_it(tiny: LocalGenerator) -> None:
    full = tiny.generate(PROMPT, max_new_tokens=16, **VARIED)
    start = next(i for i in range(3, len(full)) if full.index(full[i:i + 3]) == i)
    stop = full[start : start + 3]
    assert tiny.generate(PROMPT, max_new_tokens=16, stop=["\x00", stop], **VARIED) == full[:start]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generation_prints_no_transformers_deprecation_warning(
        tiny_dir: Callable[[str, int], Path], arch: str) -> None:
    """transformers renamed ``past_key_values`` to ``cache``; the old name printed a
    FutureWarning in the middle of every user's output (``make demo`` showed it)."""
    import warnings

    generator = LocalGenerator(tiny_dir(arch, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        assert generator.generate(PROMPT, max_new_tokens=4, **VARIED)


def test_sampling_is_reproducible_with_a_seed(tiny: LocalGenerator) -> None:
    a = tiny.generate(PROMPT, max_new_tokens=12, temperature=1.5, top_p=0.9, seed=3)
    b = tiny.generate(PROMPT, max_new_tokens=12, temperature=1.5, top_p=0.9, seed=3)
    assert a == b and a != tiny.generate(PROMPT, max_new_tokens=12)


def test_chat_messages_go_through_the_chat_template(tiny: LocalGenerator) -> None:
    ids = tiny.prompt_ids([{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": PROMPT}])
    rendered = tiny.hf_tokenizer.decode(ids)
    assert rendered.endswith("<|im_start|>assistant\n") and "Be brief." in rendered


def test_served_by_the_proxy(tiny: LocalGenerator, make_guard: Callable[..., Guard]) -> None:
    """``guardrail serve --local``: the proxy streams the generator's answer to an OpenAI client,
    with the request's sampling parameters."""
    import openai
    from guardrail_server import LocalModel, create_app, running

    assert isinstance(tiny, LocalModel)
    with running(create_app(make_guard(2), local=tiny)) as proxy:
        client = openai.OpenAI(base_url=proxy.base_url, api_key="-", max_retries=0, timeout=20)
        chunks = client.chat.completions.create(
            model=tiny.name, messages=[{"role": "user", "content": PROMPT}], stream=True,
            max_tokens=12, temperature=1.0, seed=7)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == tiny.generate(PROMPT, max_new_tokens=12, **VARIED)


# -- the real model -----------------------------------------------------------------------------


@pytest.mark.real_model
def test_smollm2_answer_guarded_by_the_default_policy() -> None:
    gen = LocalGenerator()
    guard = Guard.default(observer=gen.observer)
    prompt = "What is the capital of Australia?"
    session = guard.session(prompt=prompt, record_scores=True)
    out = guarded_generate(guard, prompt, generator=gen, session=session, max_new_tokens=12)
    assert "Canberra" in out.text and not out.halted
    assert out.text == gen.generate(prompt, max_new_tokens=12)
    scored = {m for m, points in out.report.scores.items() if points}
    assert scored == {spec.id for spec, _ in guard.monitors} and "router" in scored
    assert out.report.observer_seconds == 0.0  # no observer forward: the generator's own states
