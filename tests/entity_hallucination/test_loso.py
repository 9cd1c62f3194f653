"""Source tags and leave-one-source-out validation: every record of a build says where it comes
from, the tag reaches the feature cache, a LOSO fold never has a source on both sides, the
hand-written sets parse to exact spans, and the combined head scores as the monitor does."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from guardrail_entity_hallucination.span_probe import SPAN_FEATURES, span_features
from guardrail_entity_hallucination.training.combine import (
    STATE_BLOCKS,
    Candidate,
    Design,
    _fit,
    design,
    design_logits,
    fit_candidate,
)
from guardrail_entity_hallucination.training.data.facts import FactBase
from guardrail_entity_hallucination.training.data.own_answers import (
    GreedyWriter,
    OwnConfig,
    build_own_answers,
)
from guardrail_entity_hallucination.training.loso import (
    MarkupError,
    choose,
    loso_folds,
    pool_files,
    read_marked,
    source_of,
    threshold_for,
    weighted_threshold,
    write_marked,
)
from guardrail_entity_hallucination.training.train_combined import handwritten_sets
from guardrail_entity_hallucination.training.train_span import SpanRows

from guardrail.toolkit.records import read_records

Records = list[dict[str, Any]]


def test_every_record_of_a_build_carries_its_source(
        tiny_build: Path, read_split: Callable[[Path, str], Records]) -> None:
    seen: Counter[str] = Counter()
    for name in ("train", "val", "test", "paired"):
        for record in read_split(tiny_build, name):
            tag = record["origin"]
            seen[tag] += 1
            if name == "paired":
                assert tag == "paired"
            elif record["kind"] in ("country", "city"):
                assert tag == f"templates:{record['kind']}"
            else:
                assert record["kind"] == "garak" and tag.startswith("garak:"), record
    assert {"templates:country", "templates:city", "paired", "garak:place",
            "garak:person"} <= set(seen), seen
    # the tag travels with the record to the readers the trainers use
    first = next(iter(read_records(tiny_build / "test.jsonl")))
    assert first.extra["origin"] == source_of(first) != ""


def test_the_pool_keeps_one_source_per_file_with_its_split(tiny_build: Path,
                                                           tmp_path: Path) -> None:
    files = pool_files(tiny_build, tmp_path / "pool", caps={"templates:country": 5})
    assert "templates:country" in files and "paired" in files
    for source, path in files.items():
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        assert rows and {r["origin"] for r in rows} == {source}
        assert {r["split"] for r in rows} <= {"train", "val", "test", "paired"}
    assert len(files["templates:country"].read_text(encoding="utf-8").splitlines()) == 5


def test_a_loso_fold_never_puts_a_source_on_both_sides(
        tiny_build: Path, read_split: Callable[[Path, str], Records]) -> None:
    records = [r for name in ("train", "val", "test", "paired")
               for r in read_split(tiny_build, name)]
    folds = loso_folds(records)
    sources = {source_of(r) for r in records}
    assert sorted(held for held, _, _ in folds) == sorted(sources)
    for held, train, test in folds:
        assert {source_of(r) for r in test} == {held}
        assert held not in {source_of(r) for r in train}
        assert len(train) + len(test) == len(records)


def test_own_answers_and_hand_written_sets_keep_their_tags_through_the_pool(
        tiny_build: Path, writer: GreedyWriter, facts: FactBase, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for path in tiny_build.iterdir():
        if path.suffix in (".json", ".jsonl"):
            (data / path.name).write_bytes(path.read_bytes())
    build_own_answers(data, writer, OwnConfig(limit=1), facts=facts, progress=False)
    files = pool_files(data, tmp_path / "pool")
    own = [json.loads(line) for line in
           files["own-answers"].read_text(encoding="utf-8").splitlines()]
    assert own and {r["origin"] for r in own} == {"own-answers"}
    assert {r["split"] for r in own} <= {"own-train", "own-val", "own-test"}
    sets = {p.stem: p for p in handwritten_sets()}
    files["handwritten:train-v2"] = write_marked([sets["train-v2"]], tmp_path / "hw.jsonl")
    # the tags reach the reader the trainers cache features from, and split the folds
    records = [r for path in files.values() for r in read_records(path)]
    assert {"own-answers", "handwritten:train-v2", "paired"} <= {source_of(r) for r in records}
    for held, train, test in loso_folds(records):
        assert {source_of(r) for r in test} == {held}
        assert held not in {source_of(r) for r in train}


def test_hand_written_sets_parse_to_exact_spans(tmp_path: Path) -> None:
    path = tmp_path / "bios.md"
    path.write_text("# Who was Ada?\nAda was born in [[London|0]] in\n[[1816|1]].\n\n"
                    "# Where?\nIn [[Paris|0]].\n", encoding="utf-8")
    first, second = read_marked(path)
    assert first["prompt"] == "Who was Ada?"
    assert first["response"] == "Ada was born in London in 1816."
    assert [(first["response"][s["start"]:s["end"]], s["label"]) for s in first["spans"]] == [
        ("London", 0), ("1816", 1)]
    assert (first["label"], second["label"], first["origin"]) == (1, 0, "handwritten:bios")
    bad = tmp_path / "bad.md"
    bad.write_text("# ok\nfine\n\nno prompt line here\n", encoding="utf-8")
    with pytest.raises(MarkupError, match=r"bad\.md:4"):
        read_marked(bad)


def test_the_shipped_hand_written_sets_parse() -> None:
    sets = handwritten_sets()
    assert {p.stem for p in sets} >= {"bios", "benign", "train-v2"}
    for path in sets:
        records = read_marked(path)
        assert records and all(r["response"] and "[[" not in r["response"] for r in records)


def test_the_threshold_weighs_each_source_alike() -> None:
    big = np.linspace(0.0, 1.0, 1000)
    small = np.linspace(10.0, 11.0, 10)
    t = weighted_threshold(np.concatenate([big, small]), ["a"] * 1000 + ["b"] * 10, 0.1)
    # 10% of all negatives, each source weighing half: one fifth of "b", none of "a"
    assert 10.0 < t < 11.0
    assert (small >= t).mean() == pytest.approx(0.2)


def test_the_threshold_is_set_by_the_hand_written_sources_true_entities() -> None:
    # templates' true entities score high, the hand-written ones low, fabricated ones ignored
    templates = np.linspace(5.0, 6.0, 100)
    bios, benign = np.linspace(0.0, 1.0, 100), np.linspace(0.0, 1.0, 50)
    logits = np.concatenate([templates, bios, benign, [9.0, 9.0]])
    labels = np.array([0] * 250 + [1, 1])
    tags = ["templates:city"] * 100 + ["handwritten:bios"] * 100 + ["handwritten:benign"] * 50 \
        + ["handwritten:bios"] * 2
    t = threshold_for(logits, labels, tags, 0.1, "handwritten:")
    assert 0.85 < t < 0.95  # a tenth of each hand-written source's true entities at or above
    assert (bios >= t).mean() == pytest.approx(0.1) and (templates >= t).all()
    # with no such source, every source's true entities set it, as before
    assert threshold_for(logits, labels, tags, 0.1, "own-") == \
        weighted_threshold(logits[:250], tags[:250], 0.1)


def _rows(n: int, hidden: int, seed: int = 0) -> tuple[SpanRows, dict[str, np.ndarray]]:
    """One single-token entity per row, so a row's mean state is its token's state."""
    rng = np.random.default_rng(seed)
    states = {layer: rng.normal(size=(n, hidden)).astype(np.float32) for layer in (15, 18)}
    prev = {layer: rng.normal(size=(n, hidden)).astype(np.float32) for layer in (15, 18)}
    prev[15][0] = prev[18][0] = np.nan  # the first entity starts the response
    surprisal, entropy = rng.gamma(2.0, 2.0, n), rng.gamma(2.0, 1.0, n)
    kinds = rng.choice(["NAME", "NUMBER", "DATE"], n)
    labels = (surprisal + states[15][:, 0] + rng.normal(size=n) > 4.5).astype(np.int64)
    raw = [span_features([s], [e], k) for s, e, k in zip(surprisal, entropy, kinds, strict=True)]
    features = np.asarray([[r[name] for name in SPAN_FEATURES] for r in raw])
    return SpanRows(states, features, labels, prev), {
        "surprisal": surprisal, "entropy": entropy, "kinds": kinds}


@pytest.mark.parametrize("states", [False, True])
def test_the_combined_head_scores_as_its_fit_does(states: bool) -> None:
    hidden = 8
    rows, raw = _rows(200, hidden)
    candidate = Candidate("t", ("surprisal_max", "surprisal_mean", "kind_NAME"), states, 0.1)
    probe, fitted, weights = fit_candidate(rows, candidate, hidden)
    expected = design_logits(design(rows, states, like=fitted), weights)
    assert probe.layers == ((15, 18) if states else (15,))
    if states:
        assert {(b.pool, b.layer) for b in probe.state_blocks} == set(STATE_BLOCKS)
    mean_part, _ = probe.token_dots({15: rows.states[15], 18: rows.states[18]})
    _, prev_part = probe.token_dots({15: np.nan_to_num(rows.prev[15]),
                                     18: np.nan_to_num(rows.prev[18])})
    for i in range(len(rows)):
        before = None if i == 0 else prev_part[i]
        got = probe.logit([mean_part[i]], [raw["surprisal"][i]], [raw["entropy"][i]],
                          str(raw["kinds"][i]), before)
        assert got == pytest.approx(float(expected[i]), abs=1e-3)
    # features the candidate does not read carry no weight
    w = probe.head.linear.weight.detach()[0].numpy()[-len(SPAN_FEATURES):]
    unread = [k for k, name in enumerate(SPAN_FEATURES) if name not in candidate.features]
    assert not np.any(w[unread])
    assert math.isfinite(probe.score([mean_part[1]], [1.0], [1.0], "NAME", prev_part[1]))


def test_a_monotone_head_never_scores_more_surprisal_lower() -> None:
    hidden = 8
    rows, _ = _rows(300, hidden)
    rows.labels[:] = (rows.features[:, SPAN_FEATURES.index("surprisal_max")] < 3.0)
    free = Candidate("free", ("surprisal_max", "surprisal_mean"))
    monotone = Candidate("mono", ("surprisal_max", "surprisal_mean"), monotone=True)
    columns = [SPAN_FEATURES.index("surprisal_max"), SPAN_FEATURES.index("surprisal_mean")]
    assert (fit_candidate(rows, free, hidden)[2][1][columns] < 0).all()
    assert (fit_candidate(rows, monotone, hidden)[2][1][columns] >= 0).all()


def test_an_ensemble_averages_one_fit_per_source() -> None:
    hidden = 8
    rows, _ = _rows(300, hidden)
    tags = ["a"] * 120 + ["b"] * 150 + ["c"] * 30
    rows.labels[270:] = 0  # source c has one label: it gets no vote
    candidate = Candidate("ens", ("surprisal_max", "surprisal_mean"), True, 1.0,
                          ensemble=True)
    with pytest.raises(ValueError, match="source"):
        fit_candidate(rows, candidate, hidden)
    probe, full, weights = fit_candidate(rows, candidate, hidden, tags)
    single = dataclasses.replace(candidate, ensemble=False)
    votes = []
    for part in (slice(0, 120), slice(120, 270)):
        sub = Design(full.states[part], full.features[part], full.labels[part],
                     full.state_stats, full.feature_mean, full.feature_std)
        votes.append(design_logits(full, _fit(sub, single)))
    np.testing.assert_allclose(design_logits(full, weights), np.mean(votes, axis=0),
                               rtol=1e-5, atol=1e-5)
    assert probe.layers == (15, 18)


def test_the_choice_goes_to_the_best_worst_source_margin() -> None:
    def base(v: float) -> dict[str, Any]:
        return {"baselines": {"surprisal_max_entities": v, "surprisal_mean_entities": v - 0.1}}

    result = {"sources": {"a": base(0.80), "b": base(0.70), "c": base(0.90), "d": base(0.6)},
              "candidates": {
                  # above surprisal on three sources by a hair, far below on the fourth
                  "wins": {"span_auc": {"a": 0.801, "b": 0.701, "c": 0.901, "d": 0.45}},
                  # a little below on two, never far
                  "even": {"span_auc": {"a": 0.81, "b": 0.69, "c": 0.895, "d": 0.61}},
                  "no-labels": {"span_auc": {"a": None, "b": None, "c": None, "d": None}}}}
    best, table = choose(result)
    assert best == "even"
    assert table["wins"]["above_surprisal"] == 3 and table["even"]["above_surprisal"] == 2
    assert table["even"]["worst_margin"] == pytest.approx(-0.01)
    assert table["no-labels"]["worst_margin"] is None
