"""Hidden-state observers: a model that reads the stream once and shares its states.

This module defines the interface only and imports no heavy dependency. Implementations live in
submodules (``guardrail.observer.hf`` needs the ``observer`` extra: torch and transformers).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ..monitor import Message, Needs
from ..stream import Tokenizer, TokenSpan

__all__ = ["ObservedBatch", "Observer"]


@dataclass
class ObservedBatch:
    """What one observer forward produced for a batch of new tokens.

    ``hidden`` maps each requested layer to an array ``(n_tokens, hidden_size)``; ``logits`` is
    ``(n_tokens, vocab)`` when requested; ``top_logits`` ``(n_tokens, top_k)`` when requested.
    Row ``i`` belongs to the i-th new token; its logits predict the token after it.
    ``context`` maps each requested layer to the context's pooled state (a float32 numpy vector)
    when the stream started with ``needs.context``; it comes with the first batch a stream's
    observer returns and is ``None`` on every later one.
    """

    hidden: Mapping[int, Any] = field(default_factory=dict)
    logits: Any = None
    top_logits: Any = None
    context: Mapping[int, Any] | None = None


@runtime_checkable
class Observer(Protocol):
    """A hidden-state source. The observer object is shared by all streams; ``start`` returns the
    per-stream state (KV cache, position) that ``extend`` advances."""

    name: str
    tokenizer: Tokenizer
    num_layers: int
    hidden_size: int

    def start(self, messages: Sequence[Message], needs: Needs) -> Any:
        """Read the conversation (through the chat template) as context; return stream state.
        With ``needs.context``, also pool the context's states (handed over in the first
        ``ObservedBatch`` of the stream)."""
        ...

    def extend(self, state: Any, tokens: Sequence[TokenSpan], needs: Needs) -> ObservedBatch:
        """One forward over ``tokens`` (ids set by ``tokenizer``) with the cached context."""
        ...

    def truncate(self, state: Any, n_tokens: int) -> None:
        """Forget response tokens after the first ``n_tokens`` (a routed stream continues)."""
        ...
