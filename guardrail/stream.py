"""What flows into a session: stream steps, tokens, and the text-to-token aligner.

Adapters that only see text (API clients) send ``StreamStep(text=...)`` and the session tokenizes
it with the observer's tokenizer (or a word tokenizer when no observer is configured). Adapters
that own the generator send the generator's own tokens with their hidden states and logits, and no
alignment happens.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "Aligner",
    "StepToken",
    "StreamStep",
    "TokenLogprob",
    "TokenSpan",
    "Tokenizer",
    "WordTokenizer",
]


@dataclass(frozen=True)
class TokenSpan:
    """A token of the response: its id (``None`` for text-only tokenizers) and char offsets."""

    start: int
    end: int
    id: int | None = None


@dataclass(frozen=True)
class StepToken:
    """A token an adapter generated itself: its id and the text it decodes to (may be ``""`` for
    a token that ends inside a multi-byte character)."""

    id: int
    text: str


@dataclass(frozen=True)
class TokenLogprob:
    """An upstream API's logprob for one of its own tokens (OpenAI ``logprobs`` shape)."""

    token: str
    logprob: float
    top_logprobs: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class StreamStep:
    """One piece of upstream output.

    ``text`` is the new text. Adapters that own the generator also pass ``tokens`` (whose texts
    concatenate to ``text``), and may pass ``hidden`` (layer index -> array of shape
    ``(len(tokens), hidden_size)``) and ``logits`` (``(len(tokens), vocab)``, the distribution
    each token was sampled from). API adapters may pass ``logprobs``.
    """

    text: str = ""
    tokens: Sequence[StepToken] | None = None
    hidden: Mapping[int, Any] | None = None
    logits: Any = None
    logprobs: Sequence[TokenLogprob] | None = None
    finish_reason: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise TypeError(f"StreamStep.text must be str, got {type(self.text).__name__}")
        if self.tokens is not None:
            joined = "".join(t.text for t in self.tokens)
            if joined != self.text:
                raise ValueError(
                    "StreamStep.tokens must decode to StreamStep.text: "
                    f"{joined[:40]!r} != {self.text[:40]!r}"
                )


@runtime_checkable
class Tokenizer(Protocol):
    """Splits text into tokens that cover it contiguously, with char offsets."""

    def tokenize(self, text: str) -> list[TokenSpan]:
        """Tokens of ``text`` with offsets relative to ``text``; they must cover it end to end."""
        ...


class WordTokenizer:
    """The tokenizer of text-only sessions: a word or a punctuation mark with the whitespace
    before it. Stable under appending text after a whitespace, like byte-level BPE."""

    _pattern = re.compile(r"\s*(?:\w+|[^\w\s])|\s+")

    def tokenize(self, text: str) -> list[TokenSpan]:
        return [TokenSpan(m.start(), m.end()) for m in self._pattern.finditer(text)]


class Aligner:
    """Turns text deltas into final tokens.

    A token is final once the text after it cannot change how it tokenizes. With the tokenizers we
    support (a pre-tokenizer that splits before whitespace), that holds for every token that ends at
    or before the start of the last whitespace run of the pending text. Pending text with no such
    break (very long words, scripts without spaces) is committed once it exceeds ``max_pending``
    tokens, keeping ``tail`` tokens back, so memory stays bounded.
    """

    def __init__(self, tokenizer: Tokenizer, *, max_pending: int = 64, tail: int = 4) -> None:
        self.tokenizer = tokenizer
        self.max_pending = max_pending
        self.tail = tail
        self.text = ""
        self.committed = 0  # char offset up to which tokens are final

    def feed(self, delta: str) -> list[TokenSpan]:
        """Add ``delta`` to the text; return tokens that just became final (absolute offsets)."""
        self.text += delta
        pending = self.text[self.committed :]
        if not pending:
            return []
        cut = _last_break(pending)
        tokens = self.tokenizer.tokenize(pending)
        final = [t for t in tokens if t.end <= cut] if cut > 0 else []
        if not final and len(tokens) > self.max_pending:
            final = tokens[: len(tokens) - self.tail]
        return self._commit(final)

    def flush(self) -> list[TokenSpan]:
        """End of stream: every remaining token is final."""
        pending = self.text[self.committed :]
        if not pending:
            return []
        return self._commit(self.tokenizer.tokenize(pending))

    def _commit(self, tokens: list[TokenSpan]) -> list[TokenSpan]:
        if not tokens:
            return []
        base = self.committed
        out = [TokenSpan(base + t.start, base + t.end, t.id) for t in tokens]
        self.committed = out[-1].end
        return out


def _last_break(text: str) -> int:
    """Offset where the last whitespace run that follows non-space text starts, or 0."""
    i = len(text)
    # Walk back over the trailing word (if any), then over the whitespace before it.
    while i > 0 and not text[i - 1].isspace():
        i -= 1
    while i > 0 and text[i - 1].isspace():
        i -= 1
    return i
