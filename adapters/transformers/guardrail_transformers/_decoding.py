"""One answer being generated: the KV cache, the tokens so far, and the model's latest output.

Steps are lazy: ``next_step()`` reads the previous token (one forward) only when the caller asks
for the next one, so a caller that stops asking after a halt causes no further forward pass.
Each step carries the state that produced its token: ``hidden[layer]`` row 0 is the residual
stream at the position before the token (numbered like the observer: the state after block
``layer``, ``-1`` the last, normed), ``logits`` row 0 the distribution it was sampled from.

With ``needs.context`` the prompt's forward also pools the prompt's rows of those layers from
``context_from`` on (``guardrail.observer.context``: an observer's context read gives the same
means), and the first step carries them (``StreamStep.context``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from guardrail.monitor import Needs
from guardrail.observer.context import pool_rows
from guardrail.observer.hf import cache_kwarg
from guardrail.stream import StepToken, StreamStep

from ._detokenize import IncrementalDecoder

if TYPE_CHECKING:
    from ._generator import LocalGenerator

__all__ = ["Decoding"]


@dataclass
class _Output:
    """The model's output at the last position read: the hidden rows asked for and the logits."""

    hidden: dict[int, torch.Tensor]
    logits: torch.Tensor  # (vocab,)


class Decoding:
    """Generation state for one answer of one ``LocalGenerator``. With ``needs.context``,
    ``context_from`` is where the pooled span starts in ``prompt_ids``
    (``LocalGenerator.decoding`` finds it from the messages, as an observer does)."""

    def __init__(self, generator: LocalGenerator, prompt_ids: Sequence[int],
                 needs: Needs, *, context_from: int | None = None) -> None:
        if not prompt_ids:
            raise ValueError("the prompt rendered to no tokens; give a message or a prompt")
        if needs.context and not (context_from is not None and 0 <= context_from
                                  < len(prompt_ids)):
            raise ValueError(f"Decoding: needs.context pools the prompt from context_from, "
                             f"which must be a prompt index (0..{len(prompt_ids) - 1}), got "
                             f"{context_from!r}; LocalGenerator.decoding(messages, needs) finds it")
        from transformers import DynamicCache

        self.generator = generator
        self.model = generator.model
        self.device = next(self.model.parameters()).device
        self.prompt_ids = list(prompt_ids)
        self.layers = {layer: generator.hidden_index(layer) for layer in sorted(needs.layers)}
        self.send_logits = bool(needs.logits or needs.top_k)
        self.cache = DynamicCache(config=self.model.config)
        self._cache_kwarg = cache_kwarg(self.model)
        self.response_ids: list[int] = []
        self.decoder = IncrementalDecoder(generator.hf_tokenizer)
        self._unread: int | None = None  # the last token, not yet read by the model
        # the prompt's pooled states (needs.context), until the first step hands them over
        self.context: dict[int, Any] | None = None
        self.out = self._forward(self.prompt_ids, context_from if needs.context else None)

    @property
    def position(self) -> int:
        """Tokens the model has read (prompt and response)."""
        return int(self.cache.get_seq_length())

    def propose(self, choose: Callable[[torch.Tensor], int]) -> int:
        """Read the previous token if needed and choose the next one (not yet taken)."""
        if self._unread is not None:
            self.out = self._forward([self._unread])
            self._unread = None
        return choose(self.out.logits)

    def take(self, token_id: int) -> StreamStep:
        """Make ``token_id`` the next token of the answer; return its step."""
        text = self.decoder.push(token_id)
        self.response_ids.append(int(token_id))
        self._unread = int(token_id)
        hidden = {layer: row[None] for layer, row in self.out.hidden.items()}
        logits = self.out.logits[None] if self.send_logits else None
        context, self.context = self.context, None  # the first step carries them, once
        return StreamStep(text=text, tokens=[StepToken(int(token_id), text)],
                          hidden=hidden or None, logits=logits, context=context)

    def rewind(self, n_tokens: int) -> None:
        """Cut the answer back to its first ``n_tokens`` tokens, ready to propose token
        ``n_tokens`` again (one forward re-reads the token before it)."""
        if n_tokens == len(self.response_ids) - 1 and self._unread is not None:
            self._unread = None  # the model has not read the cut token: its output still holds
        else:
            keep = len(self.prompt_ids) + n_tokens
            self.cache.crop(keep - 1)
            self._unread = None
            before = (self.prompt_ids + self.response_ids)[keep - 1]
            self.out = self._forward([before])
        del self.response_ids[n_tokens:]
        self.decoder.truncate(n_tokens)

    def catch_up(self, ids: Sequence[int]) -> torch.Tensor:
        """Read ``ids`` after what the model has read, in one forward; return the next-token
        logits (a large model taking over a token of someone else's answer)."""
        if self._unread is not None:
            ids = [self._unread, *ids]
            self._unread = None
        if ids:
            self.out = self._forward(list(ids))
        return self.out.logits

    def _forward(self, ids: list[int], context_from: int | None = None) -> _Output:
        """One forward over ``ids``; the prompt's (``context_from`` given) also pools the rows
        of the requested layers from there on, where they lie (the rows come out anyway)."""
        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([ids], dtype=torch.long, device=self.device),
                             **{self._cache_kwarg: self.cache}, use_cache=True,
                             output_hidden_states=bool(self.layers), logits_to_keep=1)
            if context_from is not None:
                self.context = pool_rows({layer: out.hidden_states[index][0]
                                          for layer, index in self.layers.items()}, context_from)
        # To the CPU once per step: the sampler and the monitors' numpy maths read it there.
        hidden: dict[int, Any] = {}
        for layer, index in self.layers.items():
            hidden[layer] = out.hidden_states[index][0, -1].float().cpu()
        return _Output(hidden, out.logits[0, -1].float().cpu())
