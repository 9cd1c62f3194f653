"""Choosing the next token: greedy by default, or temperature with nucleus (top-p) sampling."""

from __future__ import annotations

import torch

__all__ = ["Sampler"]


class Sampler:
    """``temperature == 0`` is greedy (argmax). Otherwise the logits are divided by
    ``temperature``, cut to the smallest set of tokens whose probability reaches ``top_p``, and
    sampled with a generator seeded by ``seed`` (the same seed gives the same answer)."""

    def __init__(self, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None) -> None:
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.generator: torch.Generator | None = None
        if self.temperature > 0:
            self.generator = torch.Generator()
            self.generator.manual_seed(seed if seed is not None else torch.seed())

    def __call__(self, logits: torch.Tensor) -> int:
        """The next token id from a ``(vocab,)`` row of logits."""
        if self.generator is None:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            # keep a token while the mass before it is below top_p (the first is always kept)
            keep = (sorted_probs.cumsum(-1) - sorted_probs) < self.top_p
            sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
            pick = torch.multinomial(sorted_probs, 1, generator=self.generator)
            return int(order[pick])
        return int(torch.multinomial(probs, 1, generator=self.generator))
