"""The entity-hallucination monitor inside a Guard: whole-entity flags with the right char spans
however the stream is split, generator and observer states giving the same scores, and the
shipped weights in the default policy."""

from __future__ import annotations

import json
from pathlib import Path

import guardrail_entity_hallucination.plugin as entity_plugin
import pytest
import torch
from guardrail_entity_hallucination.monitor import EntityHallucinationMonitor
from guardrail_entity_hallucination.probe import DEFAULT_WEIGHTS, EntityProbe
from guardrail_entity_hallucination.spans import find_entities
from guardrail_entity_hallucination.train import save_entity_probe

from guardrail import Flag, Guard
from guardrail.guard import default_policy
from guardrail.monitor import Features, MonitorContext
from guardrail.plugins import PluginHost
from guardrail.probes.heads import LinearProbe
from guardrail.testing import split_text
from guardrail.testing.tiny_models import build_tiny_model

TEXT = ("The capital of France is Paris, and Buenos Aires lies in Argentina. "
        "About 66,987,244 people lived there on 12 March 1990 near Rio de Janeiro.")
ENTITIES = ["France", "Paris", "Buenos Aires", "Argentina", "66,987,244", "12 March 1990",
            "Rio de Janeiro"]
PROMPT = "Tell me about France."


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("entity-tiny") / "llama", num_layers=3)


def _host() -> PluginHost:
    host = PluginHost(autoload=False)
    host.register(entity_plugin, name="entity-test")
    return host


def _weights(folder: Path, hidden_size: int, layer: int, extras: bool = False) -> Path:
    names = ("surprisal", "entropy") if extras else ()
    probe = EntityProbe(LinearProbe(hidden_size + len(names), seed=3), layer, 0.0, names,
                        torch.tensor([5.0, 3.0][: len(names)]),
                        torch.tensor([2.0, 1.0][: len(names)]))
    return save_entity_probe(probe, folder / "probe.safetensors", {"base_model": "tiny"})


def _guard(model: Path, weights: Path, threshold: float = 0.0) -> Guard:
    policy = {"observer": {"model": str(model), "window": 512},
              "monitors": [{"id": "facts", "use": "entity-hallucination",
                            "options": {"weights": str(weights)}, "threshold": threshold,
                            "rule": {"kind": "span_max"}, "action": "flag"}]}
    return Guard.from_policy(policy, host=_host())


def _run(guard: Guard, pieces: list[str]) -> tuple[list[Flag], dict[int, float]]:
    session = guard.session(prompt=PROMPT, record_scores=True)
    events = []
    for piece in pieces:
        events.extend(session.feed(piece))
    report = session.finish()
    events.extend(report.final_events)
    flags = [e for e in events if isinstance(e, Flag)]
    return flags, dict(report.scores["facts"])


def test_entity_finder_marks_names_numbers_and_dates() -> None:
    found = [TEXT[s.start:s.end] for s in find_entities(TEXT, final=True)]
    assert found == ENTITIES


def test_an_entity_is_final_only_when_later_text_cannot_extend_it() -> None:
    assert [s.final for s in find_entities("It is Buenos ")] == [False]
    assert [s.final for s in find_entities("its population is 66,")] == [False]
    assert [s.final for s in find_entities("Republic of ")] == [False]
    closed = find_entities("Republic of the Congo is big")[-1]
    assert (closed.final, closed.end) == (True, 21)


@pytest.mark.parametrize("cuts", [[1, 2, 3], [5, 17, 40, 41, 90], [33, 34, 35, 36, 37], []])
def test_flags_carry_whole_entity_spans_however_the_stream_is_split(
        tiny_model: Path, tmp_path: Path, cuts: list[int]) -> None:
    guard = _guard(tiny_model, _weights(tmp_path, 32, 1), threshold=0.0)  # every entity fires
    pieces = split_text(TEXT, cuts) if cuts else [TEXT[i:i + 1] for i in range(len(TEXT))]
    flags, scores = _run(guard, pieces)
    assert [TEXT[f.span[0]:f.span[1]] for f in flags if f.span] == ENTITIES
    # a flag's score is the highest token score inside its entity
    for flag in flags:
        first, last = flag.tokens
        assert flag.score == pytest.approx(max(scores[i] for i in range(first, last + 1)))


def test_split_points_do_not_change_scores(tiny_model: Path, tmp_path: Path) -> None:
    guard = _guard(tiny_model, _weights(tmp_path, 32, 2, extras=True), threshold=0.99)
    _, whole = _run(guard, [TEXT])
    _, pieces = _run(guard, split_text(TEXT, [4, 31, 32, 60, 61, 62, 100]))
    assert whole.keys() == pieces.keys() and whole
    for index, value in whole.items():
        assert pieces[index] == pytest.approx(value, abs=1e-4)


def test_generator_states_score_like_the_observer(tiny_model: Path, tmp_path: Path) -> None:
    """Generator row i is the step that produced token i: the state after token i is row i+1,
    and the token's surprisal comes from its own row. Fed the observer's own rows shifted that
    way, the monitor must give the observer-mode scores (the stream's last token excepted)."""
    weights = _weights(tmp_path, 32, 1, extras=True)
    guard = _guard(tiny_model, weights)
    observer = guard.observer
    monitor = EntityHallucinationMonitor(EntityHallucinationMonitor.Options(
        weights=str(weights)))
    needs = monitor.needs()
    state = observer.start([{"role": "user", "content": PROMPT}], needs)
    tokens = observer.tokenizer.tokenize(TEXT)
    batch = observer.extend(state, tokens, needs)
    hidden, logits = torch.as_tensor(batch.hidden[1]), torch.as_tensor(batch.logits)

    obs_state = monitor.start(MonitorContext("facts"))
    observed = list(monitor.update(obs_state, Features(tokens, 0, TEXT, {1: hidden}, logits,
                                                       top_logits=logits[:, :1], final=True)))
    # Generator view: row i holds the state before token i and the logits token i came from.
    prompt_state = observer.start([{"role": "user", "content": PROMPT}], needs)
    first = observer.extend(prompt_state, tokens[:1], needs)  # only to get a row-0 shape
    gen_hidden = torch.cat([torch.zeros_like(torch.as_tensor(first.hidden[1])), hidden[:-1]])
    gen_logits = torch.cat([torch.zeros_like(logits[:1]), logits[:-1]])
    gen_state = monitor.start(MonitorContext("facts"))
    generated = []
    for i in range(0, len(tokens), 3):  # three tokens a step
        chunk = tokens[i:i + 3]
        generated += monitor.update(gen_state, Features(chunk, i, TEXT[: chunk[-1].end],
                                                        {1: gen_hidden[i:i + 3]},
                                                        gen_logits[i:i + 3]))
    generated += monitor.finish(gen_state)
    by_index = {s.index: s for s in generated}
    last = len(tokens) - 1
    compared = [s for s in observed if s.index not in (0, last)]
    assert compared
    for s in compared:  # token 0's surprisal is unknown to both; skip it
        assert by_index[s.index].span == s.span
        assert by_index[s.index].value == pytest.approx(s.value, abs=1e-4)


def test_missing_weights_name_the_file(tmp_path: Path) -> None:
    from guardrail.errors import PolicyError

    policy = {"monitors": [{"id": "f", "use": "entity-hallucination",
                            "options": {"weights": str(tmp_path / "none.safetensors")}}]}
    with pytest.raises(PolicyError, match="none.json"):
        Guard.from_policy(policy, host=_host())


@pytest.mark.skipif(not DEFAULT_WEIGHTS.exists(), reason="no shipped entity weights")
def test_default_policy_includes_the_monitor_with_the_shipped_threshold() -> None:
    spec = next(m for m in default_policy(_host()).monitors if m.use == "entity-hallucination")
    config = json.loads(DEFAULT_WEIGHTS.with_suffix(".json").read_text())
    assert spec.id == "facts" and spec.action == "flag" and spec.rule.kind == "span_max"
    assert spec.threshold == pytest.approx(config["threshold"])
    assert config["base_model"] == "smollm2-135m" and config["splits"]["train"]["used"] > 0
    assert "span_auc" in config["metrics"]["test"]["all"]
