"""The context's pooled states (``Needs.context``): where the pooled span starts in the rendered
conversation, and the mean of a layer's rows over it.

The span runs from the first token of the last user message's content through the last context
token (the assistant header included): the tokens that carry what this request asks, without the
system prompt and earlier turns every request may share. A last user message of fewer than
``SHORT_TURN_TOKENS`` content tokens ("Thanks!", "Go on", "Make it meaner.") asks nothing on its
own: the span then starts at an earlier user message's content instead, the latest one from which
the user contents reach that many tokens (or the first user message), so a follow-up is read with
the request it follows (docs/harmful-content.md, "Multi-turn prompt span"). With one user message
the span is the same either way.

A user message's content is found by rendering the conversation twice with that content replaced
by two probe strings: the first token where the two renderings differ is where it starts (a merge
across the boundary moves it earlier, never later), and their common tail is what follows it.
Without a user message the probes form a conversation of one user message, and the span starts
where those two differ: after the template's shared opening (its default system message, the user
header), as the harm selection's prompt features were pooled (docs/harmful-content.md, "Eighth
pass").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ..messages import normalize_messages
from ..monitor import Message

__all__ = ["PROBES", "SHORT_TURN_TOKENS", "pool_rows", "prompt_start", "span_start"]

# Two contents whose first tokens differ in any tokenizer (a letter against another letter)
PROBES = ("alpha", "Zebra crossing")
# A last user message with fewer content tokens than this reaches back to earlier user messages
# (chosen on bench/prompt_span_dev.jsonl; docs/harmful-content.md, "Multi-turn prompt span")
SHORT_TURN_TOKENS = 8


def prompt_start(render: Callable[[Sequence[Message]], list[int]],
                 messages: Sequence[Message], length: int | None = None) -> int:
    """Index into ``render(messages)`` of the pooled span's first token (see the module
    docstring); ``render`` is the observer's rendering of a conversation into token ids and
    ``length`` the length of ``render(messages)`` where the caller has it (else a conversation
    of several user messages is rendered once more to measure them)."""
    msgs = normalize_messages(messages)
    users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
    if not users:
        a, b = (render([{"role": "user", "content": p}]) for p in PROBES)
        return _first_difference(a, b)
    if len(users) == 1:
        return _content(render, msgs, users[0])[0]
    if length is None:
        length = len(render(msgs))
    tokens = 0
    for k in reversed(users):  # the last user message, then earlier ones while still short
        start, size = _content(render, msgs, k, length)
        tokens += size
        if tokens >= SHORT_TURN_TOKENS:
            break
    return start


def _content(render: Callable[[Sequence[Message]], list[int]], msgs: list[dict[str, str]],
             k: int, length: int | None = None) -> tuple[int, int]:
    """Where message ``k``'s content starts in the rendering of ``msgs``, and, given that
    rendering's ``length``, its number of tokens (else 0): what lies between the two probe
    renderings' common head and common tail (a merge across a boundary counts in)."""
    a, b = (render([*msgs[:k], {**msgs[k], "content": p}, *msgs[k + 1:]]) for p in PROBES)
    start = _first_difference(a, b)
    if length is None:
        return start, 0
    room = min(len(a), len(b)) - start  # the common tail never reaches into the common head
    tail = next((i for i in range(room) if a[-1 - i] != b[-1 - i]), room)
    return start, max(0, length - tail - start)


def _first_difference(a: list[int], b: list[int]) -> int:
    same = min(len(a), len(b))
    return next((i for i in range(same) if a[i] != b[i]), same)


def span_start(render: Callable[[Sequence[Message]], list[int]],
               messages: Sequence[Message], length: int, cut: int = 0) -> int:
    """Where the pooled span starts in a context read of ``length`` ids: ``render(messages)``
    without its first ``cut`` (an observer's context cut to its window's budget; a generator's
    prefill reads it whole). A cut that took the span's start pools what is left of it, at least
    the last token. Observers and generators both pool from here, so their states agree."""
    start = prompt_start(render, messages, length + cut) - cut
    return min(max(0, start), max(0, length - 1))


def pool_rows(rows: Mapping[int, Any], skip: int) -> dict[int, np.ndarray]:
    """Each layer's rows ``(n, hidden)`` (torch, on any device, or numpy) averaged from row
    ``skip`` on, as float32 numpy vectors (the mean taken where the rows lie)."""
    pooled = {}
    for layer, h in rows.items():
        if hasattr(h, "detach"):  # a torch tensor: one vector comes back to the host
            pooled[layer] = h[skip:].float().mean(0).cpu().numpy()
        else:
            pooled[layer] = np.asarray(h[skip:], dtype=np.float32).mean(0)
    return pooled
