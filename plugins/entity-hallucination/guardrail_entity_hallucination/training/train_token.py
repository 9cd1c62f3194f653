"""The paper's token probe (``--head token``): ``Linear(hidden, 1)``, optionally ``hidden + 2`` with
the token's standardised surprisal and entropy appended; token BCE (entity tokens weight 10)
annealed into span-max BCE (``guardrail.toolkit.train.entity_loss``); the layer is chosen on
validation span-max AUC."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

import torch

from guardrail.probes.heads import LinearProbe
from guardrail.toolkit.features import CachedRecord
from guardrail.toolkit.train import entity_loss, span_auc_metric, train_head

from ..probe import EXTRA_FEATURES, EntityProbe, stack_inputs

__all__ = ["FitResult", "fit_probe", "select_probe", "with_extras"]


@dataclasses.dataclass
class FitResult:
    """A trained probe with its validation span-max AUC and per-epoch history."""

    probe: EntityProbe
    val_span_auc: float | None
    history: list[dict[str, float | None]]


def _feature_stats(records: Sequence[CachedRecord]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of surprisal and entropy over the training tokens."""
    columns = []
    for name in EXTRA_FEATURES:
        values = torch.cat([getattr(r, name).float() for r in records])
        values = values[~torch.isnan(values)]
        columns.append((values.mean(), values.std()))
    return (torch.tensor([float(m) for m, _ in columns]),
            torch.tensor([max(float(s), 1e-6) for _, s in columns]))


def with_extras(records: Sequence[CachedRecord], layer: int, mean: torch.Tensor,
                std: torch.Tensor) -> list[CachedRecord]:
    """Copies of ``records`` whose layer-``layer`` states carry the standardised surprisal and
    entropy as two more columns (what a probe with extra features reads)."""
    out = []
    for r in records:
        if r.surprisal is None or r.entropy is None:
            raise ValueError(f"record {r.index}: no surprisal/entropy cached (stats=True)")
        stacked = stack_inputs(r.hidden[layer].float(),
                               {"surprisal": r.surprisal, "entropy": r.entropy},
                               EXTRA_FEATURES, mean, std)
        out.append(dataclasses.replace(r, hidden={layer: stacked}))
    return out


def fit_probe(train: Sequence[CachedRecord], val: Sequence[CachedRecord], layer: int, *,
              extras: bool = False, epochs: int = 15, lr: float = 2e-3, batch_size: int = 8,
              warmup: float = 1.0, seed: int = 42, progress: bool = True) -> FitResult:
    """Train one probe on ``layer`` (with or without the extra features); the best epoch by
    validation span-max AUC is kept."""
    hidden_size = int(train[0].hidden[layer].shape[-1])
    names: tuple[str, ...] = ()
    mean, std = torch.zeros(0), torch.ones(0)
    if extras:
        names = EXTRA_FEATURES
        mean, std = _feature_stats(train)
        train, val = with_extras(train, layer, mean, std), with_extras(val, layer, mean, std)
    head = LinearProbe(hidden_size + len(names), seed=seed)
    result = train_head(head, train, val, layer=layer, loss_fn=entity_loss(warmup),
                        metric_fn=span_auc_metric(layer), epochs=epochs, lr=lr,
                        batch_size=batch_size, seed=seed, progress=progress,
                        collate_kwargs={"entity_weight": 10.0})
    probe = EntityProbe(head, layer, 0.5, names, mean, std)
    return FitResult(probe, result.best_metric, result.history)


def select_probe(train: Sequence[CachedRecord], val: Sequence[CachedRecord],
                 layers: Sequence[int], *, try_extras: bool = True, progress: bool = True,
                 **fit_kwargs: Any) -> tuple[FitResult, list[dict[str, Any]]]:
    """Fit a plain probe on each candidate layer, then one with extra features on the best layer;
    return the best by validation span-max AUC and the comparison table."""
    table: list[dict[str, Any]] = []
    best: FitResult | None = None
    for layer in layers:
        fit = fit_probe(train, val, layer, progress=progress, **fit_kwargs)
        table.append({"layer": layer, "extras": False, "val_span_auc": fit.val_span_auc})
        if progress:
            print(f"layer {layer}: val span AUC {fit.val_span_auc}", file=sys.stderr)
        if best is None or (fit.val_span_auc or 0) > (best.val_span_auc or 0):
            best = fit
    assert best is not None, "no candidate layer"
    if try_extras and all(r.surprisal is not None for r in train):
        fit = fit_probe(train, val, best.probe.layer, extras=True, progress=progress,
                        **fit_kwargs)
        table.append({"layer": best.probe.layer, "extras": True,
                      "val_span_auc": fit.val_span_auc})
        if progress:
            print(f"layer {best.probe.layer} + surprisal/entropy: val span AUC "
                  f"{fit.val_span_auc}", file=sys.stderr)
        if (fit.val_span_auc or 0) > (best.val_span_auc or 0):
            best = fit
    return best, table
