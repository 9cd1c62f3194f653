"""Span-head files: a saved head reloads with the same scores, and a malformed one fails to load
with a ProbeFileError that names the key at fault (the monitor turns it into a policy error)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from guardrail_entity_hallucination.monitor import EntityHallucinationMonitor
from guardrail_entity_hallucination.probe import EntityProbe, load_entity_probe
from guardrail_entity_hallucination.span_probe import (
    SPAN_FEATURES,
    EntitySpanProbe,
    save_span_probe,
    span_features,
)
from safetensors.torch import load_file, save_file

from guardrail.probes.heads import LinearProbe
from guardrail.probes.io import ProbeFileError

HIDDEN = 8


def _probe() -> EntitySpanProbe:
    head = LinearProbe(HIDDEN + len(SPAN_FEATURES), seed=1)
    with torch.no_grad():
        head.linear.weight.mul_(100.0)
        head.linear.bias.fill_(0.25)
    return EntitySpanProbe(head, 3, 0.4, SPAN_FEATURES,
                           torch.linspace(0.5, 2.0, len(SPAN_FEATURES)),
                           torch.linspace(1.0, 3.0, len(SPAN_FEATURES)))


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    return save_span_probe(_probe(), tmp_path / "span.safetensors", {"base_model": "tiny"})


def test_a_saved_span_head_reloads_with_the_same_scores(saved: Path) -> None:
    original = _probe()
    loaded = load_entity_probe(saved)
    assert isinstance(loaded, EntitySpanProbe) and not isinstance(loaded, EntityProbe)
    assert (loaded.layer, loaded.threshold, loaded.features, loaded.hidden_size) == (
        3, pytest.approx(0.4), SPAN_FEATURES, HIDDEN)
    states = np.random.default_rng(0).normal(size=(3, HIDDEN)).astype(np.float32)
    args = ([1.0, math.nan, 4.0], [2.0, 2.5, 0.5], "DATE")
    value = loaded.score(loaded.dots(states), *args)
    assert value == pytest.approx(original.score(original.dots(states), *args), abs=1e-6)
    # the logit is the mean state's dot product plus the standardised span features' part
    w = original.head.linear.weight.detach()[0].double().numpy()
    raw = span_features(*args)
    z = [(raw[n] - m) / s for n, m, s in zip(SPAN_FEATURES, original.mean.tolist(),
                                              original.std.tolist(), strict=True)]
    logit = float(states.mean(0) @ w[:HIDDEN]) + 0.25 + float(np.dot(w[HIDDEN:], z))
    assert value == pytest.approx(1 / (1 + math.exp(-logit)), abs=1e-5)


def _edit(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    config_path = path.with_suffix(".json")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    change(config)
    config_path.write_text(json.dumps(config), encoding="utf-8")


@pytest.mark.parametrize(("change", "key"), [
    (lambda c: c["span_features"]["names"].__setitem__(2, "surprisal_median"),
     "span_features.names"),
    (lambda c: c["span_features"].__setitem__("mean", [0.0] * 3), "span_features.mean"),
    (lambda c: c["span_features"].__setitem__("std", "wide"), "span_features.std"),
    (lambda c: c.pop("span_features"), "span_features.names"),
    (lambda c: c.__setitem__("hidden_size", HIDDEN + 1), "hidden_size"),
    (lambda c: c.pop("layer"), "layer"),
    (lambda c: c.__setitem__("unit", "sentence"), "unit"),
])
def test_a_malformed_span_head_json_names_the_key(saved: Path, change: Callable[..., None],
                                                  key: str) -> None:
    _edit(saved, change)
    with pytest.raises(ProbeFileError, match=f"key '{key}'"):
        load_entity_probe(saved)
    # in a policy, the same message reaches the user
    with pytest.raises(ValueError, match=f"key '{key}'"):
        EntityHallucinationMonitor(EntityHallucinationMonitor.Options(weights=str(saved)))


def test_a_span_head_tensor_of_the_wrong_shape_names_the_key(saved: Path) -> None:
    tensors = load_file(str(saved))
    tensors["linear.weight"] = tensors["linear.weight"][:, :-1].contiguous()
    save_file(tensors, str(saved))
    with pytest.raises(ProbeFileError, match="'tensors.linear.weight'"):
        load_entity_probe(saved)


def test_a_head_too_narrow_for_its_span_features_names_the_key(saved: Path) -> None:
    tensors = load_file(str(saved))
    tensors["linear.weight"] = tensors["linear.weight"][:, :4].contiguous()
    save_file(tensors, str(saved))

    def narrow(config: dict[str, Any]) -> None:
        config["head"]["hidden_size"] = 4
        config["tensors"]["linear.weight"] = [1, 4]
        config.pop("hidden_size")

    _edit(saved, narrow)
    with pytest.raises(ProbeFileError, match="key 'head.hidden_size'"):
        load_entity_probe(saved)
