"""A small training loop over cached features, shared by the three monitors.

``train_head(head, train, val, layer=..., loss_fn=..., metric_fn=...)`` batches records (padding
and masks), runs AdamW for some epochs with a progress bar, validates each epoch with
``metric_fn`` (higher is better) and keeps the best weights. The head and loss are pluggable:

- ``entity_loss()``: token BCE with entity weights annealed into span-max BCE (linear probe);
- a head's plugin may ship its own (the router plugin's ``router_loss_fn``, the harmful-content
  plugin's ``scm_loss_fn``);
- or any ``loss_fn(head, batch, progress) -> Tensor``.

Validation metrics: ``token_auc_metric``, ``span_auc_metric``, ``response_auc_metric``,
``streaming_f1_metric``, or any ``metric_fn(head, records) -> float``.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..probes.heads import ProbeHead
from .calibrate import calibrate_count_k
from .features import CachedRecord
from .losses import (
    IGNORE,
    annealed_loss,
    span_max_bce,
    token_bce,
)
from .metrics import roc_auc

__all__ = [
    "Batch",
    "LabelFn",
    "LossFn",
    "MetricFn",
    "TrainResult",
    "collate",
    "entity_loss",
    "response_auc_metric",
    "score_records",
    "span_auc_metric",
    "streaming_f1_metric",
    "token_auc_metric",
    "train_head",
]

LabelFn = Callable[[CachedRecord], Sequence[int]]
"""Per-token labels of a record (``-100`` to ignore a token); default: from its spans."""


@dataclass
class Batch:
    """Padded tensors for a list of records; ``mask`` is True on real tokens. Padding has token
    label ``-100``, span id ``-1``, weight 0. ``labels`` are response labels (``-100``: none)."""

    records: list[CachedRecord]
    hidden: Tensor  # (B, T, H) float32
    mask: Tensor  # (B, T) bool
    token_labels: Tensor  # (B, T) long
    token_weights: Tensor  # (B, T) float
    span_ids: Tensor  # (B, T) long
    span_labels: Tensor  # (B, S) long
    labels: Tensor  # (B,) long
    ids: Tensor  # (B, T) long
    top_logits: Tensor | None = None  # (B, T, k)
    top_ids: Tensor | None = None  # (B, T, k)


def collate(records: Sequence[CachedRecord], layer: int, *, default_label: int = 0,
            entity_weight: float = 1.0, label_fn: LabelFn | None = None) -> Batch:
    """Pad ``records`` into a ``Batch`` reading hidden layer ``layer``. Token labels come from
    ``label_fn`` or else from the spans (tokens outside every span get ``default_label``); tokens
    inside a span weigh ``entity_weight``."""
    b = len(records)
    t = max((len(r) for r in records), default=0)
    s = max((len(r.spans) for r in records), default=0)
    hidden_size = next(iter(records[0].hidden.values())).shape[-1] if records else 0
    batch = Batch(
        records=list(records),
        hidden=torch.zeros(b, t, hidden_size),
        mask=torch.zeros(b, t, dtype=torch.bool),
        token_labels=torch.full((b, t), IGNORE, dtype=torch.long),
        token_weights=torch.zeros(b, t),
        span_ids=torch.full((b, t), -1, dtype=torch.long),
        span_labels=torch.full((b, s), IGNORE, dtype=torch.long),
        labels=torch.tensor([IGNORE if r.label is None else r.label for r in records],
                            dtype=torch.long),
        ids=torch.zeros(b, t, dtype=torch.long),
    )
    k = next((r.top_logits.shape[-1] for r in records if r.top_logits is not None), 0)
    if k:
        batch.top_logits = torch.zeros(b, t, k)
        batch.top_ids = torch.zeros(b, t, k, dtype=torch.long)
    for i, r in enumerate(records):
        n = len(r)
        if layer not in r.hidden:
            raise KeyError(f"record {r.index} has no cached layer {layer} "
                           f"(cached: {sorted(r.hidden)})")
        batch.hidden[i, :n] = r.hidden[layer].float()
        batch.mask[i, :n] = True
        labels = list(label_fn(r)) if label_fn is not None else r.token_labels(default_label)
        if len(labels) != n:
            raise ValueError(f"label_fn gave {len(labels)} labels for record {r.index} with "
                             f"{n} tokens")
        batch.token_labels[i, :n] = torch.tensor(labels, dtype=torch.long)
        span_ids = r.token_span_ids()
        batch.span_ids[i, :n] = torch.tensor(span_ids, dtype=torch.long)
        batch.token_weights[i, :n] = torch.tensor(
            [entity_weight if sid >= 0 else 1.0 for sid in span_ids])
        batch.span_labels[i, : len(r.spans)] = torch.tensor([sp.label for sp in r.spans],
                                                            dtype=torch.long)
        batch.ids[i, :n] = r.ids
        if batch.top_logits is not None and r.top_logits is not None:
            batch.top_logits[i, :n] = r.top_logits.float()
        if batch.top_ids is not None and r.top_ids is not None:
            batch.top_ids[i, :n] = r.top_ids
    return batch


LossFn = Callable[[ProbeHead, Batch, float], Tensor]
"""``loss_fn(head, batch, progress)``; ``progress`` runs from 0 to 1 over training."""
MetricFn = Callable[[ProbeHead, Sequence[CachedRecord]], float]
"""``metric_fn(head, records)`` on validation records; higher is better."""


def entity_loss(warmup: float = 1.0) -> LossFn:
    """The entity probe's loss: ``(1-w) * token BCE (weighted) + w * span-max BCE``,
    ``w = min(1, progress / warmup)``. Use with ``collate(entity_weight=10)``."""

    def loss(head: ProbeHead, batch: Batch, progress: float) -> Tensor:
        logits = head(batch.hidden)
        return annealed_loss(token_bce(logits, batch.token_labels, batch.token_weights),
                             span_max_bce(logits, batch.span_ids, batch.span_labels),
                             progress, warmup)

    return loss


@torch.no_grad()
def score_records(head: ProbeHead, records: Sequence[CachedRecord], layer: int,
                  batch_size: int = 16) -> list[list[float]]:
    """Per-token scores in [0, 1] of each record: a head's own ``score_batch(batch)`` (a head
    with inputs besides the states: the router plugin's), its ``score(hidden)`` (a linear
    probe's sigmoid, the harmful-content plugin's prefix score), else the sigmoid of its logit."""
    was_training = head.training
    head.eval()
    out: list[list[float]] = []
    for i in range(0, len(records), batch_size):
        batch = collate(records[i : i + batch_size], layer)
        score_batch = getattr(head, "score_batch", None)
        score = getattr(head, "score", None)
        if score_batch is not None:
            scores = score_batch(batch)
        elif callable(score):
            scores = score(batch.hidden)
        else:
            scores = torch.sigmoid(head(batch.hidden))
        for row, r in enumerate(batch.records):
            out.append(scores[row, : len(r)].tolist())
    head.train(was_training)
    return out


def token_auc_metric(layer: int, default_label: int = 0,
                     label_fn: LabelFn | None = None) -> MetricFn:
    """ROC-AUC over every labelled token."""

    def metric(head: ProbeHead, records: Sequence[CachedRecord]) -> float:
        labels: list[int] = []
        scores: list[float] = []
        for r, s in zip(records, score_records(head, records, layer), strict=True):
            ys = label_fn(r) if label_fn is not None else r.token_labels(default_label)
            pairs = [(y, x) for y, x in zip(ys, s, strict=True) if y != IGNORE]
            labels.extend(y for y, _ in pairs)
            scores.extend(x for _, x in pairs)
        return roc_auc(labels, scores)

    return metric


def span_auc_metric(layer: int) -> MetricFn:
    """ROC-AUC of each span's maximum token score against the span's label (span-max)."""

    def metric(head: ProbeHead, records: Sequence[CachedRecord]) -> float:
        labels: list[int] = []
        scores: list[float] = []
        for r, s in zip(records, score_records(head, records, layer), strict=True):
            ids = r.token_span_ids()
            for k, span in enumerate(r.spans):
                inside = [x for x, sid in zip(s, ids, strict=True) if sid == k]
                if inside:
                    labels.append(span.label)
                    scores.append(max(inside))
        return roc_auc(labels, scores)

    return metric


def response_auc_metric(layer: int) -> MetricFn:
    """ROC-AUC of each response's maximum (prefix) score against its response label."""

    def metric(head: ProbeHead, records: Sequence[CachedRecord]) -> float:
        labelled = [r for r in records if r.label is not None]
        scores = score_records(head, labelled, layer)
        return roc_auc([int(r.label or 0) for r in labelled],
                       [max(s, default=0.0) for s in scores])

    return metric


def streaming_f1_metric(layer: int, **calibrate_kwargs: Any) -> MetricFn:
    """Best streaming macro-F1 of SCM's count-k rule (``calibrate_count_k``) on the records."""

    def metric(head: ProbeHead, records: Sequence[CachedRecord]) -> float:
        labelled = [r for r in records if r.label is not None]
        scores = score_records(head, labelled, layer)
        return calibrate_count_k(scores, [int(r.label or 0) for r in labelled],
                                 **calibrate_kwargs).macro_f1

    return metric


@dataclass
class TrainResult:
    """The head (holding its best weights), the best validation metric and epoch, and one history
    row per epoch (``epoch``, ``train_loss``, ``val_metric``)."""

    head: ProbeHead
    best_metric: float | None
    best_epoch: int
    history: list[dict[str, float | None]] = field(default_factory=list)


def _safe_metric(metric_fn: MetricFn, head: ProbeHead,
                 records: Sequence[CachedRecord]) -> float | None:
    try:
        value = float(metric_fn(head, records))
    except ValueError:  # e.g. one class only in a small validation split
        return None
    return None if math.isnan(value) else value


def _step(head: ProbeHead, batch: Batch, loss_fn: LossFn, optimizer: torch.optim.Optimizer,
          params: Sequence[Tensor], grad_clip: float | None, progress: float) -> float:
    """One optimiser step on ``batch``; its loss."""
    loss = loss_fn(head, batch, progress)
    optimizer.zero_grad()
    loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    return float(loss.detach())


def _record_epoch(result: TrainResult, epoch: int, losses: Sequence[float],
                  value: float | None) -> dict[str, Tensor] | None:
    """Add the epoch to ``result.history``; a copy of the head's weights when they are the best
    so far (until a metric exists, the latest)."""
    result.history.append({"epoch": epoch + 1, "train_loss": sum(losses) / len(losses),
                           "val_metric": value})
    improved = value is not None and (result.best_metric is None or value >= result.best_metric)
    if not (improved or result.best_metric is None):
        return None
    result.best_metric = value if improved else result.best_metric
    result.best_epoch = epoch + 1
    return copy.deepcopy(result.head.state_dict())


def train_head(
    head: ProbeHead,
    train: Sequence[CachedRecord],
    val: Sequence[CachedRecord],
    *,
    layer: int,
    loss_fn: LossFn,
    metric_fn: MetricFn | None = None,
    epochs: int = 3,
    batch_size: int = 8,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    grad_clip: float | None = 1.0,
    seed: int = 42,
    progress: bool = True,
    collate_kwargs: dict[str, Any] | None = None,
) -> TrainResult:
    """Train ``head`` on ``train`` with AdamW; after each epoch score ``val`` with ``metric_fn``
    and keep the best weights (the last epoch's when there is no metric). Seeded: the same inputs
    give the same weights."""
    if not train:
        raise ValueError("no training records")
    torch.manual_seed(seed)
    order_rng = random.Random(seed)
    params = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    total_steps = max(1, epochs * steps_per_epoch)
    kwargs = collate_kwargs or {}
    result = TrainResult(head, None, -1)
    best_state: dict[str, Tensor] | None = None
    step = 0
    bar = tqdm(total=total_steps, desc=f"train {head.kind}", unit="batch", disable=not progress)
    for epoch in range(epochs):
        head.train()
        order = list(range(len(train)))
        order_rng.shuffle(order)
        batches = (collate([train[j] for j in order[i : i + batch_size]], layer, **kwargs)
                   for i in range(0, len(order), batch_size))
        losses = []
        for batch in batches:
            losses.append(_step(head, batch, loss_fn, optimizer, params, grad_clip,
                                step / total_steps))
            step += 1
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.4f}")
        value = _safe_metric(metric_fn, head, val) if metric_fn is not None and val else None
        best_state = _record_epoch(result, epoch, losses, value) or best_state
        if progress:
            bar.write(f"epoch {epoch + 1}: loss {result.history[-1]['train_loss']:.4f}"
                      + (f", val {value:.4f}" if value is not None else ""))
    bar.close()
    if best_state is not None:
        head.load_state_dict(best_state)
    head.eval()
    return result
