"""What the harmful-content head reads per token: the layers' states side by side and, for a pooled
head, their causal (weighted) mean so far. The monitor and the trainer share these definitions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["POOLINGS", "prefix_ema", "prefix_mean", "stack_states"]

POOLINGS = ("none", "prefix_mean", "prefix_ema")
"""What the head reads per token: ``"none"``, the token's states (SCM); ``"prefix_mean"``, the
token's states and the mean of the states of the response up to and including it. The mean is
causal (a prefix's score never reads later tokens) and steadier than one token's states, so benign
answers spike past the threshold less often. ``"prefix_ema"``: the token's states and their
exponentially weighted mean up to it (weight ``2 ** (-(i - j) / halflife)`` on token ``j``,
normalised; the head's config names ``halflife``), which follows an answer that turns harmful
late faster than the mean does."""


def prefix_mean(states: torch.Tensor) -> torch.Tensor:
    """``(n, H)`` -> ``(n, H)``: row ``i`` is the mean of rows ``0..i``."""
    counts = torch.arange(1, states.shape[0] + 1, dtype=states.dtype).unsqueeze(-1)
    return torch.cumsum(states, dim=0) / counts


def prefix_ema(states: torch.Tensor, halflife: float) -> torch.Tensor:
    """``(n, H)`` -> ``(n, H)``: row ``i`` the weighted mean of rows ``0..i``, weight
    ``2 ** (-(i - j) / halflife)`` on row ``j`` (the weights of every row sum to one)."""
    if not halflife > 0:
        raise ValueError(f"halflife must be > 0 tokens, got {halflife!r}")
    d = 2.0 ** (-1.0 / halflife)
    x = states.double()
    out = torch.empty_like(x)
    total = torch.zeros_like(x[0]) if len(x) else x
    weight = 0.0
    for i in range(x.shape[0]):
        total = d * total + x[i]
        weight = d * weight + 1.0
        out[i] = total / weight
    return out.to(states.dtype)


def stack_states(hidden: Any, layers: Sequence[int], pooling: str = "none",
                 halflife: float | None = None) -> torch.Tensor:
    """``hidden`` maps layer -> ``(n, H)``; the requested layers side by side, ``(n, H*len)``,
    followed by their prefix means when ``pooling`` is ``"prefix_mean"`` (``(n, 2*H*len)``), or
    their exponentially weighted means (``halflife`` tokens) when it is ``"prefix_ema"``."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling {pooling!r}: expected one of {list(POOLINGS)}")
    if pooling == "prefix_ema" and halflife is None:
        raise ValueError("pooling 'prefix_ema' needs a halflife")
    missing = [layer for layer in layers if layer not in hidden]
    if missing:
        raise KeyError(f"the harmful-content head reads layers {list(layers)}; the features "
                       f"have {sorted(hidden)}")
    states = torch.cat([torch.as_tensor(hidden[layer]).float() for layer in layers], dim=-1)
    if pooling == "prefix_mean":
        states = torch.cat([states, prefix_mean(states)], dim=-1)
    elif pooling == "prefix_ema":
        assert halflife is not None
        states = torch.cat([states, prefix_ema(states, halflife)], dim=-1)
    return states
