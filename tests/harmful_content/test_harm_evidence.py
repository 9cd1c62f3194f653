"""The streaming score transforms a head's rule may read (``evidence.py``), and the selection's
halt tables for their rule families: the selection halts where the runtime's count rule would."""

from __future__ import annotations

import numpy as np
import pytest
from guardrail_harmful_content.evidence import ScoreTransform, check_spec, transform
from guardrail_harmful_content.training.selection.rule import (
    FAMILIES,
    family_grid,
    family_halts,
    rule_of,
)

from guardrail.monitor import Score
from guardrail.rules import CountRule

SPECS = [{"kind": "ema", "halflife": 4.0}, {"kind": "cusum", "drift": 0.9, "clip": 8.0}]


def _answers(n: int = 12, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        z = rng.normal(-1.0 + 0.5 * i, 2.5, size=int(rng.integers(1, 60)))
        out.append(1.0 / (1.0 + np.exp(-z)))
    return out


@pytest.mark.parametrize("spec", SPECS)
def test_the_streaming_form_matches_the_array_form_and_resumes_after_a_cut(spec: dict) -> None:
    for p in _answers():
        stream = ScoreTransform(spec)
        got = [stream.update(float(v)) for v in p]
        np.testing.assert_allclose(got, transform(p, spec), rtol=1e-9, atol=1e-12)
        cut = len(p) // 2
        stream.truncate(cut)
        resumed = [stream.update(float(v)) for v in p[cut:]]
        np.testing.assert_allclose(resumed, got[cut:], rtol=1e-9, atol=1e-12)


def test_cusum_counts_how_far_above_the_drift_and_drains_over_benign_tokens() -> None:
    spec = {"kind": "cusum", "drift": 0.9, "clip": 8.0}
    # five prefixes just above the drift add less evidence than one far above it
    just = transform(np.full(5, 0.92), spec)[-1]
    far = transform(np.array([0.9999]), spec)[-1]
    assert just < far
    # a burst, then benign text: the evidence drains back to zero
    drained = transform(np.array([0.999] * 3 + [0.2] * 10), spec)
    assert drained[2] > 0.5 and drained[-1] == 0.0


def test_an_ema_damps_a_burst_that_a_sustained_run_keeps() -> None:
    spec = {"kind": "ema", "halflife": 8.0}
    burst = transform(np.array([0.1] * 20 + [0.99] * 2 + [0.1] * 5), spec)
    run = transform(np.array([0.1] * 20 + [0.99] * 20), spec)
    assert burst.max() < 0.5 < run[-1]


@pytest.mark.parametrize("bad", [{"kind": "median"}, {"kind": "ema", "halflife": 0},
                                 {"kind": "cusum", "drift": 1.5, "clip": 8},
                                 {"kind": "cusum", "drift": 0.9}, "ema"])
def test_a_bad_transform_names_its_field(bad: object) -> None:
    with pytest.raises(ValueError, match="score_transform"):
        check_spec(bad)


@pytest.mark.parametrize(("family", "param"), [("count", None), ("ema", 4.0), ("cusum", None)])
def test_a_familys_halts_are_where_the_runtime_count_rule_fires(family: str,
                                                                 param: float | None) -> None:
    answers = _answers(20, seed=3)
    table = family_halts(answers, family, param)
    a, b = family_grid(family)
    assert table.shape == (len(answers), len(a), len(b))
    assert family in FAMILIES
    fired = 0
    for j in range(len(a)):
        for k in range(0, len(b), 3):
            rule = rule_of(family, param, j, k)
            for i, p in enumerate(answers):
                spec = rule["score_transform"]
                stream = ScoreTransform(spec) if spec else None
                counter = CountRule(k=rule["k"])
                state = counter.start()
                halt = -1
                for t, v in enumerate(p):
                    value = stream.update(float(v)) if stream else float(v)
                    if counter.update(state, [Score(t, value)], rule["threshold"]):
                        halt = t
                        break
                assert table[i, j, k] == halt, (family, j, k, i)
                fired += halt >= 0
    assert fired > 0
