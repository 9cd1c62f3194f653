"""SCM's loss for the dual head: ``alpha*token CE + beta*sequence CE + gamma*logic``, the logic term
``-log(clamp(1 - p_seq + p_seq * max_t p_tok, 1e-8))`` saying "if the response is harmful, some
token is". Label ``-100`` means "ignore this token"."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from guardrail.probes.heads import ProbeHead
from guardrail.toolkit.losses import IGNORE
from guardrail.toolkit.train import Batch, LossFn

__all__ = ["ScmLoss", "scm_loss", "scm_loss_fn"]


class ScmLoss(NamedTuple):
    total: Tensor
    token: Tensor
    sequence: Tensor
    logic: Tensor


def scm_loss(
    token_logits: Tensor,
    sequence_logits: Tensor,
    token_labels: Tensor,
    sequence_labels: Tensor,
    alpha: float = 0.6,
    beta: float | None = None,
    gamma: float = 1.0,
) -> ScmLoss:
    """SCM's loss. ``token_logits (B, T, 2)``, ``sequence_logits (B, 2)``, ``token_labels (B, T)``
    (``-100`` for prompt, padding and special tokens), ``sequence_labels (B,)``; ``beta`` defaults
    to ``1 - alpha``. The logic term's max runs over the tokens with a label."""
    beta = 1.0 - alpha if beta is None else beta
    valid = token_labels != IGNORE
    if valid.any():
        token = F.cross_entropy(token_logits.reshape(-1, 2), token_labels.reshape(-1).long(),
                                ignore_index=IGNORE)
    else:
        token = token_logits.sum() * 0.0  # keeps the graph: nothing to learn from
    sequence = F.cross_entropy(sequence_logits, sequence_labels.long())
    p_seq = torch.softmax(sequence_logits, dim=-1)[:, 1]
    p_tok = torch.softmax(token_logits, dim=-1)[..., 1] * valid.to(token_logits.dtype)
    g = p_tok.max(dim=1).values
    logic = -torch.log(torch.clamp(1.0 - p_seq + p_seq * g, min=1e-8)).mean()
    return ScmLoss(alpha * token + beta * sequence + gamma * logic, token, sequence, logic)



def scm_loss_fn(alpha: float = 0.6, beta: float | None = None, gamma: float = 1.0) -> LossFn:
    """SCM's loss for a ``DualHead``: needs response labels on every record."""

    def loss(head: ProbeHead, batch: Batch, progress: float) -> Tensor:
        if bool((batch.labels == IGNORE).any()):
            raise ValueError("SCM training needs a response label on every record")
        token_logits, sequence_logits = head(batch.hidden, batch.mask)
        return scm_loss(token_logits, sequence_logits, batch.token_labels, batch.labels,
                        alpha, beta, gamma).total

    return loss

