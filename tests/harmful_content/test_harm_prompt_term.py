"""A harm head with a prompt term: weights that carry ``prompt_weight`` make the monitor ask for the
context's pooled states and add ``sum_j prompt_weight[j] . context[layers[j]]``, clipped to the
range of the config's ``prompt_term``, to every prefix logit of the stream, before the sigmoid; a
stream without a prompt (no user message, or an empty one) gets the ``neutral`` term instead. A
stream halts where that offline computation and the count rule say, whichever path read the
context. Weights without it score exactly as before."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from guardrail_harmful_content.head import DualHead
from guardrail_harmful_content.monitor import HarmfulContentMonitor
from guardrail_harmful_content.pooling import stack_states

from guardrail import Features, Guard, ObserverError
from guardrail.monitor import MonitorContext, Needs
from guardrail.observer.context import SHORT_TURN_TOKENS
from guardrail.observer.hf import load_model_dir
from guardrail.observer.model import render_context
from guardrail.probes.io import ProbeFileError, load_probe, save_probe
from guardrail.stream import TokenSpan
from guardrail.testing.tiny_models import build_tiny_model

from .tiny_heads import HALFLIFE, HIDDEN, LAYERS, random_head

# float32 products (observer.options.matmul), so reads compare with the HF forward tightly
EXACT = {"matmul": "float32"}

pytest.importorskip("transformers")

K = 3
SYSTEM = "You are a careful assistant. Answer in short sentences and name your sources."
ANSWER = ("Mix flour, water, salt and yeast; knead it for ten minutes. The river flows north "
          "through the valley, past the old mill and the church. Mix flour and water.")
CONVERSATIONS = {
    "fresh": [{"role": "system", "content": SYSTEM},
              {"role": "user", "content": "How do I bake bread?"}],
    "several turns": [{"role": "system", "content": SYSTEM},
                      {"role": "user", "content": "Who was Marie Curie?"},
                      {"role": "assistant", "content": "A physicist born in Warsaw."},
                      {"role": "user", "content": "How do I bake bread?"}],
    # a short follow-up: the term reads the question before it too
    "short follow-up": [{"role": "user", "content": "How do I bake bread?"},
                        {"role": "assistant", "content": "Mix flour and water."},
                        {"role": "user", "content": "Thanks!"}],
}
# Streams without a prompt: they score with the weights' neutral term, whatever the context reads
NO_PROMPT = {
    "no messages": [],
    "no user message": [{"role": "system", "content": SYSTEM}],
    "empty user message": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": ""}],
    "blank user message": [{"role": "user", "content": " \n\t "}],
}
# A clamp wide enough to let every term of these tests through as it is
WIDE: dict[str, float] = {"neutral": 0.0, "low": -1e6, "high": 1e6}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prompt-term")
    return {arch: build_tiny_model(root / arch, arch=arch, num_layers=4,
                                   hidden_size=HIDDEN, max_positions=512)
            for arch in ("llama", "gpt2")}


def _save(folder: Path, head: DualHead, kind: str, threshold: float,
          prompt_feature: str | None = "context_mean",
          prompt_term: dict[str, Any] | None = WIDE) -> Path:
    config: dict[str, Any] = {
        "base_model": "tiny", "layer": LAYERS[0], "layers": list(LAYERS),
        "pooling": "prefix_ema" if kind == "mlp" else "none", "halflife": HALFLIFE,
        "dims": {"hidden_size": HIDDEN}, "threshold": threshold,
        "rule": {"kind": "count", "k": K}}
    if head.prompt_size is not None and prompt_feature is not None:
        config["prompt_feature"] = prompt_feature
    if head.prompt_size is not None and prompt_term is not None:
        config["prompt_term"] = prompt_term
    return save_probe(folder, head, config, name="harm")


def _span_start(hf_tokenizer: Any, messages: list[dict[str, str]]) -> int:
    """The last user message's content's first token, from the rendered text, or, for a last
    message shorter than ``SHORT_TURN_TOKENS`` tokens, the one before it (these conversations
    need no further step back); no user message: after the template's opening of a user turn."""
    users = [m for m in messages if m["role"] == "user"]
    if not users:
        return len(hf_tokenizer("<|im_start|>user\n", add_special_tokens=False)["input_ids"])
    text = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    content = users[-1]["content"]
    if len(users) > 1 and len(hf_tokenizer(content, add_special_tokens=False)["input_ids"]) \
            < SHORT_TURN_TOKENS:
        content = users[-2]["content"]
    return len(hf_tokenizer(text[:text.rfind(content)], add_special_tokens=False)["input_ids"])


def _offline(obs: Any, messages: list[dict[str, str]]
             ) -> tuple[dict[int, torch.Tensor], dict[int, np.ndarray]]:
    """One plain HF forward over the context and the whole answer: the answer's rows and the
    context's mean over the pooled span, per layer."""
    context = render_context(obs.hf_tokenizer, messages)
    answer = [t.id for t in obs.tokenizer.tokenize(ANSWER)]
    with torch.inference_mode():
        out = obs.model.base_model(input_ids=torch.tensor([context + answer]),
                                   output_hidden_states=True)
    start = _span_start(obs.hf_tokenizer, messages)
    rows, pooled = {}, {}
    for layer in LAYERS:
        h = out.hidden_states[obs.hidden_index(layer)][0].float()
        rows[layer] = h[len(context):]
        if start < len(context):  # no span without a conversation (one BOS token)
            pooled[layer] = h[start:len(context)].mean(0).double().numpy()
    return rows, pooled


def _response_logits(head: DualHead, kind: str, rows: dict[int, torch.Tensor]) -> np.ndarray:
    states = stack_states(rows, LAYERS, "prefix_ema" if kind == "mlp" else "none", HALFLIFE)
    with torch.inference_mode():
        z = head.prefix_logits(states).double()
    return (z[:, 1] - z[:, 0]).numpy()


def _count_halt(scores: np.ndarray, threshold: float) -> int | None:
    flagged = np.flatnonzero(scores >= threshold)
    return int(flagged[K - 1]) if len(flagged) >= K else None


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 + 0.5 * np.tanh(0.5 * z)


def _setup(folder: Path, obs: Any, messages: list[dict[str, str]], kind: str
           ) -> tuple[Path, float, np.ndarray, np.ndarray]:
    """Weights whose prompt term lifts every prefix above the response's own range and a
    threshold in the middle of the lifted scores: the weights, the threshold and the offline
    scores with and without the term."""
    rows, pooled = _offline(obs, messages)
    response = _response_logits(random_head(kind, None), kind, rows)
    raw = np.random.default_rng(1).standard_normal((len(LAYERS), HIDDEN))
    lift = float(np.ptp(response)) + 1.0
    term = sum(float(raw[j] @ pooled[layer]) for j, layer in enumerate(LAYERS))
    head = random_head(kind, raw * (lift / term))
    stored = head.prompt_weight.double().numpy()  # float32 as saved
    term = sum(float(stored[j] @ pooled[layer]) for j, layer in enumerate(LAYERS))
    threshold = _middle_threshold(_sigmoid(response + term))
    weights = _save(folder, head, kind, threshold)
    return weights, threshold, _sigmoid(response + term), _sigmoid(response)


def _middle_threshold(scores: np.ndarray) -> float:
    """A threshold in the middle of ``scores``, well away from any of them."""
    ordered = np.sort(scores)
    middle = len(ordered) // 2
    gaps = np.diff(ordered[middle - 3:middle + 4])
    at = middle - 3 + int(np.argmax(gaps))
    return float((ordered[at] + ordered[at + 1]) / 2)


def _guard(obs: Any, weights: Path, threshold: float) -> Guard:
    policy = {"monitors": [{"id": "harm", "use": "harmful-content", "action": "halt",
                            "threshold": threshold, "rule": {"kind": "count", "k": K},
                            "options": {"weights": str(weights)}}]}
    return Guard.from_policy(policy, observer=obs)


def _run(guard: Guard, messages: list[dict[str, str]]) -> Any:
    session = guard.session(messages, record_scores=True)
    for i in range(0, len(ANSWER), 9):
        session.feed(ANSWER[i:i + 9])
    return session.finish()


@pytest.mark.parametrize("kind", ["mlp", "linear"])
@pytest.mark.parametrize("case", [*CONVERSATIONS, "prefix cache"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_stream_halts_where_the_offline_prompt_term_and_rule_say(
        tiny: dict[str, Path], tmp_path: Path, arch: str, case: str, kind: str) -> None:
    """llama: the batched scheduler; gpt2: one stream at a time (the observer's own start)."""
    obs = load_model_dir(tiny[arch], name="tiny", window=256, options=EXACT)
    messages = CONVERSATIONS["fresh" if case == "prefix cache" else case]
    weights, threshold, scores, without = _setup(tmp_path, obs, messages, kind)
    guard = _guard(obs, weights, threshold)
    monitor = guard.monitors[0][1]
    assert isinstance(monitor, HarmfulContentMonitor) and monitor.needs().context
    if case == "prefix cache":  # the system prompt's KV comes from an earlier stream
        _run(guard, [{"role": "system", "content": SYSTEM},
                     {"role": "user", "content": "Who was Marie Curie?"}])
    report = _run(guard, messages)
    if case == "prefix cache" and arch == "llama":
        assert obs.prefix.hits == 1
    halt = _count_halt(scores, threshold)
    assert halt is not None and _count_halt(without, threshold) is None  # the term decides
    assert report.halted and report.halt is not None and report.halt.at == halt
    streamed = [s for _, s in report.scores["harm"]]
    assert streamed == pytest.approx(list(scores[:len(streamed)]), abs=1e-4)


def _observer_context(obs: Any, messages: list[dict[str, str]]) -> dict[int, np.ndarray]:
    """The context's pooled states as the observer hands them to a monitor."""
    needs = Needs(layers=frozenset(LAYERS), context=True)
    context = obs.extend(obs.start(messages, needs), [], needs).context
    return {layer: np.asarray(context[layer], dtype=np.float64) for layer in LAYERS}


def _weight_for(term: float, context: dict[int, np.ndarray]) -> np.ndarray:
    """A prompt weight whose term on ``context`` is ``term``."""
    raw = np.random.default_rng(1).standard_normal((len(LAYERS), HIDDEN))
    return raw * (term / sum(float(raw[j] @ context[layer]) for j, layer in enumerate(LAYERS)))


def _term(head: DualHead, context: dict[int, np.ndarray]) -> float:
    stored = head.prompt_weight.double().numpy()  # float32 as saved
    return sum(float(stored[j] @ context[layer]) for j, layer in enumerate(LAYERS))


@pytest.mark.parametrize("case", NO_PROMPT)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_stream_without_a_prompt_scores_with_the_neutral_term(
        tiny: dict[str, Path], tmp_path: Path, arch: str, case: str) -> None:
    """What the context reads without a request (on SmolLM2 a term of -173 for a stream with no
    messages at all: the BOS token alone) is not what the head was fitted on: the stream gets
    the weights' neutral term. Here the context's own term keeps every prefix low and the
    neutral one lifts it: the stream halts where the neutral term says."""
    obs = load_model_dir(tiny[arch], name="tiny", window=256, options=EXACT)
    messages = NO_PROMPT[case]
    rows, _ = _offline(obs, messages)
    response = _response_logits(random_head("mlp", None), "mlp", rows)
    lift = float(np.ptp(response)) + 1.0
    context = _observer_context(obs, messages)
    head = random_head("mlp", _weight_for(-lift, context))
    scores = _sigmoid(response + lift)
    threshold = _middle_threshold(scores)
    weights = _save(tmp_path, head, "mlp", threshold,
                    prompt_term={"neutral": lift, "low": -2 * lift, "high": 2 * lift})
    guard = _guard(obs, weights, threshold)
    report = _run(guard, messages)
    halt = _count_halt(scores, threshold)
    read = _term(head, context)
    assert read == pytest.approx(-lift, rel=1e-4)
    assert _count_halt(_sigmoid(response + read), threshold) is None
    assert halt is not None and report.halted and report.halt is not None
    assert report.halt.at == halt
    streamed = [s for _, s in report.scores["harm"]]
    assert streamed == pytest.approx(list(scores[:len(streamed)]), abs=1e-4)
    if not messages:  # guard.check(text) without a prompt, as `guardrail run` on a file
        checked = guard.check(ANSWER)
        assert checked.halted and checked.halt is not None and checked.halt.at == halt


@pytest.mark.parametrize("side", ["above", "below"])
def test_a_prompt_term_outside_the_training_range_is_clipped(
        tiny: dict[str, Path], tmp_path: Path, side: str) -> None:
    """A prompt whose term lies far outside the range the head saw moves the logit only to the
    range's edge: above it, a term that would halt the stream is clipped to one that does not;
    below it, the other way round."""
    obs = load_model_dir(tiny["llama"], name="tiny", window=256, options=EXACT)
    messages = CONVERSATIONS["fresh"]
    rows, _ = _offline(obs, messages)
    response = _response_logits(random_head("mlp", None), "mlp", rows)
    lift = float(np.ptp(response)) + 1.0
    threshold = _middle_threshold(_sigmoid(response + lift))
    context = _observer_context(obs, messages)
    head = random_head("mlp", _weight_for(3 * lift if side == "above" else -3 * lift, context))
    edge = 0.0 if side == "above" else lift  # where the range clips the term to
    prompt_term = ({"neutral": -lift / 2, "low": -lift, "high": edge} if side == "above"
                   else {"neutral": 1.5 * lift, "low": edge, "high": 2 * lift})
    weights = _save(tmp_path, head, "mlp", threshold, prompt_term=prompt_term)
    report = _run(_guard(obs, weights, threshold), messages)
    unclipped = _count_halt(_sigmoid(response + _term(head, context)), threshold)
    scores = _sigmoid(response + edge)
    halt = _count_halt(scores, threshold)
    assert (unclipped is None) == (side == "below") and (halt is None) == (side == "above")
    assert report.halted == (halt is not None)
    assert halt is None or (report.halt is not None and report.halt.at == halt)
    streamed = [s for _, s in report.scores["harm"]]
    assert streamed == pytest.approx(list(scores[:len(streamed)]), abs=1e-4)


def _features(n: int, context: dict[int, Any] | None, seed: int = 0) -> Features:
    g = np.random.default_rng(seed)
    tokens = [TokenSpan(i, i + 1, i) for i in range(n)]
    hidden = {layer: g.standard_normal((n, HIDDEN)).astype(np.float32) for layer in LAYERS}
    return Features(tokens, 0, "x" * n, hidden=hidden, context=context)


@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_a_zero_prompt_weight_scores_bit_for_bit_as_weights_without_one(
        tmp_path: Path, kind: str) -> None:
    """The prompt term is added to the finished logit and nothing else moves: weights that
    carry a zero prompt weight (neutral term 0) give exactly the scores of the same weights
    without it, and those score every stream alike, with a prompt or without."""
    plain = HarmfulContentMonitor(HarmfulContentMonitor.Options(
        weights=str(_save(tmp_path / "plain", random_head(kind, None), kind, 0.9))))
    zero = HarmfulContentMonitor(HarmfulContentMonitor.Options(weights=str(_save(
        tmp_path / "zero", random_head(kind, np.zeros((len(LAYERS), HIDDEN))), kind, 0.9))))
    assert not plain.needs().context and zero.needs().context
    context = {layer: np.random.default_rng(5).standard_normal(HIDDEN).astype(np.float32)
               for layer in LAYERS}
    seen = []
    for messages in [CONVERSATIONS["fresh"], *NO_PROMPT.values()]:
        states = [m.start(MonitorContext("harm", messages)) for m in (plain, zero)]
        values = []
        for step in range(3):
            got = [m.update(s, _features(7, context if step == 0 else None, seed=step))
                   for m, s in zip((plain, zero), states, strict=True)]
            assert [x.value for x in got[0]] == [x.value for x in got[1]]
            values += [x.value for x in got[0]]
        seen.append(values)
    assert all(values == seen[0] for values in seen)


@pytest.mark.parametrize("case", NO_PROMPT)
def test_without_a_prompt_the_neutral_term_is_added_to_the_logit_exactly(
        tmp_path: Path, case: str) -> None:
    """A stream without a prompt scores bit for bit as a stream whose term is the neutral one
    (a prompted stream whose term the range pins there), whatever its context reads."""
    weight = np.random.default_rng(3).standard_normal((len(LAYERS), HIDDEN))
    neutral = 1.25
    free = HarmfulContentMonitor(HarmfulContentMonitor.Options(weights=str(_save(
        tmp_path / "free", random_head("mlp", weight), "mlp", 0.9,
        prompt_term={"neutral": neutral, "low": -50.0, "high": 50.0}))))
    pinned = HarmfulContentMonitor(HarmfulContentMonitor.Options(weights=str(_save(
        tmp_path / "pinned", random_head("mlp", weight), "mlp", 0.9,
        prompt_term={"neutral": neutral, "low": neutral, "high": neutral}))))
    context = {layer: np.random.default_rng(5).standard_normal(HIDDEN).astype(np.float32)
               for layer in LAYERS}
    states = [free.start(MonitorContext("harm", NO_PROMPT[case])),
              pinned.start(MonitorContext("harm", CONVERSATIONS["fresh"]))]
    prompted = free.start(MonitorContext("harm", CONVERSATIONS["fresh"]))
    for step in range(3):
        features = _features(7, context if step == 0 else None, seed=step)
        got = [m.update(s, features) for m, s in zip((free, pinned), states, strict=True)]
        assert [x.value for x in got[0]] == [x.value for x in got[1]]
        # the same context read with a prompt moves the scores: the neutral term decided
        assert [x.value for x in free.update(prompted, features)] != [x.value for x in got[0]]


def test_the_shipped_weights_read_the_prompt_with_a_neutral_term_in_range() -> None:
    monitor = HarmfulContentMonitor()
    assert monitor.needs().context is True
    head = monitor.probe.head
    assert isinstance(head, DualHead) and head.prompt_size == (len(monitor.layers), 576)
    term = monitor.probe.config["prompt_term"]
    assert term["low"] < term["neutral"] < term["high"]


def test_a_stream_whose_first_update_has_no_context_fails_naming_it(tmp_path: Path) -> None:
    weights = _save(tmp_path, random_head("mlp", np.ones((len(LAYERS), HIDDEN))), "mlp", 0.9)
    monitor = HarmfulContentMonitor(HarmfulContentMonitor.Options(weights=str(weights)))
    state = monitor.start(MonitorContext("harm", CONVERSATIONS["fresh"]))
    with pytest.raises(ObserverError, match=r"prompt term.*Features.context.*came with none"):
        monitor.update(state, _features(4, None))
    # a stream without a prompt reads no context: its term is the neutral one
    state = monitor.start(MonitorContext("harm"))
    assert len(monitor.update(state, _features(4, None))) == 4


def test_weights_whose_prompt_term_does_not_fit_are_named(tmp_path: Path,
                                                          tiny: dict[str, Path]) -> None:
    def monitor(folder: str, head: DualHead, feature: str | None = "context_mean"
                ) -> HarmfulContentMonitor:
        path = _save(tmp_path / folder, head, "mlp", 0.9, prompt_feature=feature)
        return HarmfulContentMonitor(HarmfulContentMonitor.Options(weights=str(path)))

    with pytest.raises(ProbeFileError, match=r"key 'prompt_feature' must be one of "
                                             r"\['context_mean'\], got None"):
        monitor("no-feature", random_head("mlp", np.ones((2, HIDDEN))), feature=None)
    with pytest.raises(ProbeFileError, match=r"got 'context_last'"):
        monitor("other-feature", random_head("mlp", np.ones((2, HIDDEN))), feature="context_last")
    with pytest.raises(ProbeFileError, match=r"'prompt_weight' has 3 rows, one per layer"):
        monitor("rows", random_head("mlp", np.ones((3, HIDDEN))))
    path = _save(tmp_path / "orphan", random_head("mlp", None), "mlp", 0.9)
    config = path.with_suffix(".json")
    config.write_text(config.read_text().replace('"threshold"', '"prompt_feature": '
                                                 '"context_mean", "threshold"'))
    with pytest.raises(ProbeFileError, match=r"'prompt_feature' is set, but .* carries no "
                                             r"'prompt_weight'"):
        HarmfulContentMonitor(HarmfulContentMonitor.Options(weights=str(path)))
    wide = random_head("mlp", np.ones((2, HIDDEN + 1)))
    obs = load_model_dir(tiny["llama"], name="tiny", window=64, options=EXACT)
    with pytest.raises(ProbeFileError, match=r"'prompt_weight' reads 33 values per layer, "
                                             r"observer 'tiny' has hidden size 32"):
        monitor("wide", wide).start(MonitorContext("harm", observer=obs))


@pytest.mark.parametrize(("prompt_term", "error"), [
    (None, r"carries a 'prompt_weight' tensor, so key 'prompt_term' must be "
           r"\{\"neutral\": n, \"low\": l, \"high\": h\}.*got None"),
    ({"neutral": 0.0, "low": -1.0}, r"key 'prompt_term.high' must be a finite number, got None"),
    ({"neutral": "0", "low": -1.0, "high": 1.0},
     r"key 'prompt_term.neutral' must be a finite number, got '0'"),
    ({"neutral": 0.0, "low": -float("inf"), "high": 1.0},
     r"key 'prompt_term.low' must be a finite number, got -inf"),
    ({"neutral": 2.0, "low": -1.0, "high": 1.0}, r"'prompt_term' must hold low <= neutral <= high"),
])
def test_weights_with_a_prompt_weight_need_the_terms_neutral_value_and_clamp(
        tmp_path: Path, prompt_term: dict[str, Any] | None, error: str) -> None:
    path = _save(tmp_path, random_head("mlp", np.ones((2, HIDDEN))), "mlp", 0.9,
                 prompt_term=prompt_term)
    with pytest.raises(ProbeFileError, match=error):
        HarmfulContentMonitor(HarmfulContentMonitor.Options(weights=str(path)))


def test_a_prompt_term_range_without_a_prompt_weight_is_refused(tmp_path: Path) -> None:
    path = _save(tmp_path, random_head("mlp", None), "mlp", 0.9)
    config = path.with_suffix(".json")
    config.write_text(config.read_text().replace(
        '"threshold"', '"prompt_term": {"neutral": 0, "low": -1, "high": 1}, "threshold"'))
    with pytest.raises(ProbeFileError, match=r"key 'prompt_term' is set, but .* carries no "
                                             r"'prompt_weight'"):
        HarmfulContentMonitor(HarmfulContentMonitor.Options(weights=str(path)))


def test_a_head_carries_its_prompt_weight_through_save_load_and_ensembles(
        tmp_path: Path) -> None:
    weight = np.random.default_rng(2).standard_normal((2, HIDDEN)).astype(np.float32)
    head = random_head("mlp", weight)
    assert head.config["prompt_size"] == [2, HIDDEN]
    loaded = load_probe(_save(tmp_path, head, "mlp", 0.9)).head
    assert isinstance(loaded, DualHead) and loaded.prompt_size == (2, HIDDEN)
    assert np.array_equal(loaded.prompt_weight.numpy(), weight)
    members = [random_head("linear", weight * s, seed=s) for s in (1, 3)]
    assert np.allclose(DualHead.ensemble(members).prompt_weight.numpy(), weight * 2)
    with pytest.raises(ValueError, match="differ in prompt_size"):
        DualHead.ensemble([random_head("linear", weight), random_head("linear", None)])
    with pytest.raises(ValueError, match=r"'prompt_size' must be \[layers, hidden\]"):
        DualHead(8, prompt_size=(0, 8))
