"""``guardrail train harmful-content`` end to end on a tiny random HF model: the real training path
(data files, HF observer feature cache, SCM dual head, layer choice, count-k calibration, saving)
writes weights that the monitor loads and runs in a guard. A random model carries no signal worth
learning; test_harm_planted.py checks what the head learns."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from guardrail import Guard
from guardrail.plugins import get_host
from guardrail.testing.tiny_models import build_tiny_model


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, write_tiny_splits: Callable[[Path], Path]
             ) -> tuple[Path, Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("harm-train")
    model = build_tiny_model(root / "tiny", arch="llama", num_layers=3, hidden_size=32)
    data = write_tiny_splits(root / "data")
    out = root / "weights"
    trainer = get_host().trainers()["harmful-content"].factory
    code = trainer(["--data", str(data), "--model", str(model), "--layers", "0", "2",
                    "--epochs", "3", "--out", str(out), "--cache", str(root / "cache"),
                    "--quiet"])
    assert code == 0
    config = json.loads((out / "harmful_content.json").read_text())
    return model, out / "harmful_content.safetensors", config


def test_training_writes_a_small_safetensors_head_with_its_config(
        tiny_run: tuple[Path, Path, dict[str, Any]]) -> None:
    _, weights, config = tiny_run
    assert weights.exists() and weights.stat().st_size < 20_000
    assert config["base_model"] == "tiny"
    assert set(config["layers"]) <= {0, 2} and config["dims"]["hidden_size"] == 32
    assert config["rule"]["kind"] == "count" and config["rule"]["k"] >= 1
    assert 0.0 < config["threshold"] < 1.0
    assert config["splits"]["train"] == 24 and config["splits"]["val"] == 12
    assert config["training"]["loss"] == {"token_ce": 0.6, "sequence_ce": 0.4, "logic": 1.0}
    tried = [c["layers"] for c in config["training"]["candidates"]]
    assert [0] in tried and [2] in tried and [0, 2] in tried


def test_trained_weights_run_in_a_guard_on_the_same_observer(
        tiny_run: tuple[Path, Path, dict[str, Any]], tiny_harmful_text: str) -> None:
    model, weights, config = tiny_run
    policy = {"version": 1, "observer": {"model": str(model)},
              "monitors": [{"id": "harm", "use": "harmful-content", "action": "halt",
                            "threshold": config["threshold"], "rule": config["rule"],
                            "options": {"weights": str(weights)}}]}
    guard = Guard.from_policy(policy)
    session = guard.session(prompt="Question?", record_scores=True)
    session.feed(tiny_harmful_text)
    report = session.finish()
    scores = report.scores["harm"]
    assert len(scores) == report.tokens and all(0.0 <= s <= 1.0 for _, s in scores)


def test_a_read_cap_bounds_the_calibrated_share_read(
        tiny_trainer: tuple[Callable[[list[str]], int], list[str], Path]) -> None:
    trainer, args, out = tiny_trainer
    assert trainer([*args, "--layers", "2", "--epochs", "2", "--max-fraction-seen", "0.25"]) == 0
    config = json.loads((out / "harmful_content.json").read_text())
    assert config["calibration"]["max_fraction_seen"] == 0.25
    assert config["calibration"]["constraint_met"]
    assert config["metrics"]["val"]["streaming"]["fraction_seen"] <= 0.25


def test_recalibrate_chooses_the_rule_again_and_keeps_the_heads(
        tiny_trainer: tuple[Callable[[list[str]], int], list[str], Path],
        capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.numpy import load_file

    trainer, args, out = tiny_trainer
    assert trainer([*args, "--layers", "2", "--epochs", "2"]) == 0
    first = json.loads((out / "harmful_content.json").read_text())
    again = out.parent / "recalibrated"
    base = [a if a != str(out) else str(again) for a in args]
    assert trainer([*base, "--layers", "2", "--recalibrate", str(out),
                    "--max-fraction-seen", "0.25"]) == 0
    config = json.loads((again / "harmful_content.json").read_text())
    streaming = config["metrics"]["val"]["streaming"]
    assert config["calibration"]["max_fraction_seen"] == 0.25
    assert config["calibration"]["constraint_met"] and streaming["fraction_seen"] <= 0.25
    # a cap no setting meets (the head reads ~18% of a harmful answer at best) is reported
    assert trainer([*base, "--layers", "2", "--recalibrate", str(out),
                    "--max-fraction-seen", "0.05"]) == 0
    unmet = json.loads((again / "harmful_content.json").read_text())
    assert unmet["calibration"]["max_fraction_seen"] == 0.05
    assert not unmet["calibration"]["constraint_met"]
    assert unmet["metrics"]["val"]["streaming"]["fraction_seen"] > 0.05
    assert (config["threshold"], config["rule"]["k"]) == (streaming["threshold"],
                                                          streaming["k"])
    before = config["recalibrated_from"]
    assert before["threshold"] == first["threshold"] and before["rule"] == first["rule"]
    assert config["training"] == first["training"] and config["head"] == first["head"]
    old = load_file(str(out / "harmful_content.safetensors"))
    new = load_file(str(again / "harmful_content.safetensors"))
    assert old.keys() == new.keys() and all((old[k] == new[k]).all() for k in old)

    missing = out.parent / "no-such-weights"
    assert trainer([*base, "--recalibrate", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
    assert trainer([*base, "--recalibrate", str(out), "--calibration", "crossfit"]) == 2
    assert "--calibration val" in capsys.readouterr().err
