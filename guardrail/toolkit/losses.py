"""Training losses of the three methods (torch). Label ``-100`` means "ignore this token/span".

- ``token_bce`` / ``span_max_bce`` / ``annealed_loss``: the entity-hallucination probe's loss,
  token BCE (entity tokens weighted) annealed into span-max BCE: ``(1-w)*token + w*span_max`` with
  ``w = min(1, progress / warmup)``.
- ``weighted_bce`` with ``positive_weight`` (``n0/n1``): R2R's router loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "IGNORE",
    "anneal_weight",
    "annealed_loss",
    "positive_weight",
    "span_max_bce",
    "token_bce",
    "weighted_bce",
]

IGNORE = -100


def _zero(like: Tensor) -> Tensor:
    """A zero that keeps the graph (a batch with nothing to learn from)."""
    return like.sum() * 0.0


def token_bce(logits: Tensor, labels: Tensor, weights: Tensor | None = None) -> Tensor:
    """Per-token BCE on logits (clamped to +-100), each token times its weight, averaged over the
    tokens whose label is not ``-100``."""
    valid = labels != IGNORE
    if not valid.any():
        return _zero(logits)
    target = labels.clamp(min=0).to(logits.dtype)
    losses = F.binary_cross_entropy_with_logits(logits.clamp(-100, 100), target, reduction="none")
    if weights is not None:
        losses = losses * weights.to(losses.dtype)
    return losses[valid].sum() / valid.sum()


def span_max_logits(logits: Tensor, span_ids: Tensor, n_spans: int) -> tuple[Tensor, Tensor]:
    """The maximum logit inside each span: ``logits (B, T)``, ``span_ids (B, T)`` (``-1``: no
    span) -> ``(B, n_spans)`` maxima and a mask of spans that have at least one token."""
    ids = torch.arange(n_spans, device=logits.device)
    member = span_ids.unsqueeze(-1) == ids  # (B, T, S)
    masked = logits.unsqueeze(-1).masked_fill(~member, float("-inf"))
    return masked.max(dim=1).values, member.any(dim=1)


def span_max_bce(logits: Tensor, span_ids: Tensor, span_labels: Tensor) -> Tensor:
    """BCE of each span's maximum logit against its label, averaged over spans.

    ``span_ids (B, T)`` gives each token's span index into ``span_labels (B, S)`` (``-1`` for
    tokens outside every span); spans labelled ``-100`` or without tokens are skipped."""
    if span_labels.numel() == 0:
        return _zero(logits)
    maxima, has_tokens = span_max_logits(logits, span_ids, span_labels.shape[1])
    valid = has_tokens & (span_labels != IGNORE)
    if not valid.any():
        return _zero(logits)
    target = span_labels[valid].to(logits.dtype)
    return F.binary_cross_entropy_with_logits(maxima[valid].clamp(-100, 100), target)


def anneal_weight(progress: float, warmup: float = 1.0) -> float:
    """``min(1, progress / warmup)``: the span-max share at ``progress`` in [0, 1] of training."""
    if warmup <= 0:
        return 1.0
    return min(1.0, max(0.0, progress) / warmup)


def annealed_loss(token_loss: Tensor, span_loss: Tensor, progress: float,
                  warmup: float = 1.0) -> Tensor:
    """``(1 - w) * token_loss + w * span_loss`` with ``w = anneal_weight(progress, warmup)``."""
    w = anneal_weight(progress, warmup)
    return (1.0 - w) * token_loss + w * span_loss


def positive_weight(labels: Tensor) -> float:
    """``n0 / n1`` over the labels that are not ``-100`` (1.0 when a class is missing)."""
    valid = labels[labels != IGNORE]
    n1 = int((valid == 1).sum())
    n0 = int(valid.numel()) - n1
    return n0 / n1 if n1 and n0 else 1.0


def weighted_bce(logits: Tensor, labels: Tensor, pos_weight: float) -> Tensor:
    """BCE with positives weighted by ``pos_weight``, averaged over tokens not labelled -100."""
    valid = labels != IGNORE
    if not valid.any():
        return _zero(logits)
    weight = torch.tensor(pos_weight, dtype=logits.dtype, device=logits.device)
    return F.binary_cross_entropy_with_logits(
        logits[valid], labels[valid].to(logits.dtype), pos_weight=weight
    )
