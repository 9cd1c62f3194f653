"""The entity probe as the monitor uses it: a ``LinearProbe`` on one layer's states, optionally
with the token's surprisal and entropy appended as two standardised features.

Saved with ``guardrail.probes.io.save_probe`` (safetensors + JSON). With extra features the head
reads ``hidden_size + 2`` inputs; the JSON's ``features`` key names them and holds their training
mean and standard deviation (a missing value, e.g. the first response token's surprisal, is
replaced by the mean, i.e. 0 after standardising).

``load_entity_probe`` also reads span heads (``"unit": "span"``, see ``span_probe``): one score
per entity instead of one per token. ``TOKEN_WEIGHTS`` and ``SPAN_WEIGHTS`` are the shipped files
of each kind; ``DEFAULT_WEIGHTS`` is the one the monitor loads unless told otherwise.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from guardrail.probes.heads import LinearProbe
from guardrail.probes.io import LoadedProbe, ProbeFileError, load_probe

from .span_probe import EntitySpanProbe, span_from_loaded

__all__ = ["DEFAULT_WEIGHTS", "EXTRA_FEATURES", "SPAN_WEIGHTS", "TOKEN_WEIGHTS", "AnyEntityProbe",
           "EntityProbe", "load_entity_probe", "shipped_threshold", "stack_inputs"]

_WEIGHTS_DIR = Path(__file__).parent / "weights"
TOKEN_WEIGHTS = _WEIGHTS_DIR / "entity_probe.safetensors"
SPAN_WEIGHTS = _WEIGHTS_DIR / "entity_span_probe.safetensors"
DEFAULT_WEIGHTS = SPAN_WEIGHTS  # the span head won on validation (docs/entity-hallucination.md)
EXTRA_FEATURES = ("surprisal", "entropy")


def stack_inputs(hidden: torch.Tensor, extras: dict[str, torch.Tensor] | None,
                 names: tuple[str, ...], mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``hidden (..., H)`` with the named extra features (each ``(...)``) standardised and
    appended; NaN (no distribution, e.g. the first token) becomes 0, the training mean."""
    if not names:
        return hidden.float()
    if extras is None:
        raise ValueError(f"this probe also reads {', '.join(names)}: they are missing")
    columns = []
    for k, name in enumerate(names):
        value = extras[name].float()
        z = (value - mean[k]) / std[k]
        columns.append(torch.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0))
    return torch.cat([hidden.float(), torch.stack(columns, dim=-1)], dim=-1)


@dataclass
class EntityProbe:
    """A linear head, the layer it reads, its extra features and threshold."""

    head: LinearProbe
    layer: int
    threshold: float
    features: tuple[str, ...] = ()
    mean: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    std: torch.Tensor = field(default_factory=lambda: torch.ones(0))
    config: dict[str, Any] = field(default_factory=dict)
    unit: ClassVar[str] = "token"

    @property
    def hidden_size(self) -> int:
        return self.head.hidden_size - len(self.features)

    @property
    def layers(self) -> tuple[int, ...]:
        """The layers the probe reads (one)."""
        return (self.layer,)

    @torch.inference_mode()
    def score(self, hidden: torch.Tensor, extras: dict[str, torch.Tensor] | None = None
              ) -> torch.Tensor:
        """Sigmoid scores ``(n,)`` for states ``(n, H)`` (and the extra features ``(n,)``)."""
        inputs = stack_inputs(hidden, extras, self.features, self.mean, self.std)
        return self.head.score(inputs)

    def score_rows(self, hidden: np.ndarray, extras: Mapping[str, Sequence[float]] | None = None
                   ) -> list[float]:
        """``score`` for the monitor's per-step rows, in numpy and Python floats (a few calls
        instead of torch ops, whose dispatch dominates at one row per step): the scores of
        float32 states ``(n, H)`` with the extra features (``n`` values each); equal to
        ``score`` up to float32 rounding."""
        w_hidden, w_extra, bias, mean, std = self._numpy_weights
        logits = [v + bias for v in (hidden @ w_hidden).tolist()]
        if self.features:
            if extras is None:
                raise ValueError(f"this probe also reads {', '.join(self.features)}: they are "
                                 "missing")
            for k, name in enumerate(self.features):
                for r, value in enumerate(extras[name]):
                    z = (value - mean[k]) / std[k]
                    if math.isfinite(z):  # NaN (no distribution) and inf: the mean, 0
                        logits[r] += w_extra[k] * z
        return [0.5 + 0.5 * math.tanh(0.5 * v) for v in logits]  # the sigmoid, no overflow

    @cached_property
    def _numpy_weights(self) -> tuple[np.ndarray, list[float], float, list[float], list[float]]:
        """The head's weight row cut into states and extra features, its bias, and the features'
        mean and std (as ``stack_inputs`` reads them, float32 values)."""
        return (*self.head.numpy_parts(self.hidden_size), self.mean.tolist(), self.std.tolist())


def _from_loaded(loaded: LoadedProbe) -> EntityProbe:
    config = loaded.config
    if not isinstance(loaded.head, LinearProbe):
        raise ProbeFileError(f"{loaded.path}: the entity monitor reads a linear probe, this is a "
                             f"{loaded.head.kind!r} head")
    if loaded.layer is None:
        raise ProbeFileError(f"{loaded.path.with_suffix('.json')}: key 'layer' is missing")
    extra = config.get("features") or {}
    names = tuple(extra.get("names", ()))
    unknown = set(names) - set(EXTRA_FEATURES)
    if unknown:
        raise ProbeFileError(f"{loaded.path.with_suffix('.json')}: key 'features.names' has "
                             f"{sorted(unknown)}; known: {list(EXTRA_FEATURES)}")
    mean = torch.tensor(extra.get("mean", [0.0] * len(names)), dtype=torch.float32)
    std = torch.tensor(extra.get("std", [1.0] * len(names)), dtype=torch.float32)
    if mean.shape != (len(names),) or std.shape != (len(names),):
        raise ProbeFileError(f"{loaded.path.with_suffix('.json')}: keys 'features.mean' and "
                             f"'features.std' need one value per name in 'features.names'")
    threshold = loaded.threshold if loaded.threshold is not None else 0.5
    return EntityProbe(loaded.head, loaded.layer, threshold, names, mean, std.clamp(min=1e-6),
                       config)


AnyEntityProbe = EntityProbe | EntitySpanProbe
"""A token probe (one score per token) or a span head (one score per entity)."""


def load_entity_probe(path: str | Path = DEFAULT_WEIGHTS) -> AnyEntityProbe:
    """Load an entity probe saved by the trainer (a ``.safetensors`` with its ``.json``): a token
    probe, or a span head when the JSON says ``"unit": "span"``."""
    path = Path(path).expanduser()
    if path.suffix == ".safetensors" and not path.with_suffix(".json").exists():
        raise ProbeFileError(f"entity probe config not found: {path.with_suffix('.json')} "
                             "(train it: guardrail train entity-hallucination)")
    loaded = load_probe(path)
    unit = loaded.config.get("unit", "token")
    if unit == "span":
        return span_from_loaded(loaded)
    if unit != "token":
        raise ProbeFileError(f"{loaded.path.with_suffix('.json')}: key 'unit' is {unit!r}; "
                             "known: 'token', 'span'")
    return _from_loaded(loaded)


def shipped_threshold() -> float | None:
    """The threshold saved with the shipped weights, if they exist."""
    try:
        config = json.loads(DEFAULT_WEIGHTS.with_suffix(".json").read_text(encoding="utf-8"))
        return float(config["threshold"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
