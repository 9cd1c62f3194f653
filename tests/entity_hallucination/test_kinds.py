"""The seventh entity pass (``training.kinds``): span features standardised within the entity's
kind, with statistics from the training rows' true entities only, and the shipped recipe
calibrated once per kind, falling back to the pooled fit below the plan's minimum."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from guardrail_entity_hallucination.span_probe import ALL_FEATURES, KINDS, span_features
from guardrail_entity_hallucination.training.combine import (
    PASS7_GRID,
    Candidate,
    design,
    design_logits,
    fit_candidate,
    fit_scorer,
    rows_subset,
)
from guardrail_entity_hallucination.training.kinds import (
    MIN_FABRICATED,
    MIN_TRUE,
    KindSpanProbe,
    KindStats,
    fit_kind_candidate,
    in_kind_aucs,
    kind_stats,
    row_kinds,
    within_kind_rows,
)
from guardrail_entity_hallucination.training.train_span import SpanRows

SMAX = ALL_FEATURES.index("surprisal_max")
IN_KIND = Candidate("s in kind", ("surprisal_max",), monotone=True,
                    within_kind=("surprisal_max",))


def _rows(surprisal: list[float], kinds: list[str], labels: list[int]) -> SpanRows:
    """One single-token entity per row (no states), features as the monitor computes them."""
    raw = [span_features([s], [1.0], k, {"prior_merge": [2.0]})
           for s, k in zip(surprisal, kinds, strict=True)]
    n = len(raw)
    return SpanRows({15: np.zeros((n, 4), np.float32), 18: np.zeros((n, 4), np.float32)},
                    np.asarray([[r[name] for name in ALL_FEATURES] for r in raw]),
                    np.asarray(labels, dtype=np.int64),
                    {15: np.zeros((n, 4), np.float32), 18: np.zeros((n, 4), np.float32)})


def _mixed(seed: int, n: int = 240) -> tuple[SpanRows, list[str]]:
    """Names with surprisal around 8, numbers around 3, fabricated ones 2 higher."""
    rng = np.random.default_rng(seed)
    kinds = rng.choice(["NAME", "NUMBER"], n).tolist()
    labels = (rng.random(n) < 0.3).astype(int).tolist()
    surprisal = [rng.normal(8.0 if k == "NAME" else 3.0) + 2.0 * y
                 for k, y in zip(kinds, labels, strict=True)]
    return _rows(surprisal, kinds, labels), ["a" if i % 2 else "b" for i in range(n)]


def test_the_statistics_read_each_kinds_true_entities_only() -> None:
    names = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]
    numbers = [20.0, 22.0, 24.0]  # fewer than MIN_TRUE: the pooled statistics
    rows = _rows([*names, 100.0, 200.0, *numbers], ["NAME"] * 12 + ["NUMBER"] * 3,
                 [0] * 10 + [1, 1] + [0] * 3)
    assert len(names) >= MIN_TRUE > len(numbers)
    stats = kind_stats(rows, ("surprisal_max",))
    mean, std = stats.of("NAME")
    assert mean[0] == pytest.approx(5.5) and std[0] == pytest.approx(np.std(names))
    every_true = [*names, *numbers]
    assert stats.of("NUMBER")[0][0] == pytest.approx(np.mean(every_true))
    assert stats.of("DATE")[0][0] == stats.of(None)[0][0] == pytest.approx(np.mean(every_true))


def test_a_standardised_feature_of_a_known_kind_gives_the_expected_value() -> None:
    stats = KindStats(("surprisal_max",), {"NUMBER": (np.array([5.0]), np.array([2.0])),
                                           "NAME": (np.array([10.0]), np.array([4.0]))},
                      (np.array([1.0]), np.array([1.0])))
    rows = _rows([9.0, 9.0], ["NUMBER", "NAME"], [0, 1])
    moved = within_kind_rows(rows, stats)
    assert moved.features[:, SMAX].tolist() == [2.0, -0.25]
    assert rows.features[0, SMAX] == 9.0  # the rows themselves are not changed
    assert np.isnan(within_kind_rows(_rows([math.nan], ["NAME"], [0]), stats).features[0, SMAX])


def test_a_within_kind_head_scores_as_its_fit_and_sets_kinds_level() -> None:
    rows, tags = _mixed(0)
    probe, held_logits = fit_scorer(rows, IN_KIND, 4, tags)
    assert isinstance(probe, KindSpanProbe) and set(probe.heads) == set(KINDS)
    test, _ = _mixed(1, 60)
    kinds = row_kinds(test.features)
    logits = held_logits(test)
    # the monitor's logit from the raw span equals the fit's out-of-fold logit
    for i in range(len(test)):
        got = probe.logit([0.0], [float(test.features[i, SMAX])], [1.0], str(kinds[i]))
        assert got == pytest.approx(float(logits[i]), abs=1e-4)
    # it is the plain head's logit on the standardised rows
    stats = kind_stats(rows, ("surprisal_max",))
    plain = Candidate("s", ("surprisal_max",), monotone=True)
    _, d, weights = fit_candidate(within_kind_rows(rows, stats), plain, 4, tags)
    expected = design_logits(design(within_kind_rows(test, stats), False, like=d), weights)
    np.testing.assert_allclose(logits, expected, atol=1e-4)
    # a name and a number one true-entity std above their kind's mean score the same
    (m_name, s_name), (m_num, s_num) = stats.of("NAME"), stats.of("NUMBER")
    assert probe.logit([0.0], [m_name[0] + s_name[0]], [1.0], "NAME") == pytest.approx(
        probe.logit([0.0], [m_num[0] + s_num[0]], [1.0], "NUMBER"), abs=1e-4)
    name_head = fit_kind_candidate(rows, IN_KIND, 4, tags).heads["NAME"]
    assert name_head.mean[name_head.features.index("surprisal_max")] > 6.0


def test_the_per_kind_calibration_falls_back_below_the_minimum() -> None:
    assert (MIN_TRUE, MIN_FABRICATED) == (10, 30)  # the plan's minimums
    rng = np.random.default_rng(2)
    n_name, n_num = 200, 100
    kinds = ["NAME"] * n_name + ["NUMBER"] * n_num
    labels = [int(i < 60) for i in range(n_name)] + [int(i < MIN_FABRICATED - 1)
                                                     for i in range(n_num)]
    surprisal = [rng.normal(8.0) + 2.0 * y for y in labels[:n_name]] + \
        [rng.normal(3.0) - 1.0 * y for y in labels[n_name:]]
    rows = _rows(surprisal, kinds, labels)
    tags = ["a" if i % 2 else "b" for i in range(len(rows))]
    candidate = Candidate("per kind", ("surprisal_max", "surprisal_mean"), monotone=True,
                          ensemble=True, per_kind=True)
    probe = fit_kind_candidate(rows, candidate, 4, tags)
    assert set(probe.heads) == {"NAME"}  # numbers: MIN_FABRICATED - 1 fabricated
    pooled = Candidate("pooled", candidate.features, monotone=True, ensemble=True)
    base, _, _ = fit_candidate(rows, pooled, 4, tags)
    assert probe.logit([0.0], [3.5], [1.0], "NUMBER") == pytest.approx(
        base.logit([0.0], [3.5], [1.0], "NUMBER"), abs=1e-6)
    names = np.flatnonzero(np.asarray(kinds) == "NAME")
    alone, _, _ = fit_candidate(rows_subset(rows, names), pooled, 4,
                                [tags[i] for i in names])
    assert probe.logit([0.0], [9.0], [1.0], "NAME") == pytest.approx(
        alone.logit([0.0], [9.0], [1.0], "NAME"), abs=1e-6)
    assert probe.logit([0.0], [9.0], [1.0], "NAME") != pytest.approx(
        base.logit([0.0], [9.0], [1.0], "NAME"), abs=1e-3)
    # one more fabricated number: numbers get their own fit
    rows.labels[n_name + MIN_FABRICATED - 1] = 1
    assert set(fit_kind_candidate(rows, candidate, 4, tags).heads) == {"NAME", "NUMBER"}
    # an ensemble also needs a training source with both labels in the kind
    # (each source has both labels, but within a kind one only)
    one_label = ["a" if (k == "NAME") == bool(y) else "b"
                 for k, y in zip(kinds, rows.labels.tolist(), strict=True)]
    assert fit_kind_candidate(rows, candidate, 4, one_label).heads == {}


def test_fit_candidate_refuses_a_kind_candidate() -> None:
    rows, tags = _mixed(3)
    with pytest.raises(ValueError, match="fit_scorer"):
        fit_candidate(rows, IN_KIND, 4, tags)


def test_the_grid_is_the_plans() -> None:
    names = [c.name for c in PASS7_GRID]
    assert names[:2] == ["surprisal, ensemble", "surprisal max, monotone"]
    assert len(names) == len(set(names)) == 11
    for c in PASS7_GRID:
        assert set(c.within_kind) <= set(c.features) and not (c.within_kind and c.per_kind)
        assert not c.states and (c.monotone or c.ensemble)
    per_kind = next(c for c in PASS7_GRID if c.per_kind)
    assert per_kind.features == ("surprisal_max", "surprisal_mean") and per_kind.ensemble


def test_each_fold_standardises_with_its_training_sources_only(tmp_path: Path) -> None:
    """LOSO: the held-out source's entities move the statistics of no fold that scores them;
    the monitor's way (cached records, the finder) scores as the fold's logits do."""
    from guardrail_entity_hallucination.training.evaluation import span_probe_scorer
    from guardrail_entity_hallucination.training.loso import _concat, evaluate_candidates

    from .test_token_prior import owned_rows_15, tiny_place_features

    _, records = tiny_place_features(tmp_path, 36, 2)
    groups = {s: records[k::3] for k, s in enumerate("abc")}
    rows = {s: owned_rows_15(g) for s, g in groups.items()}
    # source b's true numbers far from everyone else's: a leak would move every fold's mean
    held = rows["b"][0]
    numbers = (row_kinds(held.features) == "NUMBER") & (held.labels == 0)
    assert numbers.sum() >= 5
    held.features[numbers, SMAX] += 50.0
    result = evaluate_candidates(groups, [IN_KIND], 16, progress=False, rows=rows)
    oof = result["candidates"][IN_KIND.name]["oof"]
    got = np.asarray(oof["logits"])[np.asarray(oof["sources"]) == "b"]
    others = _concat([rows["a"][0], rows["c"][0]])
    tags = ["a"] * len(rows["a"][0]) + ["c"] * len(rows["c"][0])
    probe, held_logits = fit_scorer(others, IN_KIND, 16, tags)
    np.testing.assert_allclose(got, held_logits(held), atol=1e-9)
    every = _concat([rows[s][0] for s in "abc"])
    leaked = fit_scorer(every, IN_KIND, 16, ["a"] * len(every))[1](held)
    assert np.abs(leaked - got)[numbers].max() > 0.5
    # the in-kind table: per source and kind with both labels, the fold's AUC
    table = in_kind_aucs(result, rows)
    assert set(table) == {"a", "b", "c"} and all(set(t) == {"NAME"} for t in table.values())
    assert 0.0 <= table["b"]["NAME"]["candidates"][IN_KIND.name] <= 1.0
    # the monitor's way on a cached record of a: the per-entity scores are the fold's logits
    assert isinstance(probe, KindSpanProbe)
    record, (first_rows, owners) = groups["a"][0], rows["a"]
    values = [v for v in span_probe_scorer(probe)(record) if v == v]
    expected = 1.0 / (1.0 + np.exp(-probe.row_logits(rows_subset(first_rows,
                                                                  np.flatnonzero(owners == 0)))))
    assert values and set(np.round(values, 6)) <= set(np.round(expected, 6))
