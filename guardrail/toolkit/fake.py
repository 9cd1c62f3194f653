"""A fake observer with a planted linear signal, for tests and worked examples (no model).

``PlantedObserver`` tokenizes words (ids from a stable hash), and its hidden state at each token is
Gaussian noise plus ``strength`` times a fixed unit direction when the word is one of
``signal_words`` (on ``signal_layer`` only); with ``prefix_strength``, every state after the
first planted word also carries a second direction (a causal "memory" that sequence heads read
from the last token, as SCM's do). A probe that recovers the direction separates those
words from the rest; a probe on another layer cannot. Logits are a fixed random projection of the
state, so top-k logits and surprisal exist too.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..monitor import Message, Needs
from ..observer import ObservedBatch
from ..stream import TokenSpan

__all__ = ["NEUTRAL_WORDS", "PLANTED_WORDS", "HashWordTokenizer", "PlantedObserver",
           "planted_records", "write_jsonl"]


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


class HashWordTokenizer:
    """Words and punctuation with the whitespace before them; id = hash of the stripped word."""

    _pattern = re.compile(r"\s*(?:\w+|[^\w\s])|\s+")

    def __init__(self, vocab_size: int = 1009) -> None:
        self.vocab_size = vocab_size

    def word(self, text: str) -> str:
        return text.strip().lower()

    def tokenize(self, text: str) -> list[TokenSpan]:
        return [TokenSpan(m.start(), m.end(), _stable_hash(self.word(m.group())) % self.vocab_size)
                for m in self._pattern.finditer(text)]


@dataclass
class _State:
    generator: torch.Generator
    seen: int = 0
    signal_seen: bool = False


class PlantedObserver:
    """A fake ``guardrail.observer.Observer``; see the module docstring."""

    def __init__(self, hidden_size: int = 16, num_layers: int = 4,
                 signal_words: Iterable[str] = ("bad",), signal_layer: int = 2,
                 strength: float = 3.0, prefix_strength: float = 0.0, vocab_size: int = 1009,
                 seed: int = 0, name: str = "planted") -> None:
        self.name = name
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.tokenizer = HashWordTokenizer(vocab_size)
        self.signal_words = {w.lower() for w in signal_words}
        self.signal_layer = signal_layer
        self.strength = strength
        self.prefix_strength = prefix_strength
        self.seed = seed
        g = torch.Generator().manual_seed(seed)
        direction = torch.randn(hidden_size, generator=g)
        self.direction = direction / direction.norm()
        prefix = torch.randn(hidden_size, generator=g)
        self.prefix_direction = prefix / prefix.norm()
        self.unembed = torch.randn(hidden_size, vocab_size, generator=g)
        self.embedding = torch.randn(vocab_size, hidden_size, generator=g)

    def start(self, messages: Sequence[Message], needs: Needs) -> _State:
        context = "\n".join(str(m.get("content", "")) for m in messages)
        return _State(torch.Generator().manual_seed(self.seed ^ (_stable_hash(context) % 2**31)))

    def _layer(self, layer: int) -> int:
        return layer % self.num_layers

    def extend(self, state: _State, tokens: Sequence[TokenSpan], needs: Needs) -> ObservedBatch:
        n = len(tokens)
        # One draw per token: the states do not depend on how the text was chunked.
        draws = [torch.randn(self.num_layers, self.hidden_size, generator=state.generator)
                 for _ in range(n)]
        noise = (torch.stack(draws, dim=1) if draws
                 else torch.zeros(self.num_layers, 0, self.hidden_size))
        words = [_stable_hash(w) for w in self.signal_words]
        vocab = self.tokenizer.vocab_size
        marked = torch.tensor([float(t.id in {h % vocab for h in words}) for t in tokens])
        states = noise.clone()
        states[self.signal_layer] += self.strength * marked[:, None] * self.direction
        # Causal memory, like a real LM's residual stream: once a planted word has been read,
        # every later state on the signal layer carries ``prefix_strength`` along another axis.
        seen = []
        for m in marked.tolist():
            state.signal_seen = state.signal_seen or m > 0
            seen.append(float(state.signal_seen))
        states[self.signal_layer] += (self.prefix_strength * torch.tensor(seen).reshape(n, 1)
                                      * self.prefix_direction)
        state.seen += n
        hidden = {layer: states[self._layer(layer)] for layer in needs.layers}
        logits: Any = None
        top: Any = None
        if needs.logits or needs.top_k:
            full = states[-1] @ self.unembed
            logits = full if needs.logits else None
            if needs.top_k:
                top = torch.topk(full, min(needs.top_k, vocab), dim=-1).values
        return ObservedBatch(hidden=hidden, logits=logits, top_logits=top)

    def truncate(self, state: _State, n_tokens: int) -> None:
        state.seen = min(state.seen, n_tokens)


NEUTRAL_WORDS: tuple[str, ...] = tuple(
    "the river city museum north quiet paper window garden story bridge old morning table".split()
)
PLANTED_WORDS: tuple[str, ...] = ("bad", "worse")


def planted_records(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Labelled records (``guardrail.toolkit.records``) of random words. Odd records contain planted
    words, each marked by a span labelled 1; every record's first word is a span labelled 0 (an
    'entity' that is fine). Response label: 1 when a planted word occurs. Records ``2j`` and
    ``2j+1`` share the prompt ``question j``."""
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    for i in range(n):
        words = [rng.choice(NEUTRAL_WORDS) for _ in range(rng.randint(10, 18))]
        harmful = i % 2 == 1
        if harmful:
            for _ in range(rng.randint(1, 3)):
                words.insert(rng.randint(1, len(words)), rng.choice(PLANTED_WORDS))
        text, pos = "", 0
        spans: list[dict[str, int]] = []
        for k, word in enumerate(words):
            piece = word if k == 0 else " " + word
            start = pos + (0 if k == 0 else 1)
            if word in PLANTED_WORDS:
                spans.append({"start": start, "end": start + len(word), "label": 1})
            elif k == 0:
                spans.append({"start": start, "end": start + len(word), "label": 0})
            text += piece
            pos += len(piece)
        out.append({"prompt": f"question {i // 2}", "response": text, "label": int(harmful),
                    "spans": spans})
    return out


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write ``rows`` as JSON Lines; return ``path``."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
