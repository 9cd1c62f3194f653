"""Token-level routed generation with two local models that share a tokenizer (R2R).

The small model proposes every token. A scorer reads the small model's step (last-layer state,
logits, proposed token); when the score reaches the threshold the large model produces that
token instead. Both KV caches stay in sync without re-reading the text: the large model keeps a
list of the tokens it has not read yet and catches up on all of them in one forward the next
time it is asked for a token; the small model reads every chosen token as it is produced.

``routed_generate_batch`` runs many prompts in lockstep (both models step every token, which is
what batching costs anyway) and gives the same tokens as ``RoutedGenerator`` one prompt at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from guardrail.monitor import Message

from .head import RouterHead
from .lm import ChatLM, StepOutput, sentence_end

__all__ = ["RoutedGenerator", "RoutedOutput", "Scorer", "entropy_scorer", "max_prob_scorer",
           "routed_generate_batch", "router_scorer"]

Scorer = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``scorer(hidden (B, H), logits (B, V), proposed (B,)) -> scores (B,)``: route when
``score >= threshold``."""


def router_scorer(head: RouterHead) -> Scorer:
    """A trained ``RouterHead``: its probability that the proposed token diverges."""
    top_k = head.top_k

    def score(hidden: Tensor, logits: Tensor, proposed: Tensor) -> Tensor:
        top = torch.topk(logits, top_k, dim=-1).values
        with torch.inference_mode():
            return head.score(hidden, proposed, top)

    return score


def entropy_scorer() -> Scorer:
    """R2R's uncertainty baseline: the entropy (nats) of the small model's distribution."""

    def score(hidden: Tensor, logits: Tensor, proposed: Tensor) -> Tensor:
        log_probs = torch.log_softmax(logits, dim=-1)
        return -(log_probs.exp() * log_probs).sum(-1)

    return score


def max_prob_scorer() -> Scorer:
    """BiLD's fallback rule as a score: ``1 - max probability``."""

    def score(hidden: Tensor, logits: Tensor, proposed: Tensor) -> Tensor:
        return 1.0 - torch.softmax(logits, dim=-1).max(-1).values

    return score


@dataclass
class RoutedOutput:
    """Generated token ids and text; ``routed[i]`` is True when the large model produced token
    ``i``; ``scores[i]`` is the scorer's value for the small model's proposal."""

    token_ids: list[int]
    text: str
    routed: list[bool] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)

    @property
    def routed_share(self) -> float:
        return sum(self.routed) / len(self.routed) if self.routed else 0.0


class RoutedGenerator:
    """Greedy routed generation for one prompt at a time (see the module docstring)."""

    def __init__(self, small: ChatLM, large: ChatLM, scorer: Scorer, threshold: float) -> None:
        self.small = small
        self.large = large
        self.scorer = scorer
        self.threshold = threshold

    def generate(self, small_messages: Sequence[Message],
                 large_messages: Sequence[Message] | None = None,
                 max_new_tokens: int = 64) -> RoutedOutput:
        """Answer ``small_messages``; the large model reads ``large_messages`` (default: the
        same conversation) as its own prompt."""
        large_prompt = self.large.prompt_ids(large_messages or small_messages)
        small_state, out = self.small.start([self.small.prompt_ids(small_messages)])
        large_state = None
        unread: list[int] = []  # chosen tokens the large model has not read yet
        result = RoutedOutput([], "")
        for _ in range(max_new_tokens):
            proposed = out.logits.argmax(-1)
            score = float(self.scorer(out.hidden, out.logits, proposed)[0])
            token = int(proposed[0])
            routed = score >= self.threshold
            if routed:
                if large_state is None:  # first route: read the prompt and the answer so far
                    large_state, large_out = self.large.start([large_prompt + unread])
                else:  # catch up on every token produced since the last route, in one forward
                    large_out = self.large.extend(large_state, unread)
                unread = []
                token = int(large_out.logits.argmax(-1)[0])
            result.routed.append(routed)
            result.scores.append(score)
            if token in self.small.eos_ids:
                break
            result.token_ids.append(token)
            unread.append(token)
            out = self.small.step(small_state, torch.tensor([token]))
        result.text = self.small.decode(result.token_ids)
        return result


def routed_generate_batch(small: ChatLM, large: ChatLM, small_prompts: Sequence[Sequence[int]],
                          large_prompts: Sequence[Sequence[int]], scorer: Scorer,
                          threshold: float, max_new_tokens: int = 64,
                          stop_at_sentence: bool = False) -> list[RoutedOutput]:
    """Routed greedy generation for a batch of prompts, both models stepping in lockstep. When
    ``small is large`` (one model, two prompts) both sides run as one batch of twice the size.
    ``stop_at_sentence`` ends each answer after its first sentence."""
    n = len(small_prompts)
    shared = small is large
    if shared:
        state, out = small.start([*small_prompts, *large_prompts])
        small_out, large_out = _rows(out, 0, n), _rows(out, n, 2 * n)
    else:
        small_state, small_out = small.start(small_prompts)
        large_state, large_out = large.start(large_prompts)
    results = [RoutedOutput([], "") for _ in small_prompts]
    done = [False] * n
    for _ in range(max_new_tokens):
        proposed = small_out.logits.argmax(-1)
        scores = scorer(small_out.hidden, small_out.logits, proposed)
        routed = scores >= threshold
        chosen = torch.where(routed, large_out.logits.argmax(-1), proposed)
        for row in range(n):
            if done[row]:
                continue
            results[row].routed.append(bool(routed[row]))
            results[row].scores.append(float(scores[row]))
            token = int(chosen[row])
            if token in small.eos_ids:
                done[row] = True
            else:
                results[row].token_ids.append(token)
                done[row] = stop_at_sentence and sentence_end(small.token_text(token))
        if all(done):
            break
        if shared:
            out = small.step(state, torch.cat([chosen, chosen]))
            small_out, large_out = _rows(out, 0, n), _rows(out, n, 2 * n)
        else:
            small_out = small.step(small_state, chosen)
            large_out = large.step(large_state, chosen)
    for r in results:
        r.text = small.decode(r.token_ids)
    return results


def _rows(out: StepOutput, start: int, stop: int) -> StepOutput:
    return StepOutput(out.hidden[start:stop], out.logits[start:stop])
