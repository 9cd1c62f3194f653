"""What the harmful-content head reads per token: the layers' states side by side and, for a pooled
head, their causal (weighted) mean so far. The monitor and the trainer share these definitions."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["POOLINGS", "RMS_EPS", "TOKEN_NORMS", "halflives_of", "normalise_tokens", "prefix_ema",
           "prefix_mean", "stack_states"]

POOLINGS = ("none", "prefix_mean", "prefix_ema")
"""What the head reads per token: ``"none"``, the token's states (SCM); ``"prefix_mean"``, the
token's states and the mean of the states of the response up to and including it. The mean is
causal (a prefix's score never reads later tokens) and steadier than one token's states, so benign
answers spike past the threshold less often. ``"prefix_ema"``: the token's states and their
exponentially weighted mean up to it (weight ``2 ** (-(i - j) / halflife)`` on token ``j``,
normalised; the head's config names ``halflife``), which follows an answer that turns harmful
late faster than the mean does. ``halflife`` may also be several half-lives (a list): one
weighted mean per half-life, side by side after the token's states (the fourteenth pass: a fast
pool that follows a late turn, a slow one that keeps the context)."""

TOKEN_NORMS = ("none", "rms")
"""What is done to each token's state of each layer before anything reads it (config key
``token_norm``): ``"none"``, the raw residual stream; ``"rms"``, divided by its root mean square
over the hidden dimensions (``h / sqrt(mean(h ** 2) + RMS_EPS)``: the model's own RMSNorm without
its gain, which a probe on standardised columns undoes anyway). Residual norms differ by orders of
magnitude between tokens (the first tokens, newlines, punctuation carry massive activations), so
the raw pooled mean leans on formatting tokens; normalised, every token weighs the same."""

RMS_EPS = 1e-5  # SmolLM2's rms_norm_eps


def normalise_tokens(states: Any, token_norm: str = "none") -> np.ndarray:
    """``(n, H)`` one layer's states -> float32 ``(n, H)`` after ``token_norm`` (``TOKEN_NORMS``;
    each row on its own, so the transform is causal). The monitor and the trainer both call it."""
    if token_norm not in TOKEN_NORMS:
        raise ValueError(f"token_norm {token_norm!r}: expected one of {list(TOKEN_NORMS)}")
    x = np.asarray(states, dtype=np.float32)
    if token_norm == "none":
        return x
    x64 = x.astype(np.float64)
    rms = np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + RMS_EPS)
    return (x64 / rms).astype(np.float32)


def halflives_of(halflife: Any) -> tuple[float, ...]:
    """A pooled head's half-lives as a tuple: one number, or a non-empty list of them, each a
    number of tokens > 0 (``ValueError`` naming ``halflife`` otherwise)."""
    values = list(halflife) if isinstance(halflife, (list, tuple)) else [halflife]
    ok = bool(values) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
        for v in values)
    if not ok:
        raise ValueError(f"halflife must be a number of tokens > 0 or a non-empty list of them, "
                         f"got {halflife!r}")
    return tuple(float(v) for v in values)


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
                 halflife: float | Sequence[float] | None = None,
                 token_norm: str = "none") -> torch.Tensor:
    """``hidden`` maps layer -> ``(n, H)``; the requested layers side by side, ``(n, H*len)``,
    followed by their prefix means when ``pooling`` is ``"prefix_mean"`` (``(n, 2*H*len)``), or
    their exponentially weighted means (``halflife`` tokens; several half-lives: one block of
    ``H*len`` per half-life, in their order) when it is ``"prefix_ema"``; each token's state first
    normalised by ``token_norm`` (``normalise_tokens``)."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling {pooling!r}: expected one of {list(POOLINGS)}")
    if pooling == "prefix_ema" and halflife is None:
        raise ValueError("pooling 'prefix_ema' needs a halflife")
    missing = [layer for layer in layers if layer not in hidden]
    if missing:
        raise KeyError(f"the harmful-content head reads layers {list(layers)}; the features "
                       f"have {sorted(hidden)}")
    if token_norm not in TOKEN_NORMS:
        raise ValueError(f"token_norm {token_norm!r}: expected one of {list(TOKEN_NORMS)}")
    if token_norm == "none":
        parts = [torch.as_tensor(hidden[layer]).float() for layer in layers]
    else:
        parts = [torch.from_numpy(normalise_tokens(
            torch.as_tensor(hidden[layer]).float().numpy(), token_norm)) for layer in layers]
    states = torch.cat(parts, dim=-1)
    if pooling == "prefix_mean":
        states = torch.cat([states, prefix_mean(states)], dim=-1)
    elif pooling == "prefix_ema":
        assert halflife is not None
        states = torch.cat([states] + [prefix_ema(states, h) for h in halflives_of(halflife)],
                           dim=-1)
    return states
