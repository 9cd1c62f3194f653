"""R2R's label pipeline: which tokens of a large model's answer would the small model get wrong
in a way that matters?

1. The large model writes each response greedily (from its own prompt).
2. The small model prefills the same response (from its own prompt); a *mismatch* is a position
   where its greedy prediction differs from the large model's token.
3. At each mismatch both continue greedily to the end of the sentence: the small model from its
   own token, the large model from its token (that is the rest of its greedy response, so it is
   read from the response instead of generated again).
4. A judge marks each mismatch divergent (1) or neutral (0). Identical tokens and neutral
   mismatches are label 0, divergent mismatches label 1.

The small model's router inputs at every position come out of step 2's forward for free.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from guardrail.monitor import Message

from ..lm import ChatLM, PositionFeatures, sentence_end
from .judges import Judge

__all__ = ["LabelItem", "LabelledResponse", "Mismatch", "label_responses", "stack_features"]


@dataclass(frozen=True)
class LabelItem:
    """One question as each side sees it (the reference may get extra context, e.g. facts)."""

    small_messages: Sequence[Message]
    large_messages: Sequence[Message]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Mismatch:
    """A response position where the small model's greedy token differs from the large one's."""

    position: int
    small_token: int
    large_token: int
    small_continuation: str
    large_continuation: str
    context: str
    label: int = 0


@dataclass
class LabelledResponse:
    """A large model's response with per-token labels and the small model's router inputs."""

    item: LabelItem
    response_ids: list[int]
    response_text: str
    token_texts: list[str]
    mismatches: list[Mismatch]
    labels: list[int]
    features: PositionFeatures | None = None

    @property
    def mismatch_positions(self) -> list[int]:
        return [m.position for m in self.mismatches]


def _cut_at_sentence(lm: ChatLM, ids: Sequence[int], limit: int) -> list[int]:
    """The prefix of ``ids`` up to and including the first token that ends a sentence."""
    out: list[int] = []
    for token in ids[:limit]:
        out.append(int(token))
        if sentence_end(lm.token_text(int(token))):
            break
    return out


def label_responses(
    small: ChatLM,
    large: ChatLM,
    items: Sequence[LabelItem],
    judge: Judge,
    *,
    max_new_tokens: int = 32,
    max_continuation: int = 12,
    top_k: int = 100,
    batch_size: int = 32,
    keep_features: bool = True,
    stop_at_sentence: bool = False,
    progress: bool = True,
) -> list[LabelledResponse]:
    """Run the pipeline over ``items`` in batches; return one ``LabelledResponse`` each, in order.

    ``max_new_tokens`` bounds the large model's responses, ``max_continuation`` the
    continuations compared at each mismatch (cut earlier at the end of the sentence);
    ``stop_at_sentence`` ends each response after its first sentence."""
    results: list[LabelledResponse] = []
    bar = tqdm(total=len(items), desc="labelling", unit="question", disable=not progress)
    for start in range(0, len(items), batch_size):
        batch = list(items[start : start + batch_size])
        results.extend(_label_batch(small, large, batch, judge, max_new_tokens, max_continuation,
                                    top_k, keep_features, stop_at_sentence))
        bar.update(len(batch))
        n_pos = sum(sum(r.labels) for r in results)
        n_tok = sum(len(r.labels) for r in results)
        bar.set_postfix(tokens=n_tok, positives=n_pos)
    bar.close()
    return results


def _label_batch(small: ChatLM, large: ChatLM, batch: list[LabelItem], judge: Judge,
                 max_new_tokens: int, max_continuation: int, top_k: int,
                 keep_features: bool, stop_at_sentence: bool) -> list[LabelledResponse]:
    large_prompts = [large.prompt_ids(item.large_messages) for item in batch]
    small_prompts = [small.prompt_ids(item.small_messages) for item in batch]
    stop = (lambda ids: sentence_end(large.token_text(ids[-1]))) if stop_at_sentence else None
    responses = large.greedy(large_prompts, max_new_tokens, stop=stop)
    features = small.position_features(small_prompts, responses, top_k)
    # Every mismatch of the batch continues in one batched greedy run of the small model.
    found: list[tuple[int, int, int]] = []  # (row, position, small token)
    for row, (response, feats) in enumerate(zip(responses, features, strict=True)):
        for pos, (predicted, actual) in enumerate(zip(feats.predicted.tolist(), response,
                                                      strict=True)):
            if predicted != actual:
                found.append((row, pos, int(predicted)))
    continuation_prompts = [small_prompts[row] + responses[row][:pos] + [token]
                            for row, pos, token in found]
    ended_after_first = [sentence_end(small.token_text(token)) or token in small.eos_ids
                         for _, _, token in found]
    tails = small.greedy(
        [p for p, ended in zip(continuation_prompts, ended_after_first, strict=True) if not ended],
        max_continuation - 1,
        stop=lambda ids: sentence_end(small.token_text(ids[-1])),
    )
    tail_iter = iter(tails)
    out = [
        LabelledResponse(item, response, small.decode(response),
                         [small.token_text(t) for t in response], [], [0] * len(response),
                         feats if keep_features else None)
        for item, response, feats in zip(batch, responses, features, strict=True)
    ]
    for (row, pos, token), ended in zip(found, ended_after_first, strict=True):
        response = responses[row]
        small_ids = [token] + ([] if ended else next(tail_iter))
        large_ids = _cut_at_sentence(large, response[pos:], max_continuation)
        mismatch = Mismatch(
            position=pos, small_token=token, large_token=response[pos],
            small_continuation=small.decode(_cut_at_sentence(small, small_ids, max_continuation)),
            large_continuation=large.decode(large_ids),
            context=large.decode(response[:pos]),
        )
        mismatch.label = int(judge(mismatch.context, mismatch.small_continuation,
                                   mismatch.large_continuation))
        out[row].mismatches.append(mismatch)
        out[row].labels[pos] = mismatch.label
    return out


def stack_features(responses: Sequence[LabelledResponse]) -> dict[str, torch.Tensor]:
    """Concatenate the kept features and labels of ``responses`` into flat tensors (one row per
    token): ``hidden``, ``predicted``, ``top_logits``, ``entropy``, ``max_prob``, ``log_z``,
    ``labels``, ``response`` (index of the response each row belongs to)."""
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in (
        "hidden", "predicted", "top_logits", "entropy", "max_prob", "log_z", "labels", "response")}
    for index, r in enumerate(responses):
        if r.features is None:
            raise ValueError(f"response {index} kept no features (label with keep_features=True)")
        f = r.features
        parts["hidden"].append(f.hidden)
        parts["predicted"].append(f.predicted)
        parts["top_logits"].append(f.top_logits)
        parts["entropy"].append(f.entropy)
        parts["max_prob"].append(f.max_prob)
        parts["log_z"].append(f.log_z)
        parts["labels"].append(torch.tensor(r.labels, dtype=torch.long))
        parts["response"].append(torch.full((len(r.labels),), index, dtype=torch.long))
    return {k: torch.cat(v) for k, v in parts.items()}
