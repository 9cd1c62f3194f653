"""Normalised states and several half-lives (the fourteenth pass): the runtime monitor scores a
stream exactly as the trainer scored the same states, the transforms are causal, and a bad value
is refused naming the option or key."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from guardrail_harmful_content.monitor import HarmfulContentMonitor
from guardrail_harmful_content.pooling import normalise_tokens, stack_states
from guardrail_harmful_content.training.pooled import (
    HalfLife,
    PoolRecord,
    fit_loso,
    fit_probe,
    to_dual_head,
)
from guardrail_harmful_content.training.scoring import prefix_scores, stack_layers
from guardrail_harmful_content.training.selection.features import normalise_records

from guardrail.monitor import Features, MonitorContext
from guardrail.probes.io import ProbeFileError, save_probe
from guardrail.stream import TokenSpan
from guardrail.toolkit.features import CachedRecord

from .test_harm_loso import _pool

LAYERS = [3, 5]
HEADS = [(6.0, "rms"), ((3.0, 12.0), "none"), ((3.0, 12.0), "rms")]


def _raw_pool(seed: int) -> list[PoolRecord]:
    """``_pool`` with a few formatting-like tokens of huge norm, as real residual streams have."""
    pool = _pool(seed)
    for r in pool:
        for layer in r.hidden:
            h = r.hidden[layer].astype(np.float32)
            h[::7] *= 40.0
            r.hidden[layer] = h
    return pool


def _features(record: PoolRecord, a: int, b: int) -> Features:
    hidden = {layer: np.asarray(record.hidden[layer][a:b], dtype=np.float32)
              for layer in record.hidden}
    return Features(tokens=[TokenSpan(i, i + 1) for i in range(a, b)], first_index=a,
                    text="x" * b, hidden=hidden)


def _config(halflife: HalfLife, token_norm: str) -> dict[str, object]:
    return {"base_model": "tiny", "layer": 3, "layers": LAYERS, "pooling": "prefix_ema",
            "halflife": list(halflife) if isinstance(halflife, tuple) else halflife,
            **({"token_norm": token_norm} if token_norm != "none" else {}),
            "threshold": 0.5, "rule": {"kind": "count", "k": 2}}


def test_rms_normalisation_divides_each_token_by_its_own_rms() -> None:
    rng = np.random.default_rng(0)
    states = rng.normal(size=(5, 16)).astype(np.float32)
    out = normalise_tokens(states, "rms")
    np.testing.assert_allclose(np.sqrt((out.astype(np.float64) ** 2).mean(axis=1)), 1.0,
                               atol=1e-4)  # the epsilon
    # a massive-activation token weighs no more than any other once normalised
    loud = states.copy()
    loud[2] *= 1000.0
    np.testing.assert_allclose(normalise_tokens(loud, "rms"), out, atol=2e-5)  # the epsilon
    np.testing.assert_array_equal(normalise_tokens(states, "none"), states)


@pytest.mark.parametrize(("halflife", "token_norm"), HEADS)
def test_the_monitor_scores_raw_states_as_the_trainer_scored_them(
        tmp_path: Path, halflife: HalfLife, token_norm: str) -> None:
    raw = _raw_pool(1)
    pool = copy.deepcopy(raw)
    normalise_records(pool, token_norm)  # what select --token-norm does to the pool
    probe = fit_probe(pool, LAYERS, 0.5, halflife)
    weights = save_probe(tmp_path, to_dual_head(probe, 16), _config(halflife, token_norm),
                         name="probe")
    monitor = HarmfulContentMonitor(HarmfulContentMonitor.Options(weights=str(weights)))
    assert monitor.token_norm == token_norm
    for normed, record in zip(pool[:6], raw[:6], strict=True):
        expected = probe.prefix_scores(normed)
        state = monitor.start(MonitorContext("harm"))
        got: list[float] = []
        n = len(record)
        for a, b in ((0, 7), (7, 8), (8, n)):  # the observer's raw states, in uneven chunks
            got.extend(s.value for s in monitor.update(state, _features(record, a, b)))
        np.testing.assert_allclose(got, expected, atol=2e-5)
        # a stream cut back to 7 tokens then fed the rest scores as a fresh one
        monitor.truncate(state, 7)
        resumed = [s.value for s in monitor.update(state, _features(record, 7, n))]
        np.testing.assert_allclose(resumed, expected[7:], atol=2e-5)
        # the offline scorer (bench/harm_eval.py) reads the same head as the monitor does
        n = len(record)
        cached = CachedRecord(0, "", "x" * n, record.label, (), torch.zeros(n, 2),
                              torch.zeros(n, dtype=torch.long),
                              {k: torch.as_tensor(v) for k, v in record.hidden.items()})
        offline = prefix_scores(to_dual_head(probe, 16), stack_layers(
            [cached], LAYERS, "prefix_ema", halflife, token_norm))[0]
        np.testing.assert_allclose(offline, expected, atol=2e-5)


@pytest.mark.parametrize(("halflife", "token_norm"), HEADS)
def test_no_later_token_changes_an_earlier_row_or_score(
        tmp_path: Path, halflife: HalfLife, token_norm: str) -> None:
    record = _raw_pool(2)[1]
    other = _raw_pool(5)[4]
    m = 9
    spliced = {layer: np.concatenate([record.hidden[layer][:m], other.hidden[layer][m:]])
               for layer in record.hidden}
    full = stack_states(record.hidden, LAYERS, "prefix_ema", halflife, token_norm)
    cut = stack_states(spliced, LAYERS, "prefix_ema", halflife, token_norm)
    torch.testing.assert_close(full[:m], cut[:m])
    assert not torch.allclose(full[m:], cut[m:])
    pool = _raw_pool(1)
    normalise_records(pool, token_norm)
    weights = save_probe(tmp_path, to_dual_head(fit_probe(pool, LAYERS, 0.5, halflife), 16),
                         _config(halflife, token_norm), name="probe")
    monitor = HarmfulContentMonitor(HarmfulContentMonitor.Options(weights=str(weights)))
    scores = []
    for hidden in (record.hidden, spliced):
        state = monitor.start(MonitorContext("harm"))
        n = len(record)
        scores.append([s.value for s in monitor.update(state, Features(
            tokens=[TokenSpan(i, i + 1) for i in range(n)], first_index=0, text="x" * n,
            hidden={k: np.asarray(v, dtype=np.float32) for k, v in hidden.items()}))])
    assert scores[0][:m] == scores[1][:m]


def test_two_half_lives_with_a_prompt_term_fit_out_of_source() -> None:
    pool = _pool(3)
    rng = np.random.default_rng(3)
    for r in pool:
        r.prompt = {layer: rng.normal(size=16) for layer in LAYERS}
    scored = fit_loso(pool, LAYERS, [(3,), (3, 5)], [0.5], halflife=(3.0, 12.0),
                      prompt_scale=0.75)
    for key in (((3,), 0.5), ((3, 5), 0.5)):
        assert [len(s) for s in scored[key]] == [len(r) for r in pool]
    probe = fit_probe(pool, LAYERS, 0.5, (3.0, 12.0), prompt_scale=0.75)
    assert probe.w.shape == (2 * 2 * 16,)
    prompt_w = probe.prompt_weights()
    assert prompt_w is not None and prompt_w.shape == (2 * 16,)


def test_selection_writes_both_into_weights_the_monitor_reads(tmp_path: Path) -> None:
    from guardrail_harmful_content.training.select import candidate_name, run, save_chosen

    raw = _raw_pool(2)
    pool = copy.deepcopy(raw)
    normalise_records(pool, "rms")
    report = run(pool, [3, 5], [1.0], max_false_halts=0.05, max_read=0.9,
                 halflives=((3.0, 12.0),), layer_sets=[(3,)])
    chosen = {**report["chosen"], "token_norm": "rms"}
    assert candidate_name(chosen) == "ridge 1 rms hl3+12 3"
    weights = save_chosen(pool, {**report, "chosen": chosen}, tmp_path)
    config = json.loads(weights.with_suffix(".json").read_text(encoding="utf-8"))
    assert (config["halflife"], config["token_norm"]) == ([3.0, 12.0], "rms")
    monitor = HarmfulContentMonitor(HarmfulContentMonitor.Options(weights=str(weights)))
    probe = fit_probe(pool, [3], 1.0, (3.0, 12.0))
    state = monitor.start(MonitorContext("harm"))
    got = [s.value for s in monitor.update(state, _features(raw[0], 0, len(raw[0])))]
    np.testing.assert_allclose(got, probe.prefix_scores(pool[0]), atol=2e-5)


def test_bad_values_are_named() -> None:
    with pytest.raises(ValueError, match="token_norm 'l2'"):
        normalise_tokens(np.ones((2, 3)), "l2")
    with pytest.raises(ValueError, match="token_norm 'l2'"):
        normalise_records(_pool(0)[:2], "l2")
    with pytest.raises(ValueError, match="token_norm 'l2'"):
        stack_states({3: np.ones((2, 3))}, [3], token_norm="l2")
    with pytest.raises(ValueError, match="halflife must be"):
        stack_states({3: np.ones((2, 3))}, [3], "prefix_ema", [4.0, -1.0])


@pytest.mark.parametrize(("key", "value"), [("token_norm", "l2"), ("halflife", []),
                                            ("halflife", [4.0, 0.0]), ("halflife", "12")])
def test_the_monitor_refuses_a_bad_config_naming_the_key(tmp_path: Path, key: str,
                                                          value: object) -> None:
    probe = fit_probe(_pool(1), LAYERS, 0.5, (3.0, 12.0))
    config = {**_config((3.0, 12.0), "none"), key: value}
    weights = save_probe(tmp_path, to_dual_head(probe, 16), config, name="probe")
    with pytest.raises(ProbeFileError, match=f"key '{key}'"):
        HarmfulContentMonitor(HarmfulContentMonitor.Options(weights=str(weights)))


@pytest.mark.parametrize(("args", "message"), [
    (["--token-norm", "l2"], "argument --token-norm: invalid choice: 'l2'"),
    (["--halflives", "4,x"], "'4,x': a half-life is none, a number of tokens > 0, or several"),
    (["--halflives", "4,-32"], "'4,-32': a half-life is none"),
])
def test_select_names_a_bad_option(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   args: list[str], message: str) -> None:
    from guardrail_harmful_content.training.select import main

    with pytest.raises(SystemExit):
        main(["--pool", str(tmp_path / "p.jsonl"), "--report", str(tmp_path / "r.json"),
              *args])
    assert message in capsys.readouterr().err
