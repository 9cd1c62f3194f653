"""The context's pooled states (``Needs.context``): where the pooled span starts in the rendered
conversation, and the mean of a layer's rows over it.

The span runs from the first token of the last user message's content through the last context
token (the assistant header included): the tokens that carry what this request asks, without the
system prompt and earlier turns every request may share. Its start is found by rendering the
conversation twice with the last user message's content replaced by two probe strings: the
first token where the two renderings differ is where that content starts (a merge across the
boundary moves it earlier, never later). Without a user message the probes form a conversation of
one user message, and the span starts where those two differ: after the template's shared
opening (its default system message, the user header), as the harm selection's prompt features
were pooled (docs/harmful-content.md, "Eighth pass").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ..messages import normalize_messages
from ..monitor import Message

__all__ = ["PROBES", "pool_rows", "prompt_start", "span_start"]

# Two contents whose first tokens differ in any tokenizer (a letter against another letter)
PROBES = ("alpha", "Zebra crossing")


def prompt_start(render: Callable[[Sequence[Message]], list[int]],
                 messages: Sequence[Message]) -> int:
    """Index into ``render(messages)`` of the pooled span's first token (see the module
    docstring); ``render`` is the observer's rendering of a conversation into token ids."""
    msgs = normalize_messages(messages)
    last = next((i for i in range(len(msgs) - 1, -1, -1) if msgs[i]["role"] == "user"), None)
    if last is None:
        probes = [[{"role": "user", "content": p}] for p in PROBES]
    else:
        probes = [[*msgs[:last], {**msgs[last], "content": p}, *msgs[last + 1:]] for p in PROBES]
    a, b = (render(p) for p in probes)
    same = min(len(a), len(b))
    return next((i for i in range(same) if a[i] != b[i]), same)


def span_start(render: Callable[[Sequence[Message]], list[int]],
               messages: Sequence[Message], length: int, cut: int = 0) -> int:
    """Where the pooled span starts in a context read of ``length`` ids: ``render(messages)``
    without its first ``cut`` (an observer's context cut to its window's budget; a generator's
    prefill reads it whole). A cut that took the span's start pools what is left of it, at least
    the last token. Observers and generators both pool from here, so their states agree."""
    start = prompt_start(render, messages) - cut
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
