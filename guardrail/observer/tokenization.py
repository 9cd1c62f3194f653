"""A Hugging Face tokenizer seen as a ``guardrail.stream.Tokenizer``: token ids with char offsets
that cover the text end to end, without special tokens or an added prefix space."""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from ..stream import TokenSpan

__all__ = ["HFTokenizer"]


@lru_cache(maxsize=1)
def _byte_of_char() -> dict[str, int]:
    """The inverse of GPT-2's ``bytes_to_unicode``: vocab character -> the byte it stands for."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


class HFTokenizer:
    """Tokenizes like the model does, with exact offsets.

    Byte-level BPE tokenizers (GPT-2, Llama 3, SmolLM2) get offsets from each token's bytes, so a
    character split over several byte tokens gives zero-width spans for all but its last piece.
    Other tokenizers use the library's offsets, made contiguous.
    """

    def __init__(self, hf_tokenizer: Any) -> None:
        self.hf = hf_tokenizer
        self._backend = hf_tokenizer.backend_tokenizer
        self._backend.no_padding()
        self._backend.no_truncation()
        self._byte_level = _is_byte_level(self._backend)
        self._token_bytes: dict[int, int] = {}  # id -> byte length (byte-level vocabularies)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        return list(self._backend.encode(text, add_special_tokens=False).ids)

    def tokenize(self, text: str) -> list[TokenSpan]:
        if not text:
            return []
        encoding = self._backend.encode(text, add_special_tokens=False)
        ids: list[int] = list(encoding.ids)
        if self._byte_level:
            return self._spans_from_bytes(text, ids)
        return _contiguous(text, ids, list(encoding.offsets))

    def _spans_from_bytes(self, text: str, ids: list[int]) -> list[TokenSpan]:
        # byte offset -> number of whole characters before it
        char_at_byte = [0] * (len(text.encode("utf-8")) + 1)
        pos = 0
        for i, ch in enumerate(text):
            n = len(ch.encode("utf-8"))
            for k in range(1, n):
                char_at_byte[pos + k] = i  # inside a character: floor to its start
            pos += n
            char_at_byte[pos] = i + 1
        spans = []
        byte_end = 0
        start = 0
        for token_id in ids:
            byte_end += self._byte_length(token_id)
            end = char_at_byte[min(byte_end, len(char_at_byte) - 1)]
            spans.append(TokenSpan(start, end, token_id))
            start = end
        return spans

    def _byte_length(self, token_id: int) -> int:
        n = self._token_bytes.get(token_id)
        if n is None:
            piece = self._backend.id_to_token(token_id) or ""
            table = _byte_of_char()
            n = sum(1 if ch in table else len(ch.encode("utf-8")) for ch in piece)
            self._token_bytes[token_id] = n
        return n


def _is_byte_level(backend: Any) -> bool:
    try:
        decoder = json.loads(backend.to_str()).get("decoder") or {}
    except (ValueError, AttributeError):
        return False
    kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders", []) or []]
    return "ByteLevel" in kinds


def _contiguous(text: str, ids: list[int], offsets: list[tuple[int, int]]) -> list[TokenSpan]:
    """Library offsets can overlap (byte pieces) or skip whitespace (trimmed offsets): each token
    ends where the library says (never before the previous one) and starts where the last ended."""
    spans = []
    start = 0
    for i, (token_id, (_, end)) in enumerate(zip(ids, offsets, strict=True)):
        end = len(text) if i == len(ids) - 1 else max(start, min(end, len(text)))
        spans.append(TokenSpan(start, end, token_id))
        start = end
    return spans
