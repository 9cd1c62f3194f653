"""R2R's uncertainty baselines (and BiLD's fallback rule) as per-token scores, higher = route.

They need no training and no hidden states: from full logits, or from the top logprobs an
OpenAI-compatible API returns (``top_logprobs``, at most 20), where the entropy is taken over the
returned tokens plus one bucket holding the rest of the probability mass.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

__all__ = ["entropy_from_logprobs", "max_prob_from_logprobs", "uncertainty_from_logprobs"]


def entropy_from_logprobs(logprobs: Iterable[float]) -> float:
    """Entropy (nats) of a distribution known by its top logprobs; the missing mass counts as one
    outcome (a lower bound of the full entropy)."""
    probs = [math.exp(lp) for lp in logprobs]
    rest = max(0.0, 1.0 - sum(probs))
    return -sum(p * math.log(p) for p in [*probs, rest] if p > 0)


def max_prob_from_logprobs(logprobs: Iterable[float]) -> float:
    """The largest probability among the top logprobs (0 when there are none)."""
    return max((math.exp(lp) for lp in logprobs), default=0.0)


def uncertainty_from_logprobs(top_logprobs: Mapping[str, float],
                              kind: str = "entropy") -> float:
    """A route score from one token's OpenAI ``top_logprobs``: ``"entropy"`` or ``"max_prob"``
    (scored as ``1 - max probability``)."""
    if kind == "entropy":
        return entropy_from_logprobs(top_logprobs.values())
    if kind == "max_prob":
        return 1.0 - max_prob_from_logprobs(top_logprobs.values())
    raise ValueError(f"uncertainty kind must be 'entropy' or 'max_prob', got {kind!r}")
