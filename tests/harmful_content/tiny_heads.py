"""Random harm heads of the shipped shape over a tiny model's layers, for the prompt-term tests."""

from __future__ import annotations

import numpy as np
import torch
from guardrail_harmful_content.head import DualHead

LAYERS = (1, 3)
HIDDEN = 32
HALFLIFE = 12.0


def random_head(kind: str, prompt: np.ndarray | None, seed: int = 0) -> DualHead:
    """Random weights of the shipped shape (``mlp``: the pooled half on a one-unit MLP whose
    shifted GELU is the identity, as the trainer writes it) or SCM's linear head (``linear``),
    with ``prompt`` as the prompt term's weight (none when None)."""
    g = torch.Generator().manual_seed(seed)
    width = len(LAYERS) * HIDDEN
    if kind == "mlp":
        head = DualHead(2 * width, dropout=0.0, seed=0, sequence_hidden=1)
        first, last = head.sequence_layers()
        with torch.no_grad():
            first.weight.zero_()
            first.weight[0, width:] = torch.randn(width, generator=g) * 0.3
            first.bias.fill_(60.0)
            last.weight.copy_(torch.tensor([[0.0], [1.0]]))
            last.bias.copy_(torch.tensor([0.0, -60.0]))
    else:
        head = DualHead(width, dropout=0.0, seed=0)
        with torch.no_grad():
            head.sequence_layers()[0].weight.copy_(torch.randn(2, width, generator=g) * 0.3)
    if prompt is not None:
        head.set_prompt_weight(prompt)
    return head.eval()
