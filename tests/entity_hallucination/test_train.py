"""The trainer's real path (feature cache -> annealed span-max training -> layer choice ->
calibration -> saved weights -> monitor) learns a planted signal on a tiny random model; so does
the span head's (entity rows -> logistic regression -> layer and weight decay choice), and the
monitor streaming a saved span head scores as the cached evaluation does."""

from __future__ import annotations

import json
import random
from pathlib import Path

import guardrail_entity_hallucination.plugin as entity_plugin
import numpy as np
import pytest
from guardrail_entity_hallucination.monitor import EntityHallucinationMonitor
from guardrail_entity_hallucination.probe import load_entity_probe
from guardrail_entity_hallucination.span_probe import EntitySpanProbe, save_span_probe, span_members
from guardrail_entity_hallucination.spans import find_entities
from guardrail_entity_hallucination.training.evaluation import (
    evaluate_by_type,
    evaluate_records,
    probe_scorer,
    type_prior,
)
from guardrail_entity_hallucination.training.train import calibrate, save_entity_probe, select_probe
from guardrail_entity_hallucination.training.train_span import (
    fit_span_ensemble,
    parse_member,
    select_span_probe,
    span_rows,
)

from guardrail import Guard
from guardrail.observer.hf import load_model_dir
from guardrail.plugins import PluginHost
from guardrail.testing import random_splits
from guardrail.testing.tiny_models import build_tiny_model
from guardrail.toolkit.fake import write_jsonl
from guardrail.toolkit.features import extract_features

# The planted signal: which words the "model" writes when it fabricates. A tiny random model's
# states carry each token's identity, so a linear probe can learn the split; nothing else does.
FAKE = ["Warsaw", "Tokyo", "Nobel"]
TRUE = ["Paris", "Rome", "France"]
TEMPLATES = ["The capital is {}. It is old.", "Marie lived in {} and in {}.",
             "Once upon a time {} was a small city.", "The river flows past {} to the sea."]


def _records(n: int, seed: int) -> list[dict[str, object]]:
    rng = random.Random(seed)
    out: list[dict[str, object]] = []
    for _ in range(n):
        template = rng.choice(TEMPLATES)
        text, spans = "", []
        parts = template.split("{}")
        for k, part in enumerate(parts):
            text += part
            if k < len(parts) - 1:
                fake = rng.random() < 0.4
                word = rng.choice(FAKE if fake else TRUE)
                spans.append({"start": len(text), "end": len(text) + len(word),
                              "label": int(fake)})
                text += word
        out.append({"prompt": "Tell me a fact.", "response": text,
                    "label": int(any(s["label"] for s in spans)), "spans": spans})
    return out


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("entity-planted")
    model = build_tiny_model(root / "tiny", num_layers=3, hidden_size=32, seed=4)
    observer = load_model_dir(model, name="tiny", window=512)
    sets = {}
    for split, n, seed in (("train", 120, 1), ("val", 30, 2), ("test", 50, 3)):
        path = write_jsonl(root / f"{split}.jsonl", _records(n, seed))  # type: ignore[arg-type]
        sets[split] = extract_features(observer, path, root / "cache", [0, 2], stats=True,
                                       progress=False).records
    return {"root": root, "sets": sets}


def test_planted_signal_is_learned_through_the_training_path(planted: dict[str, object]) -> None:
    sets = planted["sets"]
    assert isinstance(sets, dict)
    best, table = select_probe(sets["train"], sets["val"], [0, 2], epochs=12, lr=1e-2,
                               progress=False)
    assert {row["layer"] for row in table} == {0, 2} and any(row["extras"] for row in table)
    result = evaluate_records(best.probe, sets["test"], by=None)
    assert result["all"]["probe"]["span_auc"] > 0.95
    assert result["all"]["probe"]["recall_at_10fpr"] > 0.8
    choice = calibrate(best.probe, sets["val"])
    assert 0.0 < choice["threshold"] < 1.0 and choice["fpr"] <= 0.1


def test_saved_probe_reloads_into_the_monitor(planted: dict[str, object], tmp_path: Path) -> None:
    sets = planted["sets"]
    assert isinstance(sets, dict)
    best, _ = select_probe(sets["train"], sets["val"], [2], epochs=3, try_extras=True,
                           progress=False)
    best.probe.threshold = 0.37
    weights = save_entity_probe(best.probe, tmp_path / "p.safetensors", {"base_model": "tiny"})
    loaded = load_entity_probe(weights)
    assert (loaded.layer, loaded.threshold, loaded.features) == (2, 0.37, best.probe.features)
    record = sets["test"][0]
    extras = {"surprisal": record.surprisal, "entropy": record.entropy}
    assert loaded.score(record.hidden[2].float(), extras).tolist() == pytest.approx(
        best.probe.score(record.hidden[2].float(), extras).tolist(), abs=1e-6)
    monitor = EntityHallucinationMonitor(EntityHallucinationMonitor.Options(weights=str(weights)))
    assert 2 in monitor.needs().layers and monitor.needs().logits == bool(loaded.features)


def test_planted_signal_is_learned_by_the_span_head(planted: dict[str, object]) -> None:
    sets = planted["sets"]
    assert isinstance(sets, dict)
    best, table = select_span_probe(sets["train"], sets["val"], [0, 2], [0.01, 0.3],
                                    progress=False)
    assert {(row["layer"], row["weight_decay"]) for row in table} == {
        (0, 0.01), (0, 0.3), (2, 0.01), (2, 0.3)}
    assert best.val_span_auc == max(row["val_span_auc"] for row in table)
    assert isinstance(best.probe, EntitySpanProbe)
    result = evaluate_records(best.probe, sets["test"], by=None)["all"]["probe"]
    assert result["span_auc"] > 0.95 and result["recall_at_10fpr"] > 0.8
    # the span head scores every labelled span here: the finder sees all the planted words
    assert result["spans"] == sum(len(r.spans) for r in sets["test"])
    choice = calibrate(best.probe, sets["val"])
    assert 0.0 < choice["threshold"] < 1.0 and choice["fpr"] <= 0.1


ENSEMBLE = ("mean:2", "mean:0+mean:2+prev:0", "mean:2+prev:2")


@pytest.mark.parametrize("members", [None, ENSEMBLE], ids=["v1", "ensemble"])
def test_streamed_span_head_scores_as_the_cached_evaluation(
        planted: dict[str, object], tmp_path: Path, members: tuple[str, ...] | None) -> None:
    """A saved span head in a Guard over random stream splits gives each token the score the
    cached evaluation gives it (same entities, same broadcast), up to float16 caching; also an
    ensemble reading two layers and the token before each entity (a version-2 file)."""
    sets, root = planted["sets"], planted["root"]
    assert isinstance(sets, dict) and isinstance(root, Path)
    best, _ = select_span_probe(
        sets["train"], sets["val"], [2], [0.03], progress=False,
        members=None if members is None else [parse_member(m) for m in members])
    weights = save_span_probe(best.probe, tmp_path / "span.safetensors", {"base_model": "tiny"})
    loaded = load_entity_probe(weights)
    assert isinstance(loaded, EntitySpanProbe) and loaded.layer == 2
    assert loaded.version == (1 if members is None else 2)
    if members is not None:
        assert loaded.layers == (0, 2) and loaded.reads_prev
    host = PluginHost(autoload=False)
    host.register(entity_plugin, name="entity-test")
    guard = Guard.from_policy(
        {"observer": {"model": str(root / "tiny"), "window": 512},
         "monitors": [{"id": "facts", "use": "entity-hallucination",
                       "options": {"weights": str(weights)}, "threshold": 0.5,
                       "rule": {"kind": "span_max"}, "action": "flag"}]}, host=host)
    cached = probe_scorer(loaded)
    compared = 0
    for n, record in enumerate(sets["test"][:12]):
        session = guard.session(prompt=record.prompt, record_scores=True, dry_run=True)
        for piece in random_splits(record.response, seed=n):
            session.feed(piece)
        streamed = dict(session.finish().scores["facts"])
        expected = {i: v for i, v in enumerate(cached(record)) if i > 0 and v == v}
        assert set(streamed) - {0} == set(expected)
        for i, value in expected.items():
            assert streamed[i] == pytest.approx(value, abs=2e-3)
            compared += 1
    assert compared > 24


def test_an_ensemble_is_the_mean_of_its_members_logits(planted: dict[str, object]) -> None:
    """The ensemble's one linear head gives each entity the mean of its members' logits, also
    for an entity that starts the response (no token before it: each prev block's fill)."""
    sets = planted["sets"]
    assert isinstance(sets, dict)
    members = [parse_member(m) for m in ENSEMBLE]
    rows = span_rows(sets["train"], [0, 2], prev_layers=[0, 2], progress=False)
    assert np.isnan(rows.prev[2]).all(axis=1).any()  # some entity starts its response
    ensemble, heads, _ = fit_span_ensemble(rows, members, 0.03)
    assert [b.pool for b in ensemble.state_blocks] == ["mean", "mean", "prev", "prev"]
    checked = first = 0
    for record in sets["test"][:20]:
        hidden = {k: record.hidden[k].float().numpy() for k in (0, 2)}
        spans = find_entities(record.response, 0, final=True)
        for span, rows_ in zip(spans, span_members(record.offsets.tolist(), spans), strict=True):
            if not rows_:
                continue
            stats = ([float(record.surprisal[i]) for i in rows_],
                     [float(record.entropy[i]) for i in rows_], span.kind)

            values = []
            for probe in (*heads, ensemble):
                dots, prevs = probe.token_dots(hidden)
                values.append(probe.logit([dots[i] for i in rows_], *stats,
                                          prevs[rows_[0] - 1] if rows_[0] > 0 else None))
            assert values[-1] == pytest.approx(sum(values[:-1]) / len(heads), abs=1e-4)
            checked += 1
            first += rows_[0] == 0
    assert checked > 20 and first > 0


def test_per_type_metrics_split_the_spans_by_their_fact_type(planted: dict[str, object]) -> None:
    sets = planted["sets"]
    assert isinstance(sets, dict)
    best, _ = select_probe(sets["train"], sets["val"], [2], epochs=12, lr=1e-2, progress=False)
    test = sets["test"]
    cities = {"Paris", "Rome", "Warsaw", "Tokyo"}
    types = [["city" if r.response[s.start:s.end] in cities else "other" for s in r.spans]
             for r in test]
    by_type = evaluate_by_type(best.probe, test, types)
    pooled = evaluate_records(best.probe, test, by=None)["all"]
    assert set(by_type) == {"city", "other"}
    assert sum(b["probe"]["spans"] for b in by_type.values()) == pooled["probe"]["spans"]
    assert by_type["city"]["probe"]["fabricated_spans"] == sum(
        s.label for r in test for s in r.spans if r.response[s.start:s.end] in cities)
    assert by_type["city"]["probe"]["span_auc"] > 0.95
    with pytest.raises(ValueError, match="type lists"):
        evaluate_by_type(best.probe, test, types[:-1])


def test_type_prior_scores_spans_by_their_types_training_share(tmp_path: Path) -> None:
    def write(name: str, spans: list[tuple[str, int]]) -> Path:
        text = "x" * len(spans)
        record = {"prompt": "", "response": text,
                  "spans": [{"start": i, "end": i + 1, "type": t, "label": y}
                            for i, (t, y) in enumerate(spans)]}
        path = tmp_path / name
        path.write_text(json.dumps(record) + "\n", encoding="utf-8")
        return path

    train = write("train.jsonl", [("area", 1), ("area", 1), ("area", 0), ("capital", 0)])
    test = write("test.jsonl", [("area", 1), ("capital", 0), ("area", 0), ("capital", 0)])
    prior = type_prior(train, test)
    assert prior["spans"] == 4 and prior["fabricated_spans"] == 1
    # area (2/3 wrong in training) ranks above capital (0/1): the wrong area beats both capitals
    # and ties the right area
    assert prior["span_auc"] == pytest.approx((1 + 1 + 0.5) / 3, abs=1e-4)


def test_report_may_not_overwrite_the_weights_json(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from guardrail_entity_hallucination.training.train import main

    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "p.safetensors"), "--report", str(tmp_path / "p.json")])
    assert exc.value.code == 2 and "p.json" in capsys.readouterr().err
