"""Bad weights files give an error that names the file; the NeMo-style windows cover a stream."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from guardrail_harmful_content.head import DualHead
from guardrail_harmful_content.monitor import HarmfulContentMonitor
from guardrail_harmful_content.training.baselines import nemo_windows

from guardrail import Guard
from guardrail.probes.heads import LinearProbe
from guardrail.probes.io import ProbeFileError, save_probe
from guardrail.rules import CountRule, ThresholdRule


def _monitor(path: Path) -> HarmfulContentMonitor:
    return HarmfulContentMonitor(HarmfulContentMonitor.Options(weights=str(path)))


def test_missing_weights_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "harm.safetensors"
    with pytest.raises(ProbeFileError, match="nowhere/harm.safetensors"):
        _monitor(path)


def test_pickle_weights_are_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "harm.pt"
    torch.save({"x": torch.zeros(1)}, path)
    with pytest.raises(ProbeFileError, match=r"harm\.pt.*pickle"):
        _monitor(path)


def test_corrupt_safetensors_name_the_file(tmp_path: Path) -> None:
    save_probe(tmp_path, DualHead(8), {"layers": [1], "threshold": 0.5}, name="harm")
    (tmp_path / "harm.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ProbeFileError, match="harm.safetensors"):
        _monitor(tmp_path / "harm.safetensors")


def test_a_head_of_another_kind_is_refused(tmp_path: Path) -> None:
    weights = save_probe(tmp_path, LinearProbe(8), {"layer": 1}, name="linear")
    with pytest.raises(ProbeFileError, match="linear.safetensors.*dual"):
        _monitor(weights)


def test_bad_layers_in_the_config_name_the_key(tmp_path: Path) -> None:
    weights = save_probe(tmp_path, DualHead(8), {"layers": "fifteen"}, name="harm")
    with pytest.raises(ProbeFileError, match="'layers'"):
        _monitor(weights)


def test_an_unknown_pooling_in_the_config_names_the_key(tmp_path: Path) -> None:
    weights = save_probe(tmp_path, DualHead(16), {"layers": [1], "pooling": "max"}, name="harm")
    with pytest.raises(ProbeFileError, match=r"harm\.json.*'pooling'.*prefix_mean"):
        _monitor(weights)


@pytest.mark.parametrize("halflife", [None, 0, -3, "twelve"])
def test_a_weighted_mean_head_without_a_usable_halflife_names_the_key(
        tmp_path: Path, halflife: object) -> None:
    config = {"layers": [1], "pooling": "prefix_ema",
              **({} if halflife is None else {"halflife": halflife})}
    weights = save_probe(tmp_path, DualHead(16), config, name="harm")
    with pytest.raises(ProbeFileError, match=r"harm\.json.*'halflife'"):
        _monitor(weights)


def test_a_policy_with_bad_weights_fails_at_load_naming_the_file(tmp_path: Path) -> None:
    policy = {"version": 1, "monitors": [{"id": "harm", "use": "harmful-content",
                                          "options": {"weights": str(tmp_path / "x.bin")}}]}
    with pytest.raises(ProbeFileError, match=r"x\.bin"):
        Guard.from_policy(policy)


def test_weights_carry_their_own_threshold(tmp_path: Path) -> None:
    weights = save_probe(tmp_path, DualHead(8), {"layers": [3], "threshold": 0.42,
                                                 "rule": {"kind": "count", "k": 7}}, name="h")
    monitor = _monitor(weights)
    assert monitor.needs().layers == frozenset({3})
    assert monitor.default_threshold == pytest.approx(0.42) and monitor.k == 7
    override = HarmfulContentMonitor(HarmfulContentMonitor.Options(weights=str(weights),
                                                                   threshold=0.9))
    assert override.default_threshold == pytest.approx(0.9)


def test_a_policy_without_a_rule_halts_by_the_weights_count_rule(tmp_path: Path) -> None:
    weights = save_probe(tmp_path, DualHead(8), {"layers": [3], "threshold": 0.42,
                                                 "rule": {"kind": "count", "k": 7}}, name="h")
    entry = {"id": "harm", "use": "harmful-content", "action": "halt",
             "options": {"weights": str(weights)}}
    guard = Guard.from_policy({"version": 1, "monitors": [entry]}, observer=object())
    assert guard.monitors[0][0].rule == CountRule(k=7)
    # a rule the policy names wins
    named_rule = {**entry, "rule": {"kind": "threshold"}}
    named = Guard.from_policy({"version": 1, "monitors": [named_rule]}, observer=object())
    assert named.monitors[0][0].rule == ThresholdRule()


@pytest.mark.parametrize("n", [0, 1, 199, 200, 201, 350, 351, 1000])
def test_nemo_windows_cover_the_stream_with_50_tokens_of_context(n: int) -> None:
    windows = nemo_windows(n)
    covered: set[int] = set()
    for start, end in windows:
        assert end - start <= 200
        covered.update(range(start, end))
    assert covered == set(range(n))
    for (_, end), (start, _) in itertools.pairwise(windows):
        assert end - start == 50
