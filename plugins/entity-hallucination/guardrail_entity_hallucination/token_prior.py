"""Context-free priors of the observer's tokens: per vocabulary id, a prior surprisal in nats,
fixed before any stream, so that a span feature can read ``surprisal - prior`` (a PMI-like
score: what the context says about the token beyond how rare the token is anywhere) at no
extra forward. Issue 23's sixth entity pass (docs/entity-hallucination.md):

- ``start``: ``-log p(t)`` after the chat template's assistant start (an empty user message);
- ``marginal``: ``-log mean_c p(t | c)``, the model's own marginal over a sample of contexts;
- ``meanlog``: ``-mean_c log p(t | c)`` over the same contexts;
- ``merge``: ``log(1 + id)``: the tokenizer's merge order as a frequency rank (Zipf).

The priors are built, loaded and looked up in ``training.token_prior`` (the sixth pass chose
no head that reads them); the monitor only needs their names, for the span features' layout.
"""

from __future__ import annotations

__all__ = ["PRIORS"]

PRIORS = ("start", "marginal", "meanlog", "merge")
