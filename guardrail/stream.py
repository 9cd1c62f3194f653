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

    ``context`` (a generator's first step only, with ``tokens``) maps each layer to the
    conversation's pooled state, a vector ``(hidden_size,)``: what an observer hands a monitor
    that asks for ``Needs.context`` (the mean of the prompt's rows from the last user message's
    content on, or an earlier one's after a short follow-up, ``guardrail.observer.context``); the
    session passes it on as the stream's first ``Features.context``.
    """

    text: str = ""
    tokens: Sequence[StepToken] | None = None
    hidden: Mapping[int, Any] | None = None
    logits: Any = None
    logprobs: Sequence[TokenLogprob] | None = None
    finish_reason: str | None = None
    context: Mapping[int, Any] | None = None

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
        if self.context is not None:
            _check_context(self.context, self.tokens)


def _check_context(context: Any, tokens: Sequence[StepToken] | None) -> None:
    """``StreamStep.context``: layer -> one vector, on a step that carries tokens."""
    if not isinstance(context, Mapping):
        raise TypeError("StreamStep.context must be a mapping of layer -> vector, got "
                        f"{type(context).__name__}")
    if not tokens:
        raise ValueError("StreamStep.context comes with a generator's first step: the step "
                         "must carry its tokens")
    for layer, vector in context.items():
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise TypeError(f"StreamStep.context keys must be layer numbers (int), got {layer!r}")
        shape = tuple(getattr(vector, "shape", ()))
        if len(shape) != 1:
            raise ValueError(f"StreamStep.context[{layer}] must be one vector (hidden_size,), "
                             f"got shape {shape}")


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
    """Turns text deltas into final tokens, in time linear in the text.

    A token is final once the text after it cannot change how it tokenizes. With the tokenizers we
    support (a pre-tokenizer that splits before whitespace), that holds for every token that ends at
    or before the start of the last whitespace run of the pending text. Pending text with no such
    break (very long words, runs of spaces, scripts without spaces) is committed once it tokenizes
    to more than ``max_pending`` tokens, keeping ``tail`` tokens back; a word longer than
    ``max_chars`` is cut, and only its first ``max_chars`` characters are tokenized to do so.

    Work per delta is bounded: the break is found in the new text only, pending text without a
    break is re-tokenized only each time it doubles, and it never grows past ``max_chars``. So the
    characters handed to the tokenizer stay a small multiple of the text's length.
    """

    def __init__(
        self, tokenizer: Tokenizer, *, max_pending: int = 64, tail: int = 4, max_chars: int = 1024
    ) -> None:
        if max_chars < 2 * max(1, max_pending):
            raise ValueError("max_chars must be at least twice max_pending")
        self.tokenizer = tokenizer
        self.max_pending = max_pending
        self.tail = tail
        self.max_chars = max_chars
        self.text = ""
        self.committed = 0  # char offset up to which tokens are final
        self._break = 0  # offset of the last whitespace run that follows non-space text
        self._retry = 0  # pending length at which break-less pending text is tokenized again

    def append(self, delta: str) -> None:
        """Add ``delta`` to the text without tokenizing it.

        The aligner holds the only reference to its text, so CPython can grow it in place rather
        than copy it on every delta (a copy per delta is quadratic on a long stream)."""
        text = self.text
        self.text = ""
        text += delta
        self.text = text

    def feed(self, delta: str) -> list[TokenSpan]:
        """Add ``delta`` to the text; return tokens that just became final (absolute offsets)."""
        old_end = len(self.text)
        self.append(delta)
        if not delta:
            return []
        found = _last_break(self.text, max(self.committed, old_end - 1))
        if found:
            self._break = found
        out: list[TokenSpan] = []
        n_pending = len(self.text) - self.committed
        if found > self.committed or n_pending >= self._retry:
            cut = self._break - self.committed
            tokens = self.tokenizer.tokenize(self.text[self.committed :])
            final = [t for t in tokens if t.end <= cut] if cut > 0 else []
            if not final and len(tokens) > self.max_pending:
                final = tokens[: len(tokens) - self.tail]
            if final:
                out += self._commit(final)
            else:  # nothing final yet: look again once the pending text has doubled
                self._retry = 2 * n_pending
        while len(self.text) - self.committed > self.max_chars:
            piece = self._cut()
            if not piece:  # cannot happen with a tokenizer that covers its text; never spin
                break
            out += piece
        return out

    def flush(self) -> list[TokenSpan]:
        """End of stream: every remaining token is final."""
        pending = self.text[self.committed :]
        if not pending:
            return []
        return self._commit(self.tokenizer.tokenize(pending))

    def reset(self, text: str, committed: int) -> None:
        """Replace the text (a rerouted or generator-driven stream); ``committed`` is final."""
        self.text = text
        self.committed = committed
        self._break = 0
        self._retry = 0

    def _cut(self) -> list[TokenSpan]:
        """Commit the start of pending text longer than ``max_chars`` from a bounded window."""
        window = self.text[self.committed : self.committed + self.max_chars]
        tokens = self.tokenizer.tokenize(window)
        final = tokens[: len(tokens) - self.tail] if len(tokens) > self.tail else []
        if not final or final[-1].end < self.max_chars // 4:
            # A word longer than the cap: cut it and take the tokens of its first half as they are.
            final = self.tokenizer.tokenize(window[: self.max_chars // 2])
        return self._commit(final)

    def _commit(self, tokens: list[TokenSpan]) -> list[TokenSpan]:
        # A character split over several byte tokens gives zero-width spans for all but its last
        # piece: never commit such pieces without the piece that ends the character.
        while tokens and tokens[-1].end == tokens[-1].start:
            tokens = tokens[:-1]
        if not tokens:
            return []
        base = self.committed
        out = [TokenSpan(base + t.start, base + t.end, t.id) for t in tokens]
        self.committed = out[-1].end
        self._retry = 0
        return out


_BREAK = re.compile(r"\S(?=\s)")


def _last_break(text: str, begin: int) -> int:
    """Offset of the last whitespace run that follows non-space text, searched in
    ``text[begin:]`` only; 0 when there is none there."""
    found = 0
    for m in _BREAK.finditer(text, begin):
        found = m.end()
    return found
