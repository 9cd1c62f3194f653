"""Where a sentence ends, by R2R's rule; light, for the HTTP driver."""

from __future__ import annotations

__all__ = ["sentence_end"]

_SENTENCE_END = (".", "!", "?", "\n")


def sentence_end(text: str) -> bool:
    """True when a token's text ends a sentence (R2R's rule: ``.``, ``!``, ``?`` or a newline)."""
    return any(mark in text for mark in _SENTENCE_END)
