"""guardrail-transformers: a monitor that asks for the context's pooled states (``Needs.context``)
gets them in a guarded local generation too, on its first update only, equal to the observer's
context read of the same conversation; the prompt's forward pools them (no extra forward). A harm
head with a prompt term scores and halts a generated answer as the offline computation and the
observer-read stream of the same text say."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from guardrail_harmful_content.head import DualHead
from guardrail_harmful_content.pooling import stack_states
from guardrail_transformers import LocalGenerator, guarded_stream

from guardrail import Features, Guard, GuardrailError, Monitor, Needs, Score
from guardrail.events import Error
from guardrail.observer.context import prompt_start
from guardrail.observer.model import render_context
from guardrail.probes.io import save_probe
from guardrail.stream import StepToken, StreamStep
from guardrail.testing import plugin_monitors
from guardrail.testing.tiny_models import build_tiny_model

LAYERS = (0, 2, -1)  # -1: the last, normed, as the observer numbers it
ASK = Needs(layers=frozenset(LAYERS), context=True)
TOL = 1e-4
VARIED: dict[str, Any] = {"temperature": 1.0, "seed": 7}  # tiny models repeat when greedy
SYSTEM = "You are a careful assistant. Answer in short sentences and name your sources."
CONVERSATIONS = {
    "one user message": [{"role": "user", "content": "How do I bake bread?"}],
    "system prompt": [{"role": "system", "content": SYSTEM},
                      {"role": "user", "content": "Where is Paris?"}],
    "several turns": [{"role": "system", "content": SYSTEM},
                      {"role": "user", "content": "Who was Marie Curie?"},
                      {"role": "assistant", "content": "A physicist born in Warsaw."},
                      {"role": "user", "content": "And what did she win?"}],
    "no user message": [{"role": "system", "content": SYSTEM}],
    # a short last turn: the span reaches back to the question before it
    "a short follow-up": [{"role": "user", "content": "Who was Marie Curie?"},
                          {"role": "assistant", "content": "A physicist born in Warsaw."},
                          {"role": "user", "content": "Thanks!"}],
}


@pytest.fixture(scope="module")
def generators(tmp_path_factory: pytest.TempPathFactory) -> dict[str, LocalGenerator]:
    root = tmp_path_factory.mktemp("gen-context")
    return {arch: LocalGenerator(build_tiny_model(root / arch, arch=arch, max_positions=512),
                                 window=512)
            for arch in ("llama", "gpt2")}


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


def observer_context(gen: LocalGenerator, messages: list[dict[str, str]],
                     needs: Needs = ASK) -> dict[int, Any]:
    """What the observer's context read hands a monitor for ``messages``."""
    state = gen.observer.start(messages, needs)
    context = gen.observer.extend(state, [], needs).context
    assert context is not None
    return dict(context)


def assert_same(got: Any, want: dict[int, Any]) -> None:
    assert got is not None and set(got) == set(want)
    for layer, vector in want.items():
        assert isinstance(got[layer], np.ndarray) and got[layer].dtype == np.float32
        np.testing.assert_allclose(got[layer], vector, atol=TOL, rtol=TOL)


def _record(gen: LocalGenerator, messages: list[dict[str, str]], needs: Needs,
            **options: Any) -> tuple[Recorder, Any]:
    recorder = Recorder(needs)
    with plugin_monitors(recorder=lambda: recorder) as host:
        guard = Guard.from_policy({"monitors": [{"id": "rec", "use": "recorder",
                                                 "action": "flag"}]},
                                  host=host, observer=gen.observer)
        stream = guarded_stream(guard, messages=messages, generator=gen,
                                **{"max_new_tokens": 8, **VARIED, **options})
        events = list(stream)
    return recorder, (stream, events)


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_guarded_generation_hands_the_observers_context_on_the_first_update_only(
        generators: dict[str, LocalGenerator], arch: str, name: str) -> None:
    """llama: the observer's written-out step; gpt2: its HF forward. The generator's prefill
    is the HF model's own forward: the same means to float noise, layer -1 included."""
    gen = generators[arch]
    messages = CONVERSATIONS[name]
    recorder, (stream, _) = _record(gen, messages, ASK)
    seen = recorder.seen
    assert len(seen) >= 3 and seen[0].first_index == 0 and all(f.generated for f in seen)
    assert stream.report is not None and not stream.report.errors
    assert_same(seen[0].context, observer_context(gen, messages))
    assert all(f.context is None for f in seen[1:])


def test_the_span_is_the_observers_span(generators: dict[str, LocalGenerator]) -> None:
    """The generator pools its prompt from the index the observer's span function gives."""
    gen = generators["llama"]
    for messages in CONVERSATIONS.values():
        start = prompt_start(lambda m: render_context(gen.hf_tokenizer, m), messages)
        ids, pool_from = gen.observer.context_span(messages, ASK)
        assert gen.context_start(messages) == start == pool_from
        assert gen.prompt_ids(messages) == ids


def test_monitors_that_do_not_ask_get_no_context_and_no_forward_is_added(
        generators: dict[str, LocalGenerator]) -> None:
    gen = generators["llama"]
    messages = CONVERSATIONS["system prompt"]
    forwards: dict[bool, int] = {}
    texts: dict[bool, str] = {}
    count = [0]

    def counted(*_: Any) -> None:
        count[0] += 1

    for asks in (False, True):
        count[0] = 0
        handle = gen.model.register_forward_hook(counted)
        try:
            needs = Needs(layers=frozenset(LAYERS), context=asks)
            recorder, (stream, _) = _record(gen, messages, needs)
        finally:
            handle.remove()
        forwards[asks] = count[0]
        texts[asks] = stream.report.released_text
        if not asks:
            assert all(f.context is None for f in recorder.seen)
    assert forwards[True] == forwards[False] and texts[True] == texts[False]


def test_unguarded_steps_carry_the_context_on_the_first_step(
        generators: dict[str, LocalGenerator]) -> None:
    gen = generators["gpt2"]
    messages = CONVERSATIONS["several turns"]
    steps = list(gen.steps(messages, needs=ASK, max_new_tokens=5, **VARIED))
    assert len(steps) >= 2
    assert_same(steps[0].context, observer_context(gen, messages))
    assert all(s.context is None for s in steps[1:])
    assert all(s.context is None for s in gen.steps(messages, needs=Needs(layers=frozenset(
        LAYERS)), max_new_tokens=3, **VARIED))


def test_a_stop_sequence_inside_the_first_token_keeps_its_context(
        generators: dict[str, LocalGenerator]) -> None:
    """The stop filter cuts the first step's text; the cut step still carries the context."""
    gen = generators["llama"]
    messages = CONVERSATIONS["one user message"]
    firsts = {seed: next(iter(gen.steps(messages, max_new_tokens=1, temperature=1.0,
                                        seed=seed))).text for seed in range(20)}
    seed, first = next((s, t) for s, t in firsts.items() if len(t) >= 2 and t[1:] not in t[:1])
    recorder, (stream, _) = _record(gen, messages, ASK, stop=first[1:], seed=seed)
    assert stream.report.released_text == first[:1] and len(recorder.seen) == 1
    assert_same(recorder.seen[0].context, observer_context(gen, messages))


def test_a_step_context_is_checked_and_goes_with_the_first_step_only(
        generators: dict[str, LocalGenerator]) -> None:
    vector = np.zeros(32, dtype=np.float32)
    with pytest.raises(ValueError, match=r"StreamStep.context comes with .* must carry its "
                                         r"tokens"):
        StreamStep(text="Hi", context={0: vector})
    with pytest.raises(ValueError, match=r"StreamStep.context\[0\] must be one vector"):
        StreamStep(text="Hi", tokens=[StepToken(5, "Hi")], context={0: np.zeros((2, 32))})
    with pytest.raises(TypeError, match=r"StreamStep.context keys must be layer numbers"):
        StreamStep(text="Hi", tokens=[StepToken(5, "Hi")], context={"0": vector})  # type: ignore[dict-item]
    recorder = Recorder(ASK)
    with plugin_monitors(recorder=lambda: recorder) as host:
        guard = Guard.from_policy({"monitors": [{"id": "rec", "use": "recorder",
                                                 "action": "flag"}]},
                                  host=host, observer=generators["llama"].observer)
        session = guard.session([{"role": "user", "content": "Hi"}])
        session.feed(StreamStep(text="A", tokens=[StepToken(5, "A")], context={0: vector}))
        with pytest.raises(GuardrailError, match=r"StreamStep.context comes with a stream's "
                                                 r"first step only"):
            session.feed(StreamStep(text="B", tokens=[StepToken(6, "B")], context={0: vector}))
        # steps that were all waiting (feed_many): the first one's context, as feed gives it
        session = guard.session([{"role": "user", "content": "Hi"}])
        session.feed_many([StreamStep(text="C", tokens=[StepToken(7, "C")], context={2: vector}),
                           StreamStep(text="D", tokens=[StepToken(8, "D")])])
    assert [f.context for f in recorder.seen] == [{0: vector}, {2: vector}, None]


# -- a harm head with a prompt term ----------------------------------------------------------

HARM_LAYERS = (1, 3)
HIDDEN = 32
HALFLIFE = 12.0
K = 3


def _harm_head(prompt: np.ndarray | None, response_scale: float, seed: int = 0) -> DualHead:
    """The shipped shape: the pooled half on a one-unit MLP whose shifted GELU is the identity
    (tests/harmful_content/test_harm_prompt_term.py); ``response_scale`` 0: a constant logit."""
    g = torch.Generator().manual_seed(seed)
    width = len(HARM_LAYERS) * HIDDEN
    head = DualHead(2 * width, dropout=0.0, seed=0, sequence_hidden=1)
    first, last = head.sequence_layers()
    with torch.no_grad():
        first.weight.zero_()
        first.weight[0, width:] = torch.randn(width, generator=g) * response_scale
        first.bias.fill_(60.0)
        last.weight.copy_(torch.tensor([[0.0], [1.0]]))
        last.bias.copy_(torch.tensor([0.0, -60.0]))
    if prompt is not None:
        head.set_prompt_weight(prompt)
    return head.eval()


def _harm_guard(gen: LocalGenerator, folder: Path, head: DualHead, threshold: float,
                action: str = "halt") -> Guard:
    config: dict[str, Any] = {
        "base_model": "tiny", "layer": HARM_LAYERS[0], "layers": list(HARM_LAYERS),
        "pooling": "prefix_ema", "halflife": HALFLIFE, "dims": {"hidden_size": HIDDEN},
        "threshold": threshold, "rule": {"kind": "count", "k": K}}
    if head.prompt_size is not None:  # a clamp wide enough to let every term through
        config["prompt_feature"] = "context_mean"
        config["prompt_term"] = {"neutral": 0.0, "low": -1e6, "high": 1e6}
    weights = save_probe(folder, head, config, name="harm")
    policy = {"release": {"hold_back_tokens": 0},
              "monitors": [{"id": "harm", "use": "harmful-content", "action": action,
                            "threshold": threshold, "rule": {"kind": "count", "k": K},
                            "options": {"weights": str(weights)}}]}
    return Guard.from_policy(policy, observer=gen.observer)


def _term(head: DualHead, context: dict[int, Any]) -> float:
    stored = head.prompt_weight.double().numpy()
    return sum(float(stored[j] @ np.asarray(context[layer], dtype=np.float64))
               for j, layer in enumerate(HARM_LAYERS))


def _prompt_weight(gen: LocalGenerator, messages: list[dict[str, str]], term: float
                   ) -> np.ndarray:
    """A prompt weight whose term is ``term`` on the observer's context of ``messages``."""
    context = observer_context(gen, messages, Needs(layers=frozenset(HARM_LAYERS), context=True))
    raw = np.random.default_rng(1).standard_normal((len(HARM_LAYERS), HIDDEN))
    return raw * (term / sum(float(raw[j] @ context[layer])
                             for j, layer in enumerate(HARM_LAYERS)))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 + 0.5 * np.tanh(0.5 * z)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_generated_answer_scores_as_its_own_rows_plus_the_observers_prompt_term(
        generators: dict[str, LocalGenerator], tmp_path: Path, arch: str) -> None:
    """Each streamed score is sigmoid(the head's logit of the generator's own step rows + the
    term computed from the observer's context read), to float noise."""
    gen = generators[arch]
    messages = CONVERSATIONS["system prompt"]
    head = _harm_head(_prompt_weight(gen, messages, 4.0), 0.3)
    guard = _harm_guard(gen, tmp_path, head, threshold=0.5, action="flag")  # never halts
    session = guard.session(messages, record_scores=True)
    stream = guarded_stream(guard, messages=messages, generator=gen, session=session,
                            max_new_tokens=10, **VARIED)
    list(stream)
    assert stream.report is not None and not stream.report.errors
    ids = stream.token_ids
    assert len(ids) >= 4
    prompt = gen.prompt_ids(messages)
    with torch.inference_mode():
        out = gen.model(input_ids=torch.tensor([prompt + ids]), output_hidden_states=True)
    rows = {layer: out.hidden_states[gen.hidden_index(layer)][0, len(prompt) - 1:-1].float()
            for layer in HARM_LAYERS}  # the state that produced each token
    states = stack_states(rows, HARM_LAYERS, "prefix_ema", HALFLIFE)
    with torch.inference_mode():
        z = head.prefix_logits(states).double()
    context = observer_context(gen, messages, Needs(layers=frozenset(HARM_LAYERS), context=True))
    want = _sigmoid((z[:, 1] - z[:, 0]).numpy() + _term(head, context))
    streamed = [s for _, s in stream.report.scores["harm"]]
    assert streamed == pytest.approx(list(want), abs=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_prompt_term_halts_the_generation_where_the_observer_read_stream_halts(
        generators: dict[str, LocalGenerator], tmp_path: Path, arch: str) -> None:
    """A head whose response half is constant: the prompt term alone decides. With it both
    streams halt on the rule's k-th token; with the term's sign turned, neither halts."""
    gen = generators[arch]
    messages = CONVERSATIONS["several turns"]
    reports: dict[tuple[float, str], Any] = {}
    for term in (3.0, -3.0):
        head = _harm_head(_prompt_weight(gen, messages, term), 0.0)
        guard = _harm_guard(gen, tmp_path / str(term), head, threshold=0.8)  # sigmoid(3) = 0.95
        stream = guarded_stream(guard, messages=messages, generator=gen, max_new_tokens=10,
                                **VARIED)
        events = list(stream)
        assert not any(isinstance(e, Error) for e in events)
        reports[(term, "generated")] = stream.report
        text = gen.generate(messages, max_new_tokens=10, **VARIED)
        session = guard.session(messages)
        for i in range(0, len(text), 5):
            session.feed(text[i:i + 5])
        reports[(term, "observed")] = session.finish()
    for path in ("generated", "observed"):
        lifted, lowered = reports[(3.0, path)], reports[(-3.0, path)]
        assert not lifted.errors and not lowered.errors
        assert lifted.halted and lifted.halt is not None and lifted.halt.at == K - 1
        assert not lowered.halted
