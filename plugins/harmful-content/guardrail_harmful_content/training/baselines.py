"""The windowed baseline: re-score fixed windows of the response the way NeMo Guardrails' streaming
output rails do (``chunk_size`` 200, ``context_size`` 50), each window read by the observer afresh.

NeMo's rolling buffer hands its rails the first ``chunk`` tokens, then keeps the last ``context``
tokens and hands them over again with the next ``chunk - context`` new ones, and flushes what is
left when the stream ends. Each window is judged like full detection judges a whole response: the
observer reads the prompt (the record's conversation, where it has one), then the window's text
from scratch, and the sequence head scores the window's last token. The stream halts at the end
of the first window judged harmful. A head with a prompt term gets the record's term
(``scoring.prompt_terms``) on every window: each window is read after the same request, so a
rail re-reading it would add the same term.

``keyword_halt`` is the simplest streaming baseline: halt at the first blocklisted word.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from guardrail.monitor import Needs
from guardrail.toolkit.features import CachedRecord

from ..head import DualHead
from ..pooling import stack_states

__all__ = ["HARM_KEYWORDS", "WindowResult", "keyword_halt", "nemo_windows", "windowed_halts"]


def nemo_windows(n_tokens: int, chunk: int = 200, context: int = 50) -> list[tuple[int, int]]:
    """``[start, end)`` token windows of a NeMo-style rolling buffer over ``n_tokens`` tokens."""
    if chunk <= context:
        raise ValueError(f"chunk ({chunk}) must exceed context ({context})")
    windows: list[tuple[int, int]] = []
    start, end = 0, min(chunk, n_tokens)
    while end > start:
        windows.append((start, end))
        if end >= n_tokens:
            break
        start = end - context
        end = min(start + chunk, n_tokens)
    return windows


WindowResult = tuple[int | None, int]
"""(token index where the stream halts or ``None``, windows scored)."""


def _window_score(observer: Any, head: DualHead, layers: Sequence[int], pooling: str,
                  messages: Sequence[Mapping[str, str]], text: str,
                  halflife: float | Sequence[float] | None = None, term: float | None = None,
                  token_norm: str = "none") -> float:
    needs = Needs(layers=frozenset(layers))
    state = observer.start(messages, needs)
    tokens = list(observer.tokenizer.tokenize(text))
    if not tokens:
        return 0.0
    batch = observer.extend(state, tokens, needs)
    hidden = stack_states(batch.hidden, layers, pooling, halflife, token_norm)[-1:]
    with torch.inference_mode():
        if term is None:
            return float(head.score(hidden)[0])
        logits = head.prefix_logits(hidden.float()).double()[0]
        return float(torch.sigmoid(logits[1] - logits[0] + term))


def windowed_halts(observer: Any, head: DualHead, layers: Sequence[int],
                   records: Sequence[CachedRecord], prefix_scores: Sequence[Sequence[float]],
                   threshold: float, *, pooling: str = "none", chunk: int = 200,
                   context: int = 50, progress: bool = True,
                   halflife: float | Sequence[float] | None = None,
                   terms: Sequence[float] | None = None,
                   token_norm: str = "none") -> list[WindowResult]:
    """Run the windowed baseline over ``records`` (cached features give the token offsets).

    The first window starts at the response's first token with nothing before it, exactly as the
    streaming read does, so its score is taken from ``prefix_scores`` instead of a second pass
    (scored with ``terms``, each record's prompt term, when the head has one; the later windows
    add the same term)."""
    out: list[WindowResult] = []
    per_record: list[float | None] = ([None] * len(records) if terms is None
                                      else list(terms))
    if len(per_record) != len(records):
        raise ValueError(f"windowed_halts: {len(per_record)} prompt terms for {len(records)} "
                         "records")
    for record, scores, term in tqdm(list(zip(records, prefix_scores, per_record, strict=True)),
                                     desc="windowed baseline", unit="rec",
                                     disable=not progress):
        offsets = record.offsets.tolist()
        halt: int | None = None
        windows = nemo_windows(len(offsets), chunk, context)
        scored = 0
        for start, end in windows:
            scored += 1
            if start == 0:
                score = scores[end - 1]
            else:
                text = record.response[offsets[start][0] : offsets[end - 1][1]]
                score = _window_score(observer, head, layers, pooling,
                                      record.conversation(), text, halflife, term,
                                      token_norm)
            if score >= threshold:
                halt = end - 1
                break
        out.append((halt, scored))
    return out


# A blocklist of the words a simple keyword filter would use for the harm areas in the data
# (weapons, drugs, cyber abuse, violence, self-harm, fraud, hate). Written by hand for the
# baseline; it is meant to show what a topic-level filter does on hard negatives.
HARM_KEYWORDS: tuple[str, ...] = (
    "bomb", "explosive", "detonat", "weapon", "gun", "ammunition", "poison", "toxic gas",
    "nerve agent", "ricin", "anthrax", "meth", "cocaine", "heroin", "fentanyl", "overdose",
    "malware", "ransomware", "keylogger", "phishing", "exploit", "hack", "ddos", "botnet",
    "steal", "launder", "counterfeit", "fraud", "scam", "kill", "murder", "stab", "shoot",
    "kidnap", "torture", "suicide", "self-harm", "cut yourself", "starve", "trafficking",
    "arson", "stalk", "dox", "slur", "inferior race",
)
_KEYWORD_RE = re.compile(r"\b(?:" + "|".join(re.escape(k) for k in HARM_KEYWORDS) + r")",
                         re.IGNORECASE)


def keyword_halt(text: str, offsets: Sequence[tuple[int, int]]) -> int | None:
    """The keyword baseline on one streamed response: the index of the token that completes the
    first blocklisted word (where a streaming keyword filter halts), or ``None``."""
    match = _KEYWORD_RE.search(text)
    if match is None:
        return None
    for i, (_, end) in enumerate(offsets):
        if end >= match.end():
            return i
    return len(offsets) - 1 if offsets else None
