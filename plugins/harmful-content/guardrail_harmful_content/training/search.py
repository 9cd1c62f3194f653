"""The search stage on a validation split: a head per candidate layer, the two best side by side,
the best one kept (epoch chosen by the calibrated streaming macro-F1), then its seed ensemble."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from guardrail.toolkit.features import CachedRecord
from guardrail.toolkit.train import MetricFn, train_head

from ..head import DualHead
from .losses import scm_loss_fn
from .prefixes import prefix_views
from .scoring import STACKED, stack_layers

if TYPE_CHECKING:
    from .config import TrainConfig

__all__ = ["LOSS_WEIGHTS", "Candidate", "fit_candidate", "search_layers", "seed_ensemble"]

LOSS_WEIGHTS = {"token_ce": 0.6, "sequence_ce": 0.4, "logic": 1.0}  # SCM's run-scm.sh


@dataclass
class Candidate:
    """One trained head on one layer set, with its validation scores."""

    layers: tuple[int, ...]
    head: DualHead
    best_epoch: int
    val_metric: float
    history: list[dict[str, Any]] = field(default_factory=list)


def fit_candidate(layers: tuple[int, ...], train: Sequence[CachedRecord],
                  val: Sequence[CachedRecord], config: TrainConfig, metric: MetricFn,
                  seed: int) -> Candidate:
    """A ``DualHead`` on ``layers`` trained with SCM's loss, at its best epoch on ``val``."""
    train_view = stack_layers(train, layers, config.pooling)
    val_view = stack_layers(val, layers, config.pooling)
    width = int(train_view[0].hidden[STACKED].shape[-1])
    head = DualHead(width, dropout=0.1, seed=seed, sequence_hidden=config.sequence_hidden)
    result = train_head(
        head, train_view, val_view, layer=STACKED,
        loss_fn=scm_loss_fn(LOSS_WEIGHTS["token_ce"], LOSS_WEIGHTS["sequence_ce"],
                            LOSS_WEIGHTS["logic"]),
        metric_fn=metric, epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
        seed=seed, progress=config.progress,
    )
    assert isinstance(result.head, DualHead)
    return Candidate(layers, result.head, result.best_epoch, float(result.best_metric or 0.0),
                     [dict(h) for h in result.history])


def with_prefixes(whole: Sequence[CachedRecord], config: TrainConfig, seed: int
                  ) -> list[CachedRecord]:
    """The training records and ``config.prefixes`` truncated views of each."""
    return list(whole) + prefix_views(whole, config.prefixes, seed)


def search_layers(config: TrainConfig, train_set: Sequence[CachedRecord],
                  val: Sequence[CachedRecord], metric: MetricFn, say: Callable[[str], None]
                  ) -> list[Candidate]:
    """A candidate per layer of ``config.fit_layers`` and, with ``config.concat``, one on the two
    best side by side, all trained on ``train_set`` (records and their prefix views)."""
    candidates = []
    for layer in config.fit_layers:
        candidates.append(fit_candidate((layer,), train_set, val, config, metric, config.seed))
        say(f"layer {layer}: val streaming macro-F1 {candidates[-1].val_metric:.4f} "
            f"(epoch {candidates[-1].best_epoch})")
    if config.concat and len(config.fit_layers) >= 2:
        top = sorted(candidates, key=lambda c: -c.val_metric)[:2]
        pair = tuple(sorted(c.layers[0] for c in top))
        candidates.append(fit_candidate(pair, train_set, val, config, metric, config.seed))
        say(f"layers {pair}: val streaming macro-F1 {candidates[-1].val_metric:.4f}")
    return candidates


def best_of(candidates: Sequence[Candidate]) -> Candidate:
    """The best validation metric; on a tie, fewer layers."""
    return max(candidates, key=lambda c: (c.val_metric, -len(c.layers)))


def seed_ensemble(config: TrainConfig, best: Candidate, whole: Sequence[CachedRecord],
                  val: Sequence[CachedRecord], metric: MetricFn, say: Callable[[str], None]
                  ) -> list[Candidate]:
    """``best`` and a head on its layers for every further seed (own prefix cuts)."""
    members = [best]
    for seed in config.seeds[1:]:
        members.append(fit_candidate(best.layers, with_prefixes(whole, config, seed), val,
                                     config, metric, seed))
        say(f"seed {seed}: val streaming macro-F1 {members[-1].val_metric:.4f}")
    return members
