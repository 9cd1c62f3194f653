"""What the trainer learns and what the monitor does with it, on a fake observer with a planted
signal (``guardrail.toolkit.fake``): harmful records contain planted words, and from the first one
on every state of layer 2 carries a "harm so far" direction, as a real LM's residual stream does.

The head must find layer 2 (not layer 0), the shipped count-k rule must halt a harmful stream at
its k-th flagged token and pass a benign one, and the saved weights must score a streamed answer
exactly as the trainer scored its cached features."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from guardrail_harmful_content.head import DualHead
from guardrail_harmful_content.training.scoring import prefix_scores, stack_layers
from guardrail_harmful_content.training.train import TrainConfig, train

from guardrail import Guard
from guardrail.probes.io import load_probe
from guardrail.toolkit.fake import PLANTED_WORDS, PlantedObserver, planted_records, write_jsonl
from guardrail.toolkit.features import extract_features

Run = tuple[PlantedObserver, Path, dict[str, Any], Path]


def _observer() -> PlantedObserver:
    return PlantedObserver(hidden_size=16, num_layers=4, signal_words=PLANTED_WORDS,
                           signal_layer=2, strength=3.0, prefix_strength=3.0)


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("harm-planted")
    data = root / "data"
    data.mkdir()
    rows = planted_records(200, seed=3)
    for split, part in (("train", rows[:120]), ("val", rows[120:160]), ("test", rows[160:])):
        write_jsonl(data / f"{split}.jsonl", part)
    config = TrainConfig(data=data, out=root / "weights", layers=(0, 2), epochs=6, lr=1e-2,
                         cache=root / "cache", progress=False, max_train=None)
    saved = train(config, observer=_observer())
    return _observer(), Path(saved["weights"]), saved, data / "test.jsonl"


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory: pytest.TempPathFactory, planted_run: Run) -> Run:
    """``--sequence-hidden 8 --ensemble-seeds 1`` on the planted layer: two MLP heads whose
    hidden units the saved head keeps side by side."""
    root = tmp_path_factory.mktemp("harm-planted-mlp")
    data = planted_run[3].parent
    config = TrainConfig(data=data, out=root / "weights", layers=(2,), epochs=10, lr=1e-2,
                         cache=root / "cache", progress=False, max_train=None,
                         sequence_hidden=8, ensemble_seeds=(1,))
    saved = train(config, observer=_observer())
    return _observer(), Path(saved["weights"]), saved, planted_run[3]


@pytest.fixture(params=["linear", "mlp"])
def any_run(request: pytest.FixtureRequest) -> Run:
    """Each of the shipped head shapes: SCM's linear sequence head, and the MLP one."""
    run: Run = request.getfixturevalue("planted_run" if request.param == "linear" else "mlp_run")
    return run


def test_an_mlp_head_is_saved_with_its_units_and_separates_the_streams(mlp_run: Run) -> None:
    _, weights, saved, _ = mlp_run
    head = load_probe(weights).head
    assert isinstance(head, DualHead) and head.sequence_hidden == 16
    assert saved["metrics"]["val"]["streaming"]["macro_f1"] >= 0.8


def _guard(run: Run) -> Guard:
    observer, weights, saved, _ = run
    policy = {"version": 1, "monitors": [{
        "id": "harm", "use": "harmful-content", "action": "halt",
        "threshold": saved["threshold"], "rule": saved["rule"],
        "options": {"weights": str(weights)}}]}
    return Guard.from_policy(policy, observer=observer)


def _test_rows(run: Run) -> list[dict[str, Any]]:
    return [json.loads(line) for line in run[3].read_text().splitlines()]


def test_the_head_finds_the_planted_layer_and_separates_the_streams(planted_run: Run) -> None:
    _, _, saved, _ = planted_run
    assert 2 in saved["layers"]
    by_layers = {tuple(c["layers"]): c["val_streaming_macro_f1"]
                 for c in saved["training"]["candidates"]}
    assert by_layers[(2,)] >= 0.9 > by_layers[(0,)] + 0.15
    val = saved["metrics"]["val"]["streaming"]
    assert val["macro_f1"] >= 0.9 and val["false_halt_rate"] <= 0.03


def test_count_rule_halts_harmful_streams_at_the_kth_flag_and_passes_benign_ones(
        any_run: Run) -> None:
    threshold, k = any_run[2]["threshold"], any_run[2]["rule"]["k"]
    guard = _guard(any_run)
    outcomes = {0: [], 1: []}  # type: dict[int, list[bool]]
    for row in _test_rows(any_run):
        session = guard.session(prompt=row["prompt"], record_scores=True)
        session.feed(row["response"])
        report = session.finish()
        outcomes[row["label"]].append(report.halted)
        if report.halted:
            assert report.halt is not None and report.halt.monitor == "harm"
            flagged = [i for i, s in report.scores["harm"] if s >= threshold]
            assert report.halt.at == flagged[k - 1]
            assert report.released_tokens <= report.halt.at
    assert sum(outcomes[1]) / len(outcomes[1]) >= 0.9
    assert sum(outcomes[0]) / len(outcomes[0]) <= 0.1


def test_streamed_scores_equal_the_trainers_scores_on_cached_features(any_run: Run,
                                                                       tmp_path: Path) -> None:
    observer, weights, saved, test = any_run
    head = load_probe(weights).head
    assert isinstance(head, DualHead)
    cached = extract_features(observer, test, tmp_path, saved["layers"]).records[:6]
    offline = prefix_scores(head, stack_layers(cached, saved["layers"], saved["pooling"]))
    guard = _guard(any_run)
    for record, expected in zip(cached, offline, strict=True):
        session = guard.session(prompt=record.prompt, record_scores=True, dry_run=True)
        for piece in (record.response[:7], record.response[7:]):  # chunking must not matter
            session.feed(piece)
        streamed = [s for _, s in session.finish().scores["harm"]]
        assert streamed == pytest.approx(expected, abs=2e-3)



def test_a_stream_cut_back_by_a_route_scores_like_a_fresh_one(any_run: Run,
                                                               tmp_path: Path) -> None:
    """The prefix-mean head keeps a running mean per stream; when a route cuts the response back
    (``Monitor.truncate``), the cut tokens must leave the mean: the rewritten tokens then score
    as they would in a stream that never had the cut ones."""
    from guardrail_harmful_content.monitor import HarmfulContentMonitor

    from guardrail.monitor import Features, MonitorContext
    from guardrail.stream import TokenSpan

    observer, weights, saved, test = any_run
    assert saved["pooling"] == "prefix_mean"
    monitor = HarmfulContentMonitor(HarmfulContentMonitor.Options(weights=str(weights)))
    records = extract_features(observer, test, tmp_path, saved["layers"]).records
    harmful = next(r for r in records if r.label == 1 and len(r) > 12)
    benign = next(r for r in records if r.label == 0 and len(r) > 12)

    def rows(record: Any, start: int, end: int) -> dict[int, Any]:
        return {layer: record.hidden[layer][start:end].float().numpy()
                for layer in saved["layers"]}

    def feed(state: Any, hidden: dict[int, Any], first: int) -> list[float]:
        n = len(next(iter(hidden.values())))
        tokens = [TokenSpan(first + i, first + i + 1) for i in range(n)]
        features = Features(tokens=tokens, first_index=first, text="x" * (first + n),
                            hidden=hidden)
        return [s.value for s in monitor.update(state, features)]

    context = MonitorContext("harm", observer=observer)
    routed = monitor.start(context)
    feed(routed, rows(benign, 0, 6), 0)
    feed(routed, rows(harmful, 0, 10), 6)  # read, then cut away by the route
    monitor.truncate(routed, 6)
    after = feed(routed, rows(benign, 6, 12), 6)
    fresh = monitor.start(context)
    feed(fresh, rows(benign, 0, 6), 0)
    assert after == pytest.approx(feed(fresh, rows(benign, 6, 12), 6), abs=1e-9)


def test_the_trainer_averages_the_heads_of_its_ensemble_seeds(planted_run: Run,
                                                              tmp_path: Path) -> None:
    _, weights, _, test = planted_run
    config = TrainConfig(data=test.parent, out=tmp_path / "weights", layers=(2,), epochs=6,
                         lr=1e-2, cache=tmp_path / "cache", progress=False, max_train=None,
                         ensemble_seeds=(1, 2))
    ensemble = train(config, observer=_observer())
    assert ensemble["training"]["ensemble"]["seeds"] == [0, 1, 2]
    assert len(ensemble["training"]["ensemble"]["members_val_streaming_macro_f1"]) == 3
    assert ensemble["metrics"]["val"]["streaming"]["macro_f1"] >= 0.8
    single, averaged = load_probe(weights).head, load_probe(ensemble["weights"]).head
    assert isinstance(single, DualHead) and isinstance(averaged, DualHead)
    assert not torch.equal(single.sequence_head.weight, averaged.sequence_head.weight)
