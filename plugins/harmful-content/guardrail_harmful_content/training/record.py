"""The record stage: the weights' JSON (what was trained on what, how it was chosen, its figures)
and saving it with the head."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from guardrail.probes.io import save_probe

from ..head import DualHead

if TYPE_CHECKING:
    from .config import TrainConfig

__all__ = ["ENSEMBLE_HOW", "NAME", "built_counts", "data_summary", "save", "say"]

NAME = "harmful_content"
ENSEMBLE_HOW = {  # how DualHead.ensemble folds the members into one head, as the weights record
    False: "the heads' weights averaged: the heads are linear, so this averages their logits",
    True: "the members' hidden units side by side and their output weights divided by their "
          "number: the mean of their logits, exactly",
}


def say(config: TrainConfig, message: str) -> None:
    if config.progress:
        print(f"[harmful-content] {message}", file=sys.stderr, flush=True)


def data_summary(manifest: Mapping[str, Any], config: TrainConfig) -> dict[str, Any]:
    return {
        "builder": "python -m guardrail_harmful_content.training.data build",
        "folder": str(config.data) if config.data else None,
        "seed": manifest.get("seed"),
        "sources": [{k: s.get(k) for k in ("name", "version", "sha256", "licence", "model",
                                           "decoding", "answers")
                     if s.get(k) is not None} for s in manifest.get("sources", [])],
        "subsample": {"train": config.max_train, "val": config.max_val,
                      "how": "stratified by (kind, label), seeded"},
    }


def built_counts(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The build's label counts per split."""
    return {k: v.get("labels") for k, v in manifest.get("counts", {}).items()}


def save(config: TrainConfig, observer: Any, head: DualHead, layers: tuple[int, ...],
         outcome: Mapping[str, Any], manifest: Mapping[str, Any],
         timings: Mapping[str, float]) -> dict[str, Any]:
    """Write ``head`` with its JSON to ``config.out``; ``outcome`` holds the strategy's
    ``threshold``, ``rule``, ``full_detection_threshold``, ``calibration``, ``splits``,
    ``training`` and ``metrics``. Returns the JSON with ``weights``, the file's path."""
    saved = {
        "base_model": observer.name,
        "layer": layers[0],
        "layers": list(layers),
        "pooling": config.pooling,
        "dims": {"hidden_size": int(observer.hidden_size), "input_size": head.hidden_size,
                 "observer_layers": int(observer.num_layers)},
        **{k: outcome[k] for k in ("threshold", "rule", "full_detection_threshold",
                                   "calibration")},
        "data": data_summary(manifest, config),
        **{k: outcome[k] for k in ("splits", "training", "metrics")},
        "timings": {k: round(v, 1) for k, v in timings.items()},
    }
    weights = save_probe(config.out, head, saved, name=NAME)
    say(config, f"saved {weights} ({weights.stat().st_size} bytes) in "
                f"{timings['total_s']:.0f} s")
    return {**saved, "weights": str(weights)}
