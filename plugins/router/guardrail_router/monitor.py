"""The ``router`` monitor: the probability that each token of a small model's stream is one the
reference model would have written differently in a way that matters (R2R's router).

Each token ``i`` is scored from the small model's step that produced it: the last-layer state and
top-k logit values *before* token ``i`` and the embedding of token ``i``.

- Observer streams (text from an API, read by the observer): row ``r`` of the observer's output is
  the state after token ``r``, which predicts token ``r + 1``; the monitor keeps the last row of
  each chunk for the next one. The first response token has no earlier row here (the observer
  reads the prompt without handing out its last state) and is not scored; nor is the first token
  after a reroute (the kept row belonged to text that was cut).
- Generator streams (an adapter that owns the small model): ``features.hidden[-1]`` and
  ``features.logits`` row ``i`` are the step that produced token ``i``, so no shift is needed.

The trained weights ship in ``guardrail_router/weights`` (``guardrail train router`` rebuilds
them); the frozen token embedding is taken from the observer model when the monitor loads.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from guardrail.monitor import Features, Monitor, MonitorContext, Needs, Score
from guardrail.probes.io import LoadedProbe, ProbeFileError, check_observer, load_probe

__all__ = ["DEFAULT_WEIGHTS", "RouterMonitor", "embedding_table"]

DEFAULT_WEIGHTS = Path(__file__).parent / "weights" / "router.safetensors"
LAYER = -1  # R2R reads the last layer


def _shipped_threshold() -> float | None:
    """The threshold saved with the shipped weights (chosen for recall >= 0.95 on validation)."""
    try:
        config = json.loads(DEFAULT_WEIGHTS.with_suffix(".json").read_text(encoding="utf-8"))
        return float(config["threshold"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def embedding_table(observer: Any) -> torch.Tensor:
    """The observer model's input embedding table; without a torch observer, the embedded
    SmolLM2's table read straight from its cached safetensors."""
    model = getattr(observer, "model", None)
    if model is not None and hasattr(model, "get_input_embeddings"):
        return model.get_input_embeddings().weight.detach().float()
    from safetensors import safe_open

    from guardrail.observer.hf import smollm2_dir

    directory = smollm2_dir()
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has keys(), no __iter__
                if key.endswith("embed_tokens.weight"):
                    return f.get_tensor(key).float()
    raise ProbeFileError(f"no embed_tokens.weight in {directory}: the router needs the small "
                         "model's token embedding table")


_SHIPPED = _shipped_threshold()


@dataclass
class _State:
    """The small model's last step not yet used: state and top-k logits of the latest token,
    and the index the next token should have (a smaller one means the stream was cut back)."""

    hidden: torch.Tensor | None = None
    top_logits: torch.Tensor | None = None
    next_index: int = 0


class RouterMonitor(Monitor):
    """Scores tokens with a trained ``RouterHead`` (see the module docstring)."""

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        weights: str | None = Field(None, description="router .safetensors (default: shipped)")

    default_threshold: ClassVar[float] = _SHIPPED if _SHIPPED is not None else 0.5
    default_spec: ClassVar[dict[str, Any]] = {"id": "router", "action": "flag",
                                              "threshold": default_threshold}

    def __init__(self, options: Options | None = None) -> None:
        options = options or self.Options()
        self.weights = Path(options.weights).expanduser() if options.weights else DEFAULT_WEIGHTS
        if not self.weights.with_suffix(".json").exists():
            raise ValueError(f"router weights config not found: {self.weights.with_suffix('.json')}"
                             " (train them: guardrail train router)")
        config = json.loads(self.weights.with_suffix(".json").read_text(encoding="utf-8"))
        self.top_k = int(config.get("head", {}).get("top_k", 100))
        self._loaded: LoadedProbe | None = None
        self._lock = threading.Lock()

    def needs(self) -> Needs:
        return Needs(layers=frozenset({LAYER}), top_k=self.top_k)

    def _probe(self, observer: Any) -> LoadedProbe:
        # The head is a loaded resource shared by every stream, not per-stream state.
        with self._lock:
            if self._loaded is None:
                loaded = load_probe(self.weights, embedding=embedding_table(observer))
                if observer is not None:
                    check_observer(loaded, observer)
                self._loaded = loaded
            return self._loaded

    def start(self, context: MonitorContext) -> _State:
        self._probe(context.observer)
        return _State()

    def update(self, state: _State, features: Features) -> list[Score]:
        if not features.tokens:
            return []
        probe = self._loaded
        assert probe is not None, "start() loads the router"
        hidden = features.hidden.get(LAYER)
        if hidden is None:
            raise ValueError(f"the router needs hidden layer {LAYER} (the last); the features "
                             f"have layers {sorted(features.hidden)}")
        hidden = torch.as_tensor(hidden).float()
        ids = torch.tensor([-1 if t.id is None else t.id for t in features.tokens])
        if features.first_index != state.next_index:  # rerouted: the kept row is stale
            state.hidden = state.top_logits = None
        state.next_index = features.first_index + len(features.tokens)
        if features.top_logits is not None:  # observer: row r predicts token r + 1
            top = torch.as_tensor(features.top_logits).float()[:, : self.top_k]
            prev_hidden = _prepend(state.hidden, hidden[:-1])
            prev_top = _prepend(state.top_logits, top[:-1])
            state.hidden, state.top_logits = hidden[-1:], top[-1:]
            first = len(features.tokens) - len(prev_hidden)  # 1 with no earlier row, else 0
            ids = ids[first:]
        elif features.logits is not None:  # generator: row i is the step that produced token i
            logits = torch.as_tensor(features.logits).float()
            prev_hidden, first = hidden, 0
            prev_top = torch.topk(logits, self.top_k, dim=-1).values
        else:
            raise ValueError("the router needs top-k logits (observer) or logits (generator)")
        known = ids >= 0
        if not bool(known.any()):
            return []
        with torch.inference_mode():
            scores = probe.head.score(prev_hidden[known], ids[known],  # type: ignore[operator]
                                      prev_top[known])
        indices = [features.first_index + first + int(i) for i in known.nonzero().flatten()]
        return [Score(i, float(s)) for i, s in zip(indices, scores.tolist(), strict=True)]


def _prepend(previous: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
    return rows if previous is None else torch.cat([previous, rows])
