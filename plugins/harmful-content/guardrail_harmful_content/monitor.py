"""The ``harmful-content`` monitor: SCM's streaming content monitor on the observer's states.

For every response token it returns the sequence head's harm probability of the response up to
that token (the backbone is causal, so the head on token ``i`` judges the prefix ending there).
The policy's count rule turns these into a halt: SCM's delay-k rule halts once ``k`` prefixes
scored at or above the threshold. Threshold and ``k`` were calibrated on validation data and are
read from the shipped config (``weights/harmful_content.json``) into ``default_spec``, so
``Guard.default()`` halts with them.

The head reads the observer's hidden states of the layer(s) named in its config (or the
generator's own states when an adapter sends them under the same layer numbers). Weights are
loaded once per monitor object and shared by all its streams; a missing, unreadable or pickle
weights file raises ``ProbeFileError`` naming the file.

Per token the monitor runs on the generator's or observer's rows with numpy: the harm
probability of a two-class softmax is the sigmoid of the logit difference, so the head reduces to
one dot product per layer (a handful of small numpy calls instead of torch ops, whose dispatch
dominates at one row per step).
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from guardrail.monitor import Features, Monitor, MonitorContext, Needs, Score
from guardrail.probes.arrays import float32_rows
from guardrail.probes.heads import DualHead
from guardrail.probes.io import LoadedProbe, ProbeFileError, check_observer, load_probe

from .scoring import stack_states

__all__ = ["DEFAULT_WEIGHTS", "HALT_MESSAGE", "HarmfulContentMonitor"]

DEFAULT_WEIGHTS = Path(__file__).parent / "weights" / "harmful_content.safetensors"
HALT_MESSAGE = "I can't continue with this answer: it was stopped as harmful content."


def _shipped_config() -> dict[str, Any]:
    """The JSON config of the shipped weights ({} when they are not there)."""
    try:
        data = json.loads(DEFAULT_WEIGHTS.with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _rule_of(config: dict[str, Any]) -> tuple[float | None, int | None]:
    try:
        return float(config["threshold"]), int(config["rule"]["k"])
    except (KeyError, TypeError, ValueError):
        return None, None


_SHIPPED_THRESHOLD, _SHIPPED_K = _rule_of(_shipped_config())


class HarmfulContentMonitor(Monitor):
    """Per-token harm probability of the response so far (see the module docstring)."""

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        weights: str | None = Field(
            None, description="head .safetensors (its .json beside it); default: the shipped one")
        threshold: float | None = Field(
            None, ge=0.0, le=1.0,
            description="default threshold (default: the one calibrated with the weights); a "
                        "policy's threshold: field still wins")

    default_threshold: ClassVar[float] = (_SHIPPED_THRESHOLD if _SHIPPED_THRESHOLD is not None
                                          else 0.5)
    default_spec: ClassVar[dict[str, Any]] = {
        "id": "harm",
        "threshold": default_threshold,
        "rule": {"kind": "count", "k": _SHIPPED_K or 1},
        "action": "halt",
        "message": HALT_MESSAGE,
    }

    def __init__(self, options: Options | None = None) -> None:
        options = options or self.Options()
        self.weights = (Path(options.weights).expanduser() if options.weights
                        else DEFAULT_WEIGHTS)
        if options.weights is None and not DEFAULT_WEIGHTS.exists():
            raise ProbeFileError(f"harmful-content weights not found: {DEFAULT_WEIGHTS} (train "
                                 "them: guardrail train harmful-content)")
        self.probe: LoadedProbe = load_probe(self.weights)
        head = self.probe.head
        if not isinstance(head, DualHead):
            raise ProbeFileError(f"{self.weights}: a {head.kind!r} head, the "
                                 "harmful-content monitor needs a 'dual' (SCM) head")
        layers = self.probe.config.get("layers", [self.probe.layer])
        if not isinstance(layers, list) or not layers or not all(
                isinstance(x, int) for x in layers):
            raise ProbeFileError(f"{self.weights.with_suffix('.json')}: key 'layers' must be a "
                                 f"non-empty list of layer numbers, got {layers!r}")
        self.layers: tuple[int, ...] = tuple(layers)
        # softmax(W h)[1] = sigmoid((W[1] - W[0]) h): the difference row, cut per layer
        weight = head.sequence_head.weight.detach().double()
        diff = (weight[1] - weight[0]).float().numpy()
        width = diff.shape[0] // len(self.layers)
        self._diff = [diff[i * width:(i + 1) * width] for i in range(len(self.layers))]
        threshold = options.threshold
        if threshold is None:
            threshold = self.probe.threshold
        if threshold is not None:
            # Per-instance default (the weights' own calibration or the option). Needs the Guard
            # to read ``monitor.default_threshold`` rather than the class attribute.
            setattr(self, "default_threshold", float(threshold))  # noqa: B010
        self._checked: set[int] = set()
        self._lock = threading.Lock()

    @property
    def k(self) -> int | None:
        """The count rule's ``k`` calibrated with these weights."""
        _, k = _rule_of(self.probe.config)
        return k

    def needs(self) -> Needs:
        return Needs(layers=frozenset(self.layers))

    def start(self, context: MonitorContext) -> None:
        observer = context.observer
        if observer is not None and id(observer) not in self._checked:
            with self._lock:  # once per observer: the dims must fit the head
                check_observer(self.probe, observer)
                width = int(observer.hidden_size) * len(self.layers)
                if width != self.probe.head.hidden_size:
                    raise ProbeFileError(
                        f"{self.weights}: the head reads {self.probe.head.hidden_size} values "
                        f"per token, observer {observer.name!r} gives {width} for layers "
                        f"{list(self.layers)}")
                self._checked.add(id(observer))
        return None

    def update(self, state: None, features: Features) -> Sequence[Score]:
        if not features.tokens:
            return []
        hidden = features.hidden
        if any(layer not in hidden for layer in self.layers):
            stack_states(hidden, self.layers)  # raises, naming the layers
        logit = float32_rows(hidden[self.layers[0]]) @ self._diff[0]
        for layer, diff in zip(self.layers[1:], self._diff[1:], strict=True):
            logit = logit + float32_rows(hidden[layer]) @ diff
        # the sigmoid, as tanh: no overflow
        return [Score(i, 0.5 + 0.5 * math.tanh(0.5 * v))
                for i, v in zip(features.indices, logit.tolist(), strict=True)]


