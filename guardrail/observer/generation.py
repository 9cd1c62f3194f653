"""Batched greedy decoding with a Hugging Face causal LM: many prompts at once, left-padded, one
KV cache. Data builders use it to collect a model's own answers (thousands of them, where one
prompt at a time would take hours on a CPU); the router's paired LM uses the same padding.

Deterministic for a given batch: greedy, no sampling. Left padding with explicit position ids
gives every row the positions it would have alone, so a row's answer does not depend on the
lengths of its neighbours beyond floating-point noise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["end_of_turn_ids", "greedy_batch", "left_pad"]


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[Any, Any]:
    """``(ids, attention_mask)`` tensors of shape ``(B, longest)``, the sequences right-aligned."""
    import torch

    if not sequences:
        raise ValueError("left_pad: no sequences")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq):] = torch.tensor(list(seq), dtype=torch.long)
            mask[row, width - len(seq):] = 1
    return ids, mask


def end_of_turn_ids(tokenizer: Any) -> set[int]:
    """Token ids that end an assistant turn: ChatML's ``<|im_end|>`` where the vocabulary has
    it, and the tokenizer's end-of-sequence token."""
    ids = set()
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end >= 0 and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    if isinstance(tokenizer.eos_token_id, int):
        ids.add(tokenizer.eos_token_id)
    return ids


def greedy_batch(model: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 eos_ids: set[int], pad_id: int,
                 stop: Callable[[list[int]], bool] | None = None) -> list[list[int]]:
    """Greedy continuations of each prompt (token ids), in one batch: a row ends before an
    ``eos_ids`` token, after ``max_new_tokens``, or once ``stop(tokens_so_far)`` is true."""
    import torch
    from transformers import DynamicCache

    from .hf import cache_kwarg

    if not prompts:
        return []
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("greedy_batch: every prompt needs at least one token")
    cache_arg = cache_kwarg(model)
    ids, mask = left_pad(prompts, pad_id)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    outputs: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                       use_cache=True, **{cache_arg: cache}).logits[:, -1]
        last = positions[:, -1]
        for _ in range(max_new_tokens):
            next_ids = logits.argmax(-1)
            for row, token in enumerate(next_ids.tolist()):
                if done[row]:
                    continue
                if token in eos_ids:
                    done[row] = True
                    continue
                outputs[row].append(int(token))
                if stop is not None and stop(outputs[row]):
                    done[row] = True
            if all(done):
                break
            mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=torch.long)], -1)
            last = last + 1
            logits = model(input_ids=next_ids.view(-1, 1), attention_mask=mask,
                           position_ids=last.view(-1, 1), use_cache=True,
                           **{cache_arg: cache}).logits[:, -1]
    return outputs
