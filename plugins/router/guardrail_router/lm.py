"""A causal LM seen the way the router needs it: chat prompts as token ids, batched greedy decoding
with left padding, and the small model's per-position router inputs (last-layer state, top-k
logit values, greedy prediction, entropy).

One ``ChatLM`` may serve as both sides of a pair: the offline pair uses the same SmolLM2 weights
with and without the facts in the prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from guardrail.monitor import Message
from guardrail.observer.generation import end_of_turn_ids, greedy_batch, left_pad
from guardrail.observer.hf import cache_kwarg, quiet_loading
from guardrail.observer.model import render_context

from .sentences import sentence_end

__all__ = ["ChatLM", "PositionFeatures", "StepOutput", "load_chat_lm", "sentence_end"]


@dataclass
class StepOutput:
    """One decoding step for a batch: last-layer states ``(B, H)`` and logits ``(B, V)`` at the
    last position of each row."""

    hidden: Tensor
    logits: Tensor


@dataclass
class PositionFeatures:
    """Router inputs of one response, one row per response token ``i``: the small model's state
    that predicts token ``i`` (``hidden``), its greedy prediction (``predicted``), the top-k logit
    values (``top_logits``), and the entropy, maximum probability and log normaliser of its full
    distribution."""

    hidden: Tensor  # (n, H) float32
    predicted: Tensor  # (n,) long
    top_logits: Tensor  # (n, k) float32
    entropy: Tensor  # (n,) float32
    max_prob: Tensor  # (n,) float32
    log_z: Tensor  # (n,) float32: logsumexp of the logits (top logprobs = top_logits - log_z)


class ChatLM:
    """A Hugging Face causal LM and its tokenizer."""

    def __init__(self, model: Any, tokenizer: Any, name: str = "model") -> None:
        self.model = model.eval()
        self._cache_kwarg = cache_kwarg(model)
        self.tokenizer = tokenizer
        self.name = name
        self.eos_ids = end_of_turn_ids(tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else next(iter(self.eos_ids)))

    @property
    def embedding(self) -> Tensor:
        """The input embedding table (the router's frozen token embedding)."""
        return self.model.get_input_embeddings().weight.detach()

    def prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        """Token ids of a conversation through the chat template, ready for the answer."""
        return render_context(self.tokenizer, messages)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def token_text(self, token_id: int) -> str:
        return str(self.tokenizer.decode([token_id]))

    # -- batched forwards ------------------------------------------------------------------

    def _forward(self, ids: Tensor, mask: Tensor, positions: Tensor, cache: Any,
                 hidden_states: bool) -> Any:
        with torch.inference_mode():
            return self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                              use_cache=cache is not None, output_hidden_states=hidden_states,
                              **{self._cache_kwarg: cache})

    def start(self, prompts: Sequence[Sequence[int]]) -> tuple[BatchCache, StepOutput]:
        """Read left-padded ``prompts``; return the batch cache and the last position's output."""
        from transformers import DynamicCache

        ids, mask = left_pad(prompts, self.pad_id)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        out = self._forward(ids, mask, positions, cache, hidden_states=True)
        state = BatchCache(cache, mask, positions[:, -1].clone())
        return state, StepOutput(out.hidden_states[-1][:, -1].float(), out.logits[:, -1].float())

    def step(self, state: BatchCache, next_ids: Tensor) -> StepOutput:
        """Feed one token per row (``(B,)``) and return the new last-position output."""
        state.mask = torch.cat([state.mask, torch.ones(len(next_ids), 1, dtype=torch.long)], -1)
        state.last_position = state.last_position + 1
        out = self._forward(next_ids.view(-1, 1), state.mask, state.last_position.view(-1, 1),
                            state.cache, hidden_states=True)
        return StepOutput(out.hidden_states[-1][:, -1].float(), out.logits[:, -1].float())

    def extend(self, state: BatchCache, ids: Sequence[int]) -> StepOutput:
        """Feed several tokens to a one-row batch in one forward (a model catching up)."""
        n = len(ids)
        state.mask = torch.cat([state.mask, torch.ones(1, n, dtype=torch.long)], -1)
        positions = state.last_position.view(1, 1) + torch.arange(1, n + 1).view(1, -1)
        state.last_position = positions[:, -1].clone()
        out = self._forward(torch.tensor([list(ids)], dtype=torch.long), state.mask, positions,
                            state.cache, hidden_states=True)
        return StepOutput(out.hidden_states[-1][:, -1].float(), out.logits[:, -1].float())

    def greedy(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
               stop: Callable[[list[int]], bool] | None = None) -> list[list[int]]:
        """Greedy continuations of each prompt (batched), ending before an end-of-turn token, after
        ``max_new_tokens``, or once ``stop(tokens_so_far)`` is true."""
        return greedy_batch(self.model, prompts, max_new_tokens, self.eos_ids, self.pad_id, stop)

    def position_features(self, prompts: Sequence[Sequence[int]],
                          responses: Sequence[Sequence[int]], top_k: int) -> list[PositionFeatures]:
        """Prefill ``prompt + response`` for each pair (one batched forward, no cache) and return,
        for every response token, the router inputs from the state that predicts it."""
        sequences = [list(p) + list(r) for p, r in zip(prompts, responses, strict=True)]
        ids, mask = left_pad(sequences, self.pad_id)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self._forward(ids, mask, positions, None, hidden_states=True)
        hidden = out.hidden_states[-1].float()
        logits = out.logits.float()
        width = ids.shape[1]
        result = []
        for row, response in enumerate(responses):
            n = len(response)
            # Token i of the response sits at column width - n + i; the state before it predicts it.
            cols = slice(width - n - 1, width - 1)
            row_logits = logits[row, cols]
            result.append(_features(hidden[row, cols], row_logits, top_k))
        return result


@dataclass
class BatchCache:
    """A batch's KV cache, attention mask and each row's last position id."""

    cache: Any
    mask: Tensor
    last_position: Tensor


def _features(hidden: Tensor, logits: Tensor, top_k: int) -> PositionFeatures:
    log_probs = torch.log_softmax(logits, dim=-1)
    probs = log_probs.exp()
    return PositionFeatures(
        hidden=hidden.clone(),
        predicted=logits.argmax(-1),
        top_logits=torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values,
        entropy=-(probs * log_probs).sum(-1),
        max_prob=probs.max(-1).values,
        log_z=torch.logsumexp(logits, dim=-1),
    )


def load_chat_lm(path: str | Path | None = None, name: str | None = None) -> ChatLM:
    """A ``ChatLM`` from a local Hugging Face model directory (safetensors), or the embedded
    SmolLM2-135M-Instruct when ``path`` is None (converted once into the guardrail cache)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path is None:
        from guardrail.observer.hf import SMOLLM2_NAME, smollm2_dir

        path, name = smollm2_dir(), name or SMOLLM2_NAME
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    with quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                     use_safetensors=True)
    return ChatLM(model, tokenizer, name or path.name)
