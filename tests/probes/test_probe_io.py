"""Probe weights on disk: exact round-trips and clear errors for bad files."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
import torch
from safetensors.torch import save_file

from guardrail.probes.heads import LinearProbe, ProbeHead
from guardrail.probes.io import ProbeFileError, load_paper_probe, load_probe, save_probe

H = TypeVar("H", bound=ProbeHead)

CONFIG = {"base_model": "tiny-llama", "layer": 2, "threshold": 0.7,
          "rule": {"kind": "count", "k": 3}, "data": ["synthetic"],
          "splits": {"train": 80, "val": 20}, "metrics": {"auc": 0.97}}


class Payload:
    """An arbitrary object: weights-only loading must refuse to unpickle it."""


@dataclass
class FakeObserver:
    name: str = "tiny-llama"
    hidden_size: int = 16
    num_layers: int = 4


def _trained(head: H) -> H:
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p))
    return head


@pytest.mark.parametrize("make", [
    lambda: LinearProbe(16),
])
def test_round_trip_is_exact(tmp_path: Path, make: Callable[[], ProbeHead]) -> None:
    head = _trained(make())
    weights = save_probe(tmp_path, head, CONFIG, name="harm")
    assert weights == tmp_path / "harm.safetensors"
    assert (tmp_path / "harm.json").exists()
    loaded = load_probe(weights, observer=FakeObserver())
    for key, value in head.state_dict().items():
        assert torch.equal(loaded.head.state_dict()[key], value), key
    assert loaded.threshold == 0.7 and loaded.layer == 2
    assert loaded.config["metrics"] == {"auc": 0.97}
    assert loaded.config["splits"] == {"train": 80, "val": 20}
    x = torch.randn(3, 16)
    assert isinstance(loaded.head, LinearProbe)
    assert isinstance(head, LinearProbe)
    assert torch.equal(loaded.head.score(x), head.eval().score(x))


def test_pickle_files_are_refused(tmp_path: Path) -> None:
    for suffix in (".bin", ".pt", ".pth", ".pkl"):
        path = tmp_path / f"probe{suffix}"
        torch.save({"linear.weight": torch.zeros(1, 4)}, path)
        with pytest.raises(ProbeFileError, match=r"pickle.*safetensors only"):
            load_probe(path)


def test_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ProbeFileError, match=r"probe weights not found: .*nope.safetensors"):
        load_probe(tmp_path / "nope.safetensors")
    save_probe(tmp_path, LinearProbe(16), CONFIG)
    (tmp_path / "probe.json").unlink()
    with pytest.raises(ProbeFileError, match=r"probe config not found: .*probe.json"):
        load_probe(tmp_path / "probe.safetensors")


def test_config_that_disagrees_with_tensors_names_the_key(tmp_path: Path) -> None:
    save_probe(tmp_path, LinearProbe(16), CONFIG)
    config_path = tmp_path / "probe.json"
    document = json.loads(config_path.read_text())
    document["head"]["hidden_size"] = 32
    config_path.write_text(json.dumps(document))
    with pytest.raises(ProbeFileError, match=r"'linear.weight' has shape \(1, 16\).*\(1, 32\)"):
        load_probe(tmp_path)
    document["head"] = {"kind": "linear"}
    config_path.write_text(json.dumps(document))
    with pytest.raises(ProbeFileError, match="key 'head'.*lacks 'hidden_size'"):
        load_probe(tmp_path)
    del document["head"]
    config_path.write_text(json.dumps(document))
    with pytest.raises(ProbeFileError, match="key 'head'"):
        load_probe(tmp_path)


def test_extra_or_missing_tensors_are_named(tmp_path: Path) -> None:
    save_probe(tmp_path, LinearProbe(16), CONFIG)
    save_file({"linear.weight": torch.zeros(1, 16)}, str(tmp_path / "probe.safetensors"))
    with pytest.raises(ProbeFileError, match="lacks tensor 'linear.bias'"):
        load_probe(tmp_path)
    save_file({"linear.weight": torch.zeros(1, 16), "linear.bias": torch.zeros(1),
               "extra": torch.zeros(2)}, str(tmp_path / "probe.safetensors"))
    with pytest.raises(ProbeFileError, match="has tensor 'extra'"):
        load_probe(tmp_path)


def test_observer_mismatch_is_explained(tmp_path: Path) -> None:
    save_probe(tmp_path, LinearProbe(16), CONFIG)
    with pytest.raises(ProbeFileError, match="hidden size 16 but observer 'big' has .* 576"):
        load_probe(tmp_path, observer=FakeObserver(name="big", hidden_size=576))
    with pytest.raises(ProbeFileError, match="layer 2 but observer 'tiny-llama' has 2 layers"):
        load_probe(tmp_path, observer=FakeObserver(num_layers=2))


def test_corrupt_files_give_clear_errors(tmp_path: Path) -> None:
    save_probe(tmp_path, LinearProbe(16), CONFIG)
    (tmp_path / "probe.json").write_text("{not json")
    with pytest.raises(ProbeFileError, match="probe.json: not valid JSON"):
        load_probe(tmp_path)
    save_probe(tmp_path, LinearProbe(16), CONFIG)
    (tmp_path / "probe.safetensors").write_bytes(b"garbage")
    with pytest.raises(ProbeFileError, match="not a readable safetensors file"):
        load_probe(tmp_path)


def _paper_dir(tmp_path: Path, *, pickled: bool) -> tuple[Path, torch.nn.Linear]:
    torch.manual_seed(1)
    linear = torch.nn.Linear(16, 1)
    (tmp_path / "probe_config.json").write_text(json.dumps(
        {"target_layer_name": "LlamaDecoderLayer", "layer_idx": 3, "hidden_size": 16}))
    if pickled:
        torch.save(linear.state_dict(), tmp_path / "probe_head.bin")
    else:
        save_file(dict(linear.state_dict()), str(tmp_path / "probe_head.safetensors"))
    return tmp_path, linear


@pytest.mark.parametrize("pickled", [False, True])
def test_paper_format_loads(tmp_path: Path, pickled: bool) -> None:
    directory, linear = _paper_dir(tmp_path, pickled=pickled)
    loaded = load_paper_probe(directory, observer=FakeObserver())
    assert loaded.layer == 3
    assert isinstance(loaded.head, LinearProbe)
    x = torch.randn(5, 16)
    with torch.no_grad():
        assert torch.allclose(loaded.head.score(x), torch.sigmoid(linear(x)).squeeze(-1))


def test_paper_format_refuses_non_tensor_pickles(tmp_path: Path) -> None:
    (tmp_path / "probe_config.json").write_text(json.dumps({"layer_idx": 1, "hidden_size": 4}))
    torch.save({"weight": Payload()}, tmp_path / "probe_head.bin")
    with pytest.raises(ProbeFileError, match="weights-only"):
        load_paper_probe(tmp_path)


def test_paper_format_errors(tmp_path: Path) -> None:
    with pytest.raises(ProbeFileError, match="paper probe config not found"):
        load_paper_probe(tmp_path)
    (tmp_path / "probe_config.json").write_text(json.dumps({"layer_idx": 1}))
    with pytest.raises(ProbeFileError, match="'hidden_size' must be an integer"):
        load_paper_probe(tmp_path)
    directory, _ = _paper_dir(tmp_path, pickled=False)
    with pytest.raises(ProbeFileError, match="hidden size 16 but observer"):
        load_paper_probe(directory, observer=FakeObserver(hidden_size=32))
    (directory / "adapter_config.json").write_text("{}")
    with pytest.warns(UserWarning, match="LoRA adapter"):
        loaded = load_paper_probe(directory)
    assert loaded.notes
