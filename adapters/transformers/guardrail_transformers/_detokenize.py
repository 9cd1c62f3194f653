"""Incremental detokenization that never emits half a character.

Byte-level tokenizers may end a token in the middle of a multi-byte UTF-8 character, and
SentencePiece-style decoders change how a token renders depending on what precedes it. Both are
handled by decoding a short window of recent ids twice (with and without the newest ones) and
emitting only the difference, and only once it no longer ends in the replacement character.
"""

from __future__ import annotations

from typing import Any

__all__ = ["IncrementalDecoder"]

_REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    """Turns generated token ids, one at a time, into text deltas whose concatenation is the
    decoded text. A token that ends inside a character gets ``""``; the character arrives with
    the token that completes it."""

    def __init__(self, hf_tokenizer: Any) -> None:
        self.hf = hf_tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # window start: decoding from here renders like the full text
        self._read = 0  # ids before this were emitted

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes (possibly ``""``)."""
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) <= len(before) or after.endswith(_REPLACEMENT):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return after[len(before) :]

    def truncate(self, n_tokens: int) -> None:
        """Forget ids after the first ``n_tokens`` (the stream was cut back there; every kept id
        must have been emitted, which holds for the token boundaries a session cuts at)."""
        del self.ids[n_tokens:]
        self._prefix = max(0, n_tokens - 1)
        self._read = n_tokens

    def _decode(self, ids: list[int]) -> str:
        return str(self.hf.decode(ids, skip_special_tokens=True,
                                  clean_up_tokenization_spaces=False)) if ids else ""
