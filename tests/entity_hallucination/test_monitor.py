"""The entity-hallucination monitor inside a Guard: whole-entity flags with the right char spans
however the stream is split, generator and observer states giving the same scores, and the
shipped weights in the default policy; the same for a span head, and a stream cut back by a
reroute scoring like a fresh one."""

from __future__ import annotations

import json
from pathlib import Path

import guardrail_entity_hallucination.plugin as entity_plugin
import pytest
import torch
from guardrail_entity_hallucination.monitor import EntityHallucinationMonitor
from guardrail_entity_hallucination.probe import DEFAULT_WEIGHTS, EntityProbe
from guardrail_entity_hallucination.span_probe import (
    SPAN_FEATURES,
    EntitySpanProbe,
    StateBlock,
    save_span_probe,
)
from guardrail_entity_hallucination.spans import find_entities
from guardrail_entity_hallucination.training.train import save_entity_probe

from guardrail import Flag, Guard, StepToken, StreamStep
from guardrail.guard import default_policy
from guardrail.monitor import Features, MonitorContext, Score
from guardrail.plugins import PluginHost
from guardrail.probes.heads import LinearProbe
from guardrail.stream import TokenSpan
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


# A version-2 span head's blocks on the tiny model: mean states of layers 1 and 2 and the states
# of the token before the entity on both (the fills are what an entity with none adds).
BLOCKS = (StateBlock("mean", 1), StateBlock("mean", 2), StateBlock("prev", 1, 0.3),
          StateBlock("prev", 2, -0.2))


def _span_weights(folder: Path, hidden_size: int, layer: int,
                  blocks: tuple[StateBlock, ...] = ()) -> Path:
    """A span head whose decision the entity's kind settles (numbers and dates score about 0.998,
    names about 0.002), its small random state and surprisal/entropy weights moving the scores
    a little; with ``blocks``, a version-2 head reading those blocks."""
    states = hidden_size * max(1, len(blocks))
    head = LinearProbe(states + len(SPAN_FEATURES), seed=5)
    with torch.no_grad():
        head.linear.weight[0, :states].mul_(2.0 / max(1, len(blocks)))
        for name in ("kind_NUMBER", "kind_DATE"):
            head.linear.weight[0, states + SPAN_FEATURES.index(name)] = 12.0
        head.linear.bias.fill_(-6.0)
    probe = EntitySpanProbe(head, layer, 0.5, SPAN_FEATURES,
                            torch.tensor([3.0, 3.0, 3.0, 2.0, 2.0, 2.0, 0.5, 0.0, 0.0, 0.0]),
                            torch.ones(len(SPAN_FEATURES)), blocks=blocks)
    return save_span_probe(probe, folder / "span.safetensors", {"base_model": "tiny"})


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


# A streamed answer whose sentences and list items open with ordinary words, beside names.
PROSE = ("Keep the lid on. In the US the code is +1.\n- Stir well\nThe Hague and Krakow lie "
         "far apart. Once done, call Marie Curie on January 7, 1944.")


@pytest.mark.parametrize("cuts", [[4, 5, 17, 20, 21, 43, 44, 60], []])
def test_sentence_openers_get_no_flag_and_names_keep_whole_spans(
        tiny_model: Path, tmp_path: Path, cuts: list[int]) -> None:
    guard = _guard(tiny_model, _weights(tmp_path, 32, 1), threshold=0.0)  # every entity fires
    pieces = split_text(PROSE, cuts) if cuts else [PROSE[i:i + 1] for i in range(len(PROSE))]
    flags, _ = _run(guard, pieces)
    assert [PROSE[f.span[0]:f.span[1]] for f in flags if f.span] == [
        "US", "+1", "The Hague", "Krakow", "Marie Curie", "January 7, 1944"]


def test_split_points_do_not_change_scores(tiny_model: Path, tmp_path: Path) -> None:
    guard = _guard(tiny_model, _weights(tmp_path, 32, 2, extras=True), threshold=0.99)
    _, whole = _run(guard, [TEXT])
    _, pieces = _run(guard, split_text(TEXT, [4, 31, 32, 60, 61, 62, 100]))
    assert whole.keys() == pieces.keys() and whole
    for index, value in whole.items():
        assert pieces[index] == pytest.approx(value, abs=1e-4)


@pytest.mark.parametrize("blocks", [(), BLOCKS], ids=["v1", "v2"])
@pytest.mark.parametrize("sizes", [[1], [1, 2, 3], [5, 17, 40, 41, 90], [33, 2, 1, 7]])
def test_span_head_flags_the_right_entities_however_the_stream_is_split(
        tiny_model: Path, tmp_path: Path, sizes: list[int],
        blocks: tuple[StateBlock, ...]) -> None:
    guard = _guard(tiny_model, _span_weights(tmp_path, 32, 2 if blocks else 1, blocks),
                   threshold=0.5)
    flags, scores = _run(guard, split_text(TEXT, sizes))
    assert [TEXT[f.span[0]:f.span[1]] for f in flags if f.span] == ["66,987,244",
                                                                     "12 March 1990"]
    assert [f.score for f in flags] == [pytest.approx(0.998, abs=0.002)] * 2
    _, whole = _run(guard, [TEXT])
    assert scores.keys() == whole.keys()
    for index, value in whole.items():
        assert scores[index] == pytest.approx(value, abs=1e-4)
    # every token of an entity carries the entity's one score
    for flag in flags:
        first, last = flag.tokens
        assert {round(scores[i], 6) for i in range(first, last + 1)} == {round(flag.score, 6)}


@pytest.mark.parametrize("blocks", [(), BLOCKS], ids=["v1", "v2"])
def test_span_head_in_generator_mode_flags_the_same_entities(
        tiny_model: Path, tmp_path: Path, blocks: tuple[StateBlock, ...]) -> None:
    """An adapter that owns the model sends steps of tokens with the generator's rows (row i:
    the step that produced token i); the span head flags the same entities with the same scores
    as on the observer (a version-2 head too: two layers and the token before each entity)."""
    weights = _span_weights(tmp_path, 32, 2 if blocks else 1, blocks)
    guard = _guard(tiny_model, weights, threshold=0.5)
    observed_flags, observed = _run(guard, [TEXT])
    layers = sorted({b.layer for b in blocks} or {1})
    rows = {layer: _observer_rows(guard, layer) for layer in layers}
    _, logits, tokens = rows[layers[0]]
    gen_hidden = {layer: torch.cat([torch.zeros_like(h[:1]), h[:-1]])
                  for layer, (h, _, _) in rows.items()}
    gen_logits = torch.cat([torch.zeros_like(logits[:1]), logits[:-1]])
    session = guard.session(prompt=PROMPT, record_scores=True)
    events = []
    for i in range(0, len(tokens), 4):
        chunk = tokens[i:i + 4]
        step_tokens = [StepToken(int(t.id), TEXT[t.start:t.end]) for t in chunk
                       if t.id is not None]
        events += session.feed(StreamStep("".join(t.text for t in step_tokens),
                                          tokens=step_tokens,
                                          hidden={k: h[i:i + 4] for k, h in gen_hidden.items()},
                                          logits=gen_logits[i:i + 4]))
    report = session.finish()
    events += report.final_events
    flags = [e for e in events if isinstance(e, Flag)]
    assert [(f.span, f.score) for f in flags] == [
        (f.span, pytest.approx(f.score, abs=1e-4)) for f in observed_flags]
    assert [TEXT[f.span[0]:f.span[1]] for f in flags if f.span] == ["66,987,244",
                                                                     "12 March 1990"]
    generated = dict(report.scores["facts"])
    assert generated.keys() == observed.keys() - {0}  # token 0's surprisal: unknown to both
    for index, value in generated.items():
        assert value == pytest.approx(observed[index], abs=1e-4)


def _observer_rows(guard: Guard, layer: int, text: str = TEXT
                   ) -> tuple[torch.Tensor, torch.Tensor, list[TokenSpan]]:
    """The observer's states after each token of ``text`` and its logits rows, one pass."""
    observer = guard.observer
    needs = guard.needs
    state = observer.start([{"role": "user", "content": PROMPT}], needs)
    tokens = observer.tokenizer.tokenize(text)
    batch = observer.extend(state, tokens, needs)
    return torch.as_tensor(batch.hidden[layer]), torch.as_tensor(batch.logits), tokens


CUT = TEXT.index(" About")  # after "Argentina.": the continuation starts with a non-entity
DETOUR = " Tokyo had 5 lakes in 1990 near Rome, and the Nile flows into Egypt past Cairo."


@pytest.mark.parametrize("kind", ["token", "span", "span-v2"])
@pytest.mark.parametrize("mode", ["observer", "generator"])
def test_a_stream_cut_back_scores_like_a_fresh_one(tiny_model: Path, tmp_path: Path,
                                                   kind: str, mode: str) -> None:
    """A rerouted stream: the monitor reads TEXT[:CUT] + DETOUR (its entities handed out), is cut
    back to TEXT[:CUT] and reads the rest of TEXT. Its scores after the cut are those of a fresh
    stream over TEXT, entity spans included."""
    weights = (_span_weights(tmp_path, 32, 1) if kind == "span"
               else _span_weights(tmp_path, 32, 2, BLOCKS) if kind == "span-v2"
               else _weights(tmp_path, 32, 1, extras=True))
    guard = _guard(tiny_model, weights)
    monitor = EntityHallucinationMonitor(EntityHallucinationMonitor.Options(
        weights=str(weights), mode=mode))
    detour = TEXT[:CUT] + DETOUR

    def rows(text: str) -> tuple[dict[int, torch.Tensor], torch.Tensor, list[TokenSpan]]:
        hidden: dict[int, torch.Tensor] = {}
        for layer in sorted(monitor.needs().layers):
            hidden[layer], logits, tokens = _observer_rows(guard, layer, text)
        if mode == "generator":  # row i: the step that produced token i
            hidden = {k: torch.cat([torch.zeros_like(h[:1]), h[:-1]]) for k, h in hidden.items()}
            logits = torch.cat([torch.zeros_like(logits[:1]), logits[:-1]])
        return hidden, logits, tokens

    def feed(state: object, text: str, hidden: dict[int, torch.Tensor], logits: torch.Tensor,
             tokens: list[TokenSpan], start: int, final: bool) -> list[Score]:
        out: list[Score] = []
        for i in range(start, len(tokens), 5):
            j = min(i + 5, len(tokens))
            top = logits[i:j, :1] if mode == "observer" else None
            out += monitor.update(state, Features(tokens[i:j], i, text[: tokens[j - 1].end],
                                                  {k: h[i:j] for k, h in hidden.items()},
                                                  logits[i:j], top,
                                                  final=final and j == len(tokens)))
        return out + (list(monitor.finish(state)) if final else [])

    fresh_state = monitor.start(MonitorContext("facts"))
    fresh = feed(fresh_state, TEXT, *rows(TEXT), start=0, final=True)
    d_hidden, d_logits, d_tokens = rows(detour)
    f_hidden, f_logits, f_tokens = rows(TEXT)
    keep = sum(1 for t in f_tokens if t.end <= CUT)
    assert [(t.start, t.end) for t in d_tokens[:keep]] == [(t.start, t.end)
                                                          for t in f_tokens[:keep]]
    cut_state = monitor.start(MonitorContext("facts"))
    before = feed(cut_state, detour, d_hidden, d_logits, d_tokens, start=0, final=False)
    assert any(s.span and s.span[0] > CUT for s in before)  # the detour's entities went out
    after = feed(cut_state, TEXT, f_hidden, f_logits, f_tokens, start=keep, final=True)
    expected = [s for s in fresh if s.index >= keep]
    assert [TEXT[s.span[0]:s.span[1]] for s in expected if s.span] and all(
        s.span for s in expected)
    assert [(s.index, s.span) for s in after] == [(s.index, s.span) for s in expected]
    for got, want in zip(after, expected, strict=True):
        assert got.value == pytest.approx(want.value, abs=1e-4)


def test_span_head_refuses_the_tokens_option(tmp_path: Path) -> None:
    weights = _span_weights(tmp_path, 32, 1)
    with pytest.raises(ValueError, match="span head"):
        EntityHallucinationMonitor(EntityHallucinationMonitor.Options(
            weights=str(weights), spans="tokens"))


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
