"""R2R's loss for ``guardrail.toolkit.train.train_head``: BCE with positives weighted."""

from __future__ import annotations

from torch import Tensor

from guardrail.probes.heads import ProbeHead
from guardrail.toolkit.losses import weighted_bce
from guardrail.toolkit.train import Batch, LossFn

from ..head import RouterHead

__all__ = ["router_loss_fn"]


def router_loss_fn(pos_weight: float) -> LossFn:
    """R2R's loss for a ``RouterHead``: BCE with positives weighted ``pos_weight`` (``n0/n1``,
    see ``guardrail.toolkit.losses.positive_weight``)."""

    def loss(head: ProbeHead, batch: Batch, progress: float) -> Tensor:
        return weighted_bce(head(*RouterHead.batch_inputs(batch)), batch.token_labels, pos_weight)

    return loss
