"""Training the span head (``span_probe``) on cached features: one row per entity the monitor's
finder sees, a logistic regression, the layer and weight decay chosen on validation.

Rows: for each record, the entities ``find_entities(response, final=True)`` finds, their member
tokens as the monitor assigns them (``span_members``); a row's label is 1 when the entity overlaps
a fabricated labelled span, else 0 (entities that overlap no labelled span are negatives too: the
monitor scores them all). Inputs: the mean of the members' layer-``L`` states and the raw span
features (``span_features``), each column standardised with the training rows' mean and std
(unknown feature values become 0). Fit: LBFGS on the mean BCE plus ``wd * ||w||^2`` (bias not
decayed), from zero weights, so the fit is deterministic. The state standardisation is then folded
into the weights (``EntitySpanProbe`` keeps one dot product per token). Candidates are compared
by validation span-max AUC computed exactly as the monitor scores (``span_probe_scorer``).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from guardrail.probes.features import CachedRecord
from guardrail.probes.heads import LinearProbe

from .evaluation import span_auc, span_probe_scorer
from .span_probe import SPAN_FEATURES, EntitySpanProbe, span_features, span_members
from .spans import find_entities

__all__ = ["DEFAULT_WEIGHT_DECAYS", "SpanFit", "SpanRows", "fit_span_probe", "select_span_probe",
           "span_rows"]

DEFAULT_WEIGHT_DECAYS = (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1)


@dataclasses.dataclass
class SpanRows:
    """One row per entity: mean member state per layer ``(n, H)``, raw span features ``(n, F)``
    (NaN: unknown) and labels ``(n,)``."""

    states: dict[int, np.ndarray]
    features: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def span_rows(records: Sequence[CachedRecord], layers: Sequence[int], *,
              progress: bool = True, desc: str = "span rows") -> SpanRows:
    """The training rows of ``records`` (see the module docstring)."""
    states: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
    features: list[list[float]] = []
    labels: list[int] = []
    for record in tqdm(records, desc=desc, unit="rec", disable=not progress):
        if record.surprisal is None or record.entropy is None:
            raise ValueError(f"record {record.index}: no surprisal/entropy cached (stats=True)")
        spans = find_entities(record.response, 0, final=True)
        members = span_members(record.offsets.tolist(), spans)
        surprisal = record.surprisal.tolist()
        entropy = record.entropy.tolist()
        hidden = {layer: record.hidden[layer] for layer in layers}
        for span, rows in zip(spans, members, strict=True):
            if not rows:
                continue
            for layer in layers:
                states[layer].append(hidden[layer][rows].float().mean(0).numpy())
            raw = span_features([surprisal[i] for i in rows], [entropy[i] for i in rows],
                                span.kind)
            features.append([raw[name] for name in SPAN_FEATURES])
            gold = [g.label for g in record.spans if g.start < span.end and g.end > span.start]
            labels.append(int(max(gold, default=0) > 0))
    width = {layer: int(records[0].hidden[layer].shape[-1]) for layer in layers} if records \
        else {layer: 0 for layer in layers}
    return SpanRows(
        {layer: (np.stack(rows).astype(np.float32) if rows
                 else np.zeros((0, width[layer]), np.float32)) for layer, rows in states.items()},
        np.asarray(features, dtype=np.float64).reshape(len(features), len(SPAN_FEATURES)),
        np.asarray(labels, dtype=np.int64))


def _column_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of each column over its finite values (std 1 where a column is constant or
    empty, so a feature training never varied cannot blow up at inference)."""
    mean = np.zeros(x.shape[1])
    std = np.ones(x.shape[1])
    for k in range(x.shape[1]):
        column = x[:, k]
        column = column[np.isfinite(column)]
        if column.size:
            mean[k] = float(column.mean())
            sd = float(column.std())
            std[k] = sd if sd > 1e-6 else 1.0
    return mean, std


@dataclasses.dataclass
class SpanFit:
    """A fitted span head with its validation span AUC (None when undefined)."""

    probe: EntitySpanProbe
    weight_decay: float
    val_span_auc: float | None
    train_loss: float


def fit_span_probe(rows: SpanRows, layer: int, weight_decay: float = 0.03, *,
                   max_iter: int = 300) -> tuple[EntitySpanProbe, float]:
    """Fit the span head on ``rows`` (layer ``layer``); return it (threshold 0.5) and its final
    training loss."""
    if len(rows) == 0 or len(set(rows.labels.tolist())) < 2:
        raise ValueError("the span head needs training entities of both labels")
    states = rows.states[layer].astype(np.float64)
    hidden_size = states.shape[1]
    state_mean = states.mean(0)
    state_std = states.std(0)
    state_std = np.where(state_std > 1e-6, state_std, 1.0)
    feature_mean, feature_std = _column_stats(rows.features)
    z_features = np.nan_to_num((rows.features - feature_mean) / feature_std, nan=0.0,
                               posinf=0.0, neginf=0.0)
    z = torch.tensor(np.concatenate([(states - state_mean) / state_std, z_features], axis=1),
                     dtype=torch.float32)
    y = torch.tensor(rows.labels, dtype=torch.float32)
    weight = torch.zeros(z.shape[1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter,
                                  line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        return torch.nn.functional.binary_cross_entropy_with_logits(z @ weight + bias, y) \
            + weight_decay * (weight ** 2).sum()

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        final = float(objective())
    w = weight.detach().double().numpy()
    w_state = w[:hidden_size] / state_std  # fold the state standardisation in
    b = float(bias.detach()[0]) - float(np.dot(w[:hidden_size], state_mean / state_std))
    head = LinearProbe(hidden_size + len(SPAN_FEATURES), seed=0)
    with torch.no_grad():
        head.linear.weight.copy_(torch.tensor(np.concatenate([w_state, w[hidden_size:]]),
                                              dtype=torch.float32)[None])
        head.linear.bias.fill_(b)
    head.eval()
    probe = EntitySpanProbe(head, layer, 0.5, SPAN_FEATURES,
                            torch.tensor(feature_mean, dtype=torch.float32),
                            torch.tensor(feature_std, dtype=torch.float32))
    return probe, final


def val_span_auc(probe: EntitySpanProbe, val: Sequence[CachedRecord]) -> float | None:
    """Span-max AUC over the labelled spans of ``val``, scored as the monitor scores."""
    return span_auc(val, span_probe_scorer(probe))


def select_span_probe(train: Sequence[CachedRecord], val: Sequence[CachedRecord],
                      layers: Sequence[int],
                      weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS, *,
                      progress: bool = True) -> tuple[SpanFit, list[dict[str, Any]]]:
    """Fit a span head for each layer and weight decay; return the best by validation span AUC
    and the table of every candidate."""
    rows = span_rows(train, layers, progress=progress, desc="span rows (train)")
    if progress:
        print(f"span head: {len(rows)} training entities ({int(rows.labels.sum())} fabricated)",
              file=sys.stderr)
    table: list[dict[str, Any]] = []
    best: SpanFit | None = None
    grid = [(layer, wd) for layer in layers for wd in weight_decays]
    for layer, wd in tqdm(grid, desc="span head fits", unit="fit", disable=not progress):
        probe, loss = fit_span_probe(rows, layer, wd)
        auc = val_span_auc(probe, val)
        table.append({"layer": layer, "weight_decay": wd, "val_span_auc": auc,
                      "train_loss": round(loss, 5)})
        if progress:
            print(f"layer {layer}, wd {wd}: val span AUC {auc}", file=sys.stderr)
        if best is None or (auc or 0.0) > (best.val_span_auc or 0.0):
            best = SpanFit(probe, wd, auc, loss)
    if best is None:
        raise ValueError("no candidate layer or weight decay")
    best.probe.config = {"training_entities": len(rows),
                         "training_fabricated": int(rows.labels.sum())}
    return best, table
