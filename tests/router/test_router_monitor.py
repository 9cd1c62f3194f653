"""The router monitor inside a Guard: per-token scores from the step that produced each token,
route events, and its place in the default policy."""

from __future__ import annotations

import json
from pathlib import Path

import guardrail_router.plugin as router_plugin
import pytest
import torch
from guardrail_router.head import RouterHead
from guardrail_router.lm import load_chat_lm
from guardrail_router.monitor import DEFAULT_WEIGHTS, RouterMonitor
from transformers import AutoModelForCausalLM, AutoTokenizer

from guardrail import Guard, Route
from guardrail.guard import default_policy
from guardrail.observer.model import render_context
from guardrail.plugins import PluginHost
from guardrail.probes.io import save_probe
from guardrail.testing import split_text

TEXT = "The capital of France is Paris. It is a large city."
PROMPT = "Tell me about Paris."


@pytest.fixture(scope="module")
def router_weights(tiny_pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    small = load_chat_lm(tiny_pair[0])
    head = RouterHead(small.model.config.hidden_size, small.embedding, top_k=8,
                      width=16, blocks=1, seed=5)
    return save_probe(tmp_path_factory.mktemp("router-weights"), head,
                      {"base_model": "small", "layer": -1, "threshold": 0.5}, name="router")


def _host() -> PluginHost:
    host = PluginHost(autoload=False)
    host.register(router_plugin, name="router-test")
    return host


def _guard(tiny_pair: tuple[Path, Path], weights: Path, **spec: object) -> Guard:
    monitor = {"id": "router", "use": "router", "options": {"weights": str(weights)}, **spec}
    policy = {"observer": {"model": str(tiny_pair[0]), "window": 256,
                           "options": {"matmul": "float32"}}, "monitors": [monitor]}
    return Guard.from_policy(policy, host=_host())


def test_scores_use_the_state_before_each_token(tiny_pair: tuple[Path, Path],
                                                router_weights: Path) -> None:
    guard = _guard(tiny_pair, router_weights, threshold=0.99)
    session = guard.session(prompt=PROMPT, record_scores=True)
    for delta in split_text(TEXT, [3, 7]):
        session.feed(delta)
    report = session.finish()
    got = dict(report.scores["router"])
    # independent path: one full forward over prompt + answer, shifted by hand
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair[0])
    model = AutoModelForCausalLM.from_pretrained(tiny_pair[0]).eval()
    context = render_context(tokenizer, [{"role": "user", "content": PROMPT}])
    answer = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model(torch.tensor([context + answer]), output_hidden_states=True)
    hidden, logits = out.hidden_states[-1][0], out.logits[0]
    head = guard.monitors[0][1]._loaded.head  # type: ignore[attr-defined]
    p = len(context)
    with torch.no_grad():
        expected = {
            j: float(head.score(hidden[p + j - 1 : p + j], torch.tensor([answer[j]]),
                                torch.topk(logits[p + j - 1 : p + j], 8, dim=-1).values)[0])
            for j in range(1, len(answer))
        }
    assert sorted(got) == list(range(1, len(answer)))  # the first token has no earlier state
    for j, value in expected.items():
        assert got[j] == pytest.approx(value, abs=1e-4)


def test_route_action_cuts_the_stream_where_the_router_fires(tiny_pair: tuple[Path, Path],
                                                             router_weights: Path) -> None:
    guard = _guard(tiny_pair, router_weights, threshold=0.0, action="route",
                   route_to={"model": "large"})
    session = guard.session(prompt=PROMPT, can_route=True)
    events = session.feed(TEXT + " ")
    routes = [e for e in events if isinstance(e, Route)]
    assert len(routes) == 1
    offsets = session.token_offsets()
    assert routes[0].at == 1 and routes[0].at_char == offsets[1][0]
    assert routes[0].target["model"] == "large"


def test_missing_weights_name_the_file(tmp_path: Path) -> None:
    from guardrail.errors import PolicyError

    policy = {"monitors": [{"id": "r", "use": "router",
                            "options": {"weights": str(tmp_path / "none.safetensors")}}]}
    with pytest.raises(PolicyError, match="none.json"):
        Guard.from_policy(policy, host=_host())


@pytest.mark.skipif(not DEFAULT_WEIGHTS.exists(), reason="no shipped router weights")
def test_default_policy_flags_with_the_shipped_flag_threshold() -> None:
    spec = next(m for m in default_policy(_host()).monitors if m.use == "router")
    config = json.loads(DEFAULT_WEIGHTS.with_suffix(".json").read_text())
    assert spec.action == "flag" and spec.threshold is None  # the monitor's flag default
    assert RouterMonitor.default_thresholds["flag"] == pytest.approx(config["flag_threshold"])
    # on the held-out tokens flags are rarer than routes and more often right
    flag, route = config["metrics"]["flag"]["test"], config["metrics"]["test"]
    positives = config["splits"]["test"]["positives"] / config["splits"]["test"]["tokens"]
    route_precision = route["test_recall"] * positives / route["test_route_rate"]
    assert flag["positive_rate"] < route["test_route_rate"] / 2
    assert flag["precision"] > route_precision
    # a policy entry without a threshold routes at the routing one
    assert RouterMonitor.default_threshold == pytest.approx(config["threshold"])
    assert DEFAULT_WEIGHTS.stat().st_size < 20 * 2**20
    assert config["splits"]["test"]["questions"] > 0 and "test" in config["metrics"]


def test_generator_steps_are_scored_without_a_shift(tiny_pair: tuple[Path, Path],
                                                    router_weights: Path) -> None:
    """An adapter that owns the small model sends, for each token, the step that produced it."""
    from guardrail import StepToken, StreamStep

    guard = _guard(tiny_pair, router_weights, threshold=0.99)
    head = guard.monitors[0][1]
    session = guard.session(prompt=PROMPT, record_scores=True)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 32, generator=g)
    logits = torch.randn(3, guard.observer.hf_tokenizer.vocab_size + 3, generator=g)
    tokens = [StepToken(40, "The"), StepToken(41, " cap"), StepToken(42, "ital")]
    session.feed(StreamStep(text="The capital", tokens=tokens, hidden={-1: hidden},
                            logits=logits))
    report = session.finish()
    loaded = head._loaded.head  # type: ignore[attr-defined]
    with torch.no_grad():
        expected = loaded.score(hidden, torch.tensor([40, 41, 42]),
                                torch.topk(logits, 8, dim=-1).values).tolist()
    assert [i for i, _ in report.scores["router"]] == [0, 1, 2]
    assert [v for _, v in report.scores["router"]] == pytest.approx(expected, abs=1e-5)


def test_after_a_reroute_scores_follow_the_new_text(tiny_pair: tuple[Path, Path],
                                                   router_weights: Path) -> None:
    """The stream is cut back and continued with other text: later tokens are scored from the
    states of the new text, not the cut one."""
    guard = _guard(tiny_pair, router_weights, threshold=0.0, action="route",
                   route_to={"model": "large"})
    session = guard.session(prompt=PROMPT, can_route=True, record_scores=True)
    (route,) = [e for e in session.feed("The capital of France is Rome. ") if isinstance(e, Route)]
    scored_before = session.tokens - 1  # every token read so far but the first was scored
    session.reroute(route.at_char)
    cut = len(session.token_offsets())
    session.can_route = False  # the driver writes the rest itself
    session.feed("Paris is big.")
    report = session.finish()
    after = dict(report.scores["router"][scored_before:])
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair[0])
    model = AutoModelForCausalLM.from_pretrained(tiny_pair[0]).eval()
    context = render_context(tokenizer, [{"role": "user", "content": PROMPT}])
    answer = tokenizer(session.text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model(torch.tensor([context + answer]), output_hidden_states=True)
        hidden, logits = out.hidden_states[-1][0], out.logits[0]
        head = guard.monitors[0][1]._loaded.head  # type: ignore[attr-defined]
        p = len(context)
        expected = {j: float(head.score(hidden[p + j - 1 : p + j], torch.tensor([answer[j]]),
                                        torch.topk(logits[p + j - 1 : p + j], 8, -1).values)[0])
                    for j in range(cut + 1, len(answer))}
    assert sorted(after) == sorted(expected)  # the first token after the cut is not scored
    for j, value in expected.items():
        assert after[j] == pytest.approx(value, abs=1e-4)


BREAD = ("To bake bread, mix 500 g of flour, 10 g of salt, 7 g of yeast and 350 ml of warm "
         "water. Knead the dough for ten minutes until it is smooth, let it rise for an hour, "
         "shape it, let it rise again and bake it at 220 degrees for 30 minutes.")


@pytest.mark.skipif(not DEFAULT_WEIGHTS.exists(), reason="no shipped router weights")
def test_a_users_router_entry_takes_the_threshold_of_its_action() -> None:
    """``use: router, action: flag`` without a threshold in a user's policy flags like the
    default policy's router does; ``action: route`` routes at the routing threshold."""
    config = json.loads(DEFAULT_WEIGHTS.with_suffix(".json").read_text())
    user = Guard.from_policy({"monitors": [
        {"id": "mine", "use": "router", "action": "flag"},
        {"id": "escalate", "use": "router", "action": "route", "route_to": {"model": "large"}},
    ]}, host=_host())
    flag_spec, route_spec = (spec for spec, _ in user.monitors)
    assert user.threshold_of(flag_spec) == pytest.approx(config["flag_threshold"])
    assert user.threshold_of(route_spec) == pytest.approx(config["threshold"])
    default = Guard(default_policy(_host()), host=_host(), observer=user.observer)
    mine = Guard.from_policy({"monitors": [{"id": "router", "use": "router", "action": "flag"}]},
                             host=_host(), observer=user.observer)
    spans = [f.span for f in mine.check(BREAD, prompt="How do I bake bread?").flags]
    expected = [f.span for f in default.check(BREAD, prompt="How do I bake bread?").flags
                if f.monitor == "router"]
    assert spans == expected
    assert len(spans) < mine.check(BREAD).tokens / 2  # the routing threshold flagged most
