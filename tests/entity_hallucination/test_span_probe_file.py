"""Span-head files: a saved head reloads with the same scores, and a malformed one fails to load
with a ProbeFileError that names the key at fault (the monitor turns it into a policy error); the
same for a version-2 head (``span_states``: several layers and the token before the entity)."""

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
    StateBlock,
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


def _assert_load_errors_name(path: Path, key: str) -> None:
    """Loading ``path`` fails with a message naming ``key``, and in a policy the same message
    reaches the user."""
    with pytest.raises(ProbeFileError, match=f"key '{key}'"):
        load_entity_probe(path)
    with pytest.raises(ValueError, match=f"key '{key}'"):
        EntityHallucinationMonitor(EntityHallucinationMonitor.Options(weights=str(path)))


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
    _assert_load_errors_name(saved, key)


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


BLOCKS = (StateBlock("mean", 3), StateBlock("mean", 5), StateBlock("prev", 5, 0.7))


def _probe_v2() -> EntitySpanProbe:
    head = LinearProbe(len(BLOCKS) * HIDDEN + len(SPAN_FEATURES), seed=2)
    with torch.no_grad():
        head.linear.weight.mul_(10.0)
        head.linear.bias.fill_(-0.5)
    return EntitySpanProbe(head, 5, 0.4, SPAN_FEATURES,
                           torch.linspace(0.5, 2.0, len(SPAN_FEATURES)),
                           torch.linspace(1.0, 3.0, len(SPAN_FEATURES)), blocks=BLOCKS)


@pytest.fixture
def saved_v2(tmp_path: Path) -> Path:
    return save_span_probe(_probe_v2(), tmp_path / "span2.safetensors", {"base_model": "tiny"})


def test_a_version_2_span_head_reloads_and_reads_its_blocks(saved_v2: Path) -> None:
    config = json.loads(saved_v2.with_suffix(".json").read_text(encoding="utf-8"))
    assert config["span_states"] == {"version": 2, "width": HIDDEN, "blocks": [
        {"pool": "mean", "layer": 3}, {"pool": "mean", "layer": 5},
        {"pool": "prev", "layer": 5, "fill": 0.7}]}
    loaded = load_entity_probe(saved_v2)
    assert isinstance(loaded, EntitySpanProbe)
    assert (loaded.version, loaded.layers, loaded.hidden_size, loaded.state_blocks) == (
        2, (3, 5), HIDDEN, BLOCKS)
    monitor = EntityHallucinationMonitor(EntityHallucinationMonitor.Options(weights=str(saved_v2)))
    assert monitor.needs().layers == frozenset({3, 5})
    rng = np.random.default_rng(1)
    h3, h5 = (rng.normal(size=(4, HIDDEN)).astype(np.float32) for _ in range(2))
    dots, prevs = loaded.token_dots({3: h3, 5: h5})
    members, args = [1, 2, 3], ([1.0, math.nan, 4.0], [2.0, 2.5, 0.5], "NAME")
    # the logit: mean of the members' mean-block dots + the prev block's dot of token 0
    w = _probe_v2().head.linear.weight.detach()[0].double().numpy()
    raw = span_features(*args)
    z = [(raw[n] - m) / s for n, m, s in zip(SPAN_FEATURES, _probe_v2().mean.tolist(),
                                              _probe_v2().std.tolist(), strict=True)]
    states = float(h3[members].mean(0) @ w[:HIDDEN] + h5[members].mean(0) @ w[HIDDEN:2 * HIDDEN])
    features = float(np.dot(w[3 * HIDDEN:], z)) - 0.5
    value = loaded.score([dots[i] for i in members], *args, prevs[0])
    logit = states + float(h5[0] @ w[2 * HIDDEN:3 * HIDDEN]) + features
    assert value == pytest.approx(1 / (1 + math.exp(-logit)), abs=1e-5)
    # no token before the entity: the prev block adds its fill
    alone = loaded.score([dots[i] for i in members], *args, None)
    assert alone == pytest.approx(1 / (1 + math.exp(-(states + 0.7 + features))), abs=1e-5)
    with pytest.raises(ValueError, match="token_dots"):
        loaded.dots(h3)


@pytest.mark.parametrize(("change", "key"), [
    (lambda c: c["span_states"].__setitem__("version", 3), "span_states.version"),
    (lambda c: c["span_states"].__setitem__("width", HIDDEN + 1), "span_states.width"),
    (lambda c: c["span_states"].__setitem__("width", "wide"), "span_states.width"),
    (lambda c: c["span_states"].__setitem__("blocks", []), "span_states.blocks"),
    (lambda c: c["span_states"]["blocks"][1].__setitem__("pool", "max"),
     r"span_states.blocks\[1\].pool"),
    (lambda c: c["span_states"]["blocks"][0].pop("layer"), r"span_states.blocks\[0\].layer"),
    (lambda c: c["span_states"]["blocks"][2].pop("fill"), r"span_states.blocks\[2\].fill"),
    (lambda c: c["span_states"]["blocks"][2].__setitem__("fill", "x"),
     r"span_states.blocks\[2\].fill"),
    (lambda c: c["span_states"]["blocks"].pop(), "span_states.width"),
    (lambda c: c["span_states"].__setitem__("blocks", [
        {"pool": "prev", "layer": 5, "fill": 0.0}] * 3), "span_states.blocks"),
    (lambda c: c.__setitem__("span_states", [1]), "span_states"),
])
def test_a_malformed_span_states_block_names_the_key(saved_v2: Path,
                                                     change: Callable[..., None],
                                                     key: str) -> None:
    _edit(saved_v2, change)
    _assert_load_errors_name(saved_v2, key)
