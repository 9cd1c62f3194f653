"""Judges of a mismatch: do the two continuations mean something different?

A judge is any callable ``judge(context, small_continuation, large_continuation) -> 0 | 1``.

- ``KeyTermJudge`` (the offline default): divergent when the continuations differ in a *key term*:
  a number, or a capitalised word that is not a function word (names, places, currencies). When
  neither side has a key term, divergent when their content words (lower-cased, function words
  dropped) overlap less than ``min_overlap`` (Jaccard). Word order, punctuation, case of ordinary
  words and function words never count: "Paris is the capital." and "The capital is Paris." agree.
- ``every_mismatch``: every mismatch is divergent (R2R's simple fallback).
- ``OpenAIJudge``: asks an OpenAI-compatible chat endpoint, with R2R's question, for ``0`` or ``1``
  (optional; not used in CI).
"""

from __future__ import annotations

import re
from typing import Protocol

__all__ = ["FUNCTION_WORDS", "Judge", "KeyTermJudge", "OpenAIJudge", "every_mismatch",
           "get_judge"]


class Judge(Protocol):
    def __call__(self, context: str, small: str, large: str) -> int: ...


FUNCTION_WORDS = frozenset("""
a an the this that these those it its it's is are was were be been being am do does did has have
had of in on at to for from by with as and or but nor so yet if then than there here which who whom
whose what when where why how i you he she we they me him her us them my your his our their not no
yes also very about into over under up down out off again further once all any both each few more
most other some such only own same too can will just should would could may might must shall
known called official officially located situated country city capital currency continent
""".split())

_WORD = re.compile(r"[^\W_]+(?:[.,'][^\W_]+)*", re.UNICODE)


def _key_terms(text: str) -> set[str]:
    terms = set()
    for word in _WORD.findall(text):
        if any(ch.isdigit() for ch in word):
            terms.add(word.replace(",", ""))
        elif word[0].isupper() and word.lower() not in FUNCTION_WORDS:
            terms.add(word.lower())
    return terms


def _content_words(text: str) -> set[str]:
    return {w.lower() for w in _WORD.findall(text) if w.lower() not in FUNCTION_WORDS}


class KeyTermJudge:
    """The offline rule (see the module docstring)."""

    def __init__(self, min_overlap: float = 0.5) -> None:
        self.min_overlap = min_overlap

    def __call__(self, context: str, small: str, large: str) -> int:
        small_terms, large_terms = _key_terms(small), _key_terms(large)
        if small_terms or large_terms:
            return int(small_terms != large_terms)
        a, b = _content_words(small), _content_words(large)
        if not a and not b:
            return 0
        return int(len(a & b) / len(a | b) < self.min_overlap)


def every_mismatch(context: str, small: str, large: str) -> int:
    """Every mismatch is divergent."""
    return 1


_PROMPT = (
    "Two continuations of the same text start at the point marked <<...>>. Answer 1 if the "
    "difference changes the meaning, facts, reasoning or conclusion, else 0. Answer with one "
    "digit.\n\nCommon text: {context}\n\nContinuation A: <<{small}>>\nContinuation B: <<{large}>>"
)


class OpenAIJudge:
    """R2R's LLM judge through any OpenAI-compatible ``/chat/completions`` endpoint."""

    def __init__(self, base_url: str, model: str, api_key: str = "none",
                 timeout: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key
        self.timeout = timeout

    def __call__(self, context: str, small: str, large: str) -> int:
        import httpx

        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": _PROMPT.format(
                context=context, small=small, large=large)}],
            "max_tokens": 16,
            "temperature": 0,
        }
        response = httpx.post(f"{self.base_url}/chat/completions", json=body, timeout=self.timeout,
                              headers={"Authorization": f"Bearer {self.api_key}"})
        response.raise_for_status()
        answer = response.json()["choices"][0]["message"]["content"] or ""
        digits = [ch for ch in answer if ch in "01"]
        if not digits:
            raise ValueError(f"judge {self.model!r} answered {answer!r}, expected 0 or 1")
        return int(digits[0])


def get_judge(name: str, *, base_url: str | None = None, model: str | None = None,
              api_key: str = "none") -> Judge:
    """``"key-terms"``, ``"every-mismatch"`` or ``"openai"`` (needs ``base_url`` and ``model``)."""
    if name == "key-terms":
        return KeyTermJudge()
    if name == "every-mismatch":
        return every_mismatch
    if name == "openai":
        if not base_url or not model:
            raise ValueError("the openai judge needs --judge-url and --judge-model")
        return OpenAIJudge(base_url, model, api_key)
    raise ValueError(f"unknown judge {name!r}; use key-terms, every-mismatch or openai")
