"""What ``guardrail train harmful-content`` does: the settings every run shares, and the validation
strategy (``validation.HoldOut`` or ``validation.CrossFold``) that owns the rest."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .validation import HoldOut, Validation

__all__ = ["DEFAULT_LAYERS", "WEIGHTS_DIR", "TrainConfig"]

WEIGHTS_DIR = Path(__file__).parent.parent / "weights"
DEFAULT_LAYERS = (9, 12, 15)


@dataclass
class TrainConfig:
    """The CLI's flags, one to one (``--calibration`` and its flags build ``validation``)."""

    data: Path | None = None  # a build folder (train/val/test.jsonl); None: build one
    out: Path = WEIGHTS_DIR
    model: str | None = None  # local HF model folder; None: the embedded SmolLM2
    layers: tuple[int, ...] = DEFAULT_LAYERS
    # Heads are trained on these of ``layers`` only (None: all); the features are still read
    # for all of ``layers``, so a cache written by a wider run is reused.
    train_layers: tuple[int, ...] | None = None
    concat: bool = True  # also try the two best layers side by side
    pooling: str = "prefix_mean"  # see pooling.POOLINGS
    # 0: SCM's linear sequence head; m > 0: a one-hidden-layer MLP with m units per seed
    sequence_hidden: int = 0
    prefixes: int = 2  # truncated copies of each training record added to the training set
    max_train: int | None = None
    max_val: int | None = None
    epochs: int = 12
    batch_size: int = 16
    lr: float = 2e-3
    seed: int = 0
    # More seeds for the chosen layers: their heads are averaged with the first seed's head.
    ensemble_seeds: tuple[int, ...] = ()
    max_false_halt_rate: float = 0.03
    validation: Validation = field(default_factory=HoldOut)
    chunk_size: int = 512
    cache: Path | None = None
    progress: bool = True

    @property
    def fit_layers(self) -> tuple[int, ...]:
        return tuple(self.train_layers or self.layers)

    @property
    def seeds(self) -> list[int]:
        """``seed`` then the ensemble seeds, each once."""
        return list(dict.fromkeys([self.seed, *self.ensemble_seeds]))
