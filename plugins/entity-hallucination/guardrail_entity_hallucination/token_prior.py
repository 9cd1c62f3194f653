"""Context-free priors of the observer's tokens: per vocabulary id, a prior surprisal in nats,
fixed before any stream, so that a span feature can read ``surprisal - prior`` (a PMI-like
score: what the context says about the token beyond how rare the token is anywhere) at no
extra forward. Issue 23's sixth entity pass (docs/entity-hallucination.md):

- ``start``: ``-log p(t)`` after the chat template's assistant start (an empty user message);
- ``marginal``: ``-log mean_c p(t | c)``, the model's own marginal over a sample of contexts;
- ``meanlog``: ``-mean_c log p(t | c)`` over the same contexts;
- ``merge``: ``log(1 + id)``: the tokenizer's merge order as a frequency rank (Zipf).

A prior file is safetensors, one float32 vector per prior, its metadata naming what it was
built from (``training.token_prior`` builds it). ``prior_values`` is the lookup the span
features read, the same offline and in the monitor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = ["PRIORS", "TokenPriors", "load_token_priors", "prior_values"]

PRIORS = ("start", "marginal", "meanlog", "merge")

TokenPriors = Mapping[str, np.ndarray]
"""Prior name -> ``(vocab,)`` float32 prior surprisal per token id."""


def load_token_priors(path: Path) -> dict[str, np.ndarray]:
    """The priors of a file written by ``training.token_prior``, checking names and shapes."""
    from safetensors.numpy import load_file

    if not path.exists():
        raise FileNotFoundError(f"token prior file {path} does not exist")
    loaded = load_file(str(path))
    unknown = sorted(set(loaded) - set(PRIORS))
    if unknown:
        raise ValueError(f"{path}: priors {unknown} are unknown; known: {list(PRIORS)}")
    sizes = {name: v.shape for name, v in loaded.items()}
    if len({s for s in sizes.values()}) > 1 or any(len(s) != 1 for s in sizes.values()):
        raise ValueError(f"{path}: every prior is one vector over the vocabulary; got {sizes}")
    return {name: np.asarray(v, dtype=np.float32) for name, v in loaded.items()}


def prior_values(vector: np.ndarray, ids: Sequence[int]) -> list[float]:
    """The prior surprisal of each token id (NaN for an unknown id, -1, or one outside the
    vector)."""
    size = len(vector)
    return [float(vector[i]) if 0 <= i < size else math.nan for i in ids]
