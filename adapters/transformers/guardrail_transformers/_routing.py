"""Two local models, token by token: when a ``route`` monitor fires on a token of the small
model's answer, a larger model sharing its tokenizer writes that token instead, then the small
model goes on (R2R). The large model reads the answer lazily: only when asked for a token, in one
forward over everything it has not read yet.

``routed_generator`` exposes the router plugin's own scorer-driven ``RoutedGenerator`` (no guard
session) over the same ``LocalGenerator`` objects.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from guardrail.errors import GuardrailError
from guardrail.monitor import Needs

from ._decoding import Decoding

if TYPE_CHECKING:
    from ._generator import LocalGenerator, Prompt

__all__ = ["LargeSide", "routed_generator"]


class LargeSide:
    """The large model's view of one answer: its own prompt, cache, and the answer tokens read."""

    def __init__(self, small: LocalGenerator, targets: LocalGenerator | Mapping[str, Any],
                 prompt: Prompt) -> None:
        from ._generator import LocalGenerator

        self.targets: dict[str, LocalGenerator] = (
            {"*": targets} if isinstance(targets, LocalGenerator) else dict(targets))
        for name, large in self.targets.items():
            _check_vocab(small, large, name)
        self.prompt = prompt
        self._sides: dict[str, _Side] = {}

    def next_logits(self, target: Mapping[str, Any], response: Sequence[int]) -> torch.Tensor:
        """The large model's next-token logits after ``response`` (the small model's answer so
        far), for the route target a policy named (``route_to.model``)."""
        name = str(target.get("model", ""))
        if name in self.targets:
            key = name
        elif "*" in self.targets:
            key = "*"
        else:
            raise GuardrailError(
                f"route to model {name!r}: no local model given for it (route_to has "
                f"{sorted(self.targets)}); pass route_to={{{name!r}: LocalGenerator(...)}}")
        side = self._sides.get(key)
        if side is None:
            large = self.targets[key]
            side = self._sides[key] = _Side(large, large.prompt_ids(self.prompt))
        return side.next_logits(list(response))

    @property
    def eos_ids(self) -> frozenset[int]:
        return frozenset().union(*(t.eos_ids for t in self.targets.values()))


class _Side:
    def __init__(self, large: LocalGenerator, prompt_ids: list[int]) -> None:
        self.large = large
        self.prompt_ids = prompt_ids
        self.decoding: Decoding | None = None
        self.seen: list[int] = []  # answer tokens in the large model's cache

    def next_logits(self, response: list[int]) -> torch.Tensor:
        if self.decoding is None:
            self.decoding = Decoding(self.large, self.prompt_ids + response, Needs())
            self.seen = response
            return self.decoding.out.logits
        common = 0
        for a, b in zip(self.seen, response, strict=False):
            if a != b:
                break
            common += 1
        if common == len(self.seen) == len(response):
            return self.decoding.out.logits  # nothing new to read
        full = self.prompt_ids + response
        if common < len(self.seen) or common == len(response):  # the answer was cut back
            keep = len(self.prompt_ids) + common - 1
            self.decoding.cache.crop(keep)
            ids = full[keep:]
        else:
            ids = response[common:]
        self.seen = response
        return self.decoding.catch_up(ids)


def _check_vocab(small: LocalGenerator, large: LocalGenerator, name: str) -> None:
    if small.hf_tokenizer.get_vocab() != large.hf_tokenizer.get_vocab():
        raise GuardrailError(
            f"route_to[{name!r}] ({large.name}) must share {small.name}'s tokenizer: token-level "
            "routing hands token ids from one model to the other")


def routed_generator(small: LocalGenerator, large: LocalGenerator,
                     scorer: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                     threshold: float) -> Any:
    """The router plugin's ``RoutedGenerator`` over two local generators: the small model
    proposes every token, ``scorer(hidden, logits, proposed)`` decides when the large one writes
    it. Needs ``guardrail-router`` (``pip install 'guardrail-transformers[router]'``); see
    ``guardrail_router.local`` for the scorers (``router_scorer``, ``entropy_scorer``)."""
    try:
        from guardrail_router.lm import ChatLM
        from guardrail_router.local import RoutedGenerator
    except ImportError as exc:
        raise GuardrailError("routed_generator needs guardrail-router: "
                             "pip install 'guardrail-transformers[router]'") from exc
    _check_vocab(small, large, large.name)
    return RoutedGenerator(ChatLM(small.model, small.hf_tokenizer, small.name),
                           ChatLM(large.model, large.hf_tokenizer, large.name), scorer, threshold)
