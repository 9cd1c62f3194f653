"""The observed model writing a slot's value: greedy decoding through its chat template."""

from __future__ import annotations

from typing import Any, Protocol

from .checks import STOP

__all__ = ["GreedyWriter", "TextWriter"]


class TextWriter(Protocol):
    """Continues an assistant answer: ``prompt`` is the user's message, ``prefix`` the answer so
    far; returns the continuation (at most ``max_new_tokens`` tokens, greedy)."""

    def __call__(self, prompt: str, prefix: str, max_new_tokens: int) -> str: ...


class GreedyWriter:
    """Greedy decoding with a Hugging Face causal LM (an observer's ``model`` and tokenizer).

    The conversation goes through the chat template as the observer renders it; the KV cache of
    the longest shared token prefix is kept between calls, so each slot only reads the text added
    since the last one. Decoding stops at the end-of-sequence token or once the continuation
    holds a value's end (punctuation or a new line)."""

    def __init__(self, model: Any, hf_tokenizer: Any) -> None:
        self.model = model.eval()
        self.tokenizer = hf_tokenizer
        self.eos = {i for i in (hf_tokenizer.eos_token_id, getattr(model.config, "eos_token_id",
                                                                   None)) if i is not None}
        self._cache: Any = None
        self._cached: list[int] = []
        from guardrail.observer.hf import cache_kwarg

        self._cache_arg = cache_kwarg(model)
        self._context: tuple[str, list[int]] | None = None

    @classmethod
    def from_observer(cls, observer: Any) -> GreedyWriter:
        return cls(observer.model, observer.hf_tokenizer)

    def _ids(self, prompt: str, prefix: str) -> list[int]:
        from guardrail.observer.model import render_context

        if self._context is None or self._context[0] != prompt:
            self._context = (prompt, render_context(self.tokenizer,
                                                    [{"role": "user", "content": prompt}]))
        body = self.tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else []
        return [*self._context[1], *body]

    def __call__(self, prompt: str, prefix: str, max_new_tokens: int) -> str:
        import torch
        from transformers import DynamicCache

        ids = self._ids(prompt, prefix)
        keep = 0
        for a, b in zip(self._cached, ids, strict=False):
            if a != b:
                break
            keep += 1
        keep = min(keep, len(ids) - 1)  # feed at least one token to get the next distribution
        if self._cache is None or keep == 0:
            self._cache, keep = DynamicCache(config=self.model.config), 0
        elif len(self._cached) > keep:  # a negative count removes that many (old and new API)
            self._cache.crop(keep - len(self._cached))
        self._cached = ids[:keep]
        feed, out_ids = ids[keep:], []
        with torch.inference_mode():
            for _ in range(max_new_tokens):
                out = self.model(input_ids=torch.tensor([feed]), use_cache=True,
                                 **{self._cache_arg: self._cache})
                self._cached += feed
                nxt = int(out.logits[0, -1].argmax())
                if nxt in self.eos:
                    break
                out_ids.append(nxt)
                text = self.tokenizer.decode(out_ids, skip_special_tokens=True)
                if _value_ended(text):
                    break
                feed = [nxt]
        return str(self.tokenizer.decode(out_ids, skip_special_tokens=True))


def _value_ended(text: str) -> bool:
    body = text.lstrip()
    return bool(body) and STOP.search(body) is not None
