"""The monitor interface: what a plugin implements to judge a stream.

A monitor is stateless. ``start()`` returns the per-stream state, ``update()`` takes it with the
features of the tokens that just became final and returns scores. One monitor object serves
every concurrent stream of a Guard.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from .stream import TokenLogprob, TokenSpan

__all__ = [
    "Features",
    "Message",
    "Monitor",
    "MonitorContext",
    "Needs",
    "NoOptions",
    "Score",
]

Message = Mapping[str, Any]
"""A chat message, ``{"role": ..., "content": ...}`` as in the OpenAI API."""


@dataclass(frozen=True)
class Needs:
    """What a monitor reads besides text.

    ``layers``: hidden-state layers (index into the observer's decoder blocks; the state after
    block ``i``; negative counts from the end). ``logits``: the next-token distribution at each
    token (from the generator, or the observer's prediction of it). ``top_k``: how many top logit
    values to keep per token when the full logits are not needed. ``logprobs``: the upstream API's
    own logprobs when it sends them. ``context``: the conversation's pooled states for ``layers``
    (``Features.context``, on the first ``update`` of a stream): the mean of the observer's rows
    over the rendered context from the start of the last user message's content (an earlier user
    message's when the last is a short follow-up, ``guardrail.observer.context``) through the
    last context token.
    """

    layers: frozenset[int] = frozenset()
    logits: bool = False
    top_k: int = 0
    logprobs: bool = False
    context: bool = False

    @property
    def observer(self) -> bool:
        """True when the monitor needs a model's states (from an observer or the generator)."""
        return bool(self.layers) or self.logits or self.top_k > 0

    def union(self, other: Needs) -> Needs:
        return Needs(
            layers=self.layers | other.layers,
            logits=self.logits or other.logits,
            top_k=max(self.top_k, other.top_k),
            logprobs=self.logprobs or other.logprobs,
            context=self.context or other.context,
        )


@dataclass(frozen=True)
class Score:
    """A monitor's score for one token (``index``, counted from the response's first token).

    ``span`` names the unit the score judges when that is larger than the token (an entity's
    char offsets, for span-max rules); ``None`` means the token itself. ``label`` is free text
    shown in flags (``"PERSON"``, ``"weapons"``).
    """

    index: int
    value: float
    span: tuple[int, int] | None = None
    label: str | None = None


@dataclass
class Features:
    """What the session hands every monitor for a batch of newly final tokens.

    ``tokens`` are the new tokens (absolute char offsets into ``text``); ``first_index`` is the
    index of ``tokens[0]``. ``hidden`` maps each requested layer to an array of shape
    ``(len(tokens), hidden_size)``; ``logits`` is ``(len(tokens), vocab)`` or ``None``;
    ``top_logits`` is ``(len(tokens), top_k)``. All arrays are whatever the observer produces
    (numpy or torch); monitors convert as they need. ``text`` is the whole response so far.

    Rows line up with ``tokens`` one to one, but what a row holds depends on who computed it:
    an observer (``generated`` False) reads token ``i`` and gives the state after it, whose
    logits predict token ``i + 1``; a generator that feeds its own steps (``generated`` True)
    gives the step that produced token ``i``, whose logits token ``i`` was sampled from.

    ``context`` (when a monitor's ``Needs.context`` asked for it) maps each requested layer to a
    float32 numpy vector ``(hidden_size,)``: the observer's rows of that layer averaged over the
    rendered conversation from the start of the last user message's content (an earlier user
    message's when the last is a short follow-up) through the last context token (the assistant
    header included; docs/observer.md, "The context's pooled states"). It is set on the first
    ``update`` of a stream only (``None`` on every other), so a monitor reads it once and keeps
    what it needs in its state.
    """

    tokens: Sequence[TokenSpan]
    first_index: int
    text: str
    hidden: Mapping[int, Any] = field(default_factory=dict)
    logits: Any = None
    top_logits: Any = None
    logprobs: Sequence[TokenLogprob] = ()
    final: bool = False  # True on the last call of a stream
    generated: bool = False  # rows come from the generator's own steps (see above)
    context: Mapping[int, Any] | None = None  # pooled context states, first update only

    def token_text(self, i: int) -> str:
        """Text of ``tokens[i]``."""
        t = self.tokens[i]
        return self.text[t.start : t.end]

    @property
    def indices(self) -> range:
        return range(self.first_index, self.first_index + len(self.tokens))


@dataclass(frozen=True)
class MonitorContext:
    """Handed to ``Monitor.start``: what this stream is about."""

    monitor_id: str
    messages: Sequence[Message] = ()
    observer: Any = None  # the shared observer, when the policy has one
    metadata: Mapping[str, Any] = field(default_factory=dict)
    timeout_ms: float | None = None  # the policy's per-chunk budget for this monitor

    @property
    def prompt(self) -> str:
        """The last user message's text ('' when there is none)."""
        for message in reversed(self.messages):
            if message.get("role") == "user":
                content = message.get("content", "")
                return content if isinstance(content, str) else str(content)
        return ""


class NoOptions(BaseModel):
    """Options model of a monitor that takes none."""

    model_config = ConfigDict(extra="forbid")


class Monitor(ABC):
    """Base class for monitors. Subclass it and register a factory through
    ``guardrail_register_monitors``.

    Keep nothing about a stream on ``self``: put it in the object ``start()`` returns.
    ``Options`` is a pydantic model of the ``options:`` mapping a policy may give; the default
    factory validates it and passes the model to ``__init__``.
    """

    Options: ClassVar[type[BaseModel]] = NoOptions
    # The threshold when the policy gives none. A monitor that loads calibrated weights sets it
    # on the instance (``self.default_threshold = t``); the guard reads the instance.
    default_threshold: float = 0.5
    # Thresholds that depend on the policy entry's action, e.g. the router's ``{"route": 0.00224,
    # "flag": 0.305}`` (route at high recall, flag at best F1); an action not listed takes
    # ``default_threshold``. Read for every policy, the default one and a user's alike.
    default_thresholds: Mapping[str, float] = {}
    # The decision rule (a policy ``rule:`` mapping) when the policy gives none; None: the
    # threshold rule. Like ``default_threshold``, a monitor whose weights were calibrated with a
    # rule (SCM's count-k) may set it on the instance.
    default_rule: dict[str, Any] | None = None
    # The scores ``update`` gives, inclusive, when known: a policy threshold outside them could
    # never fire (or would fire on every token) and is reported as a policy error. None: any.
    score_range: ClassVar[tuple[float, float] | None] = None

    def needs(self) -> Needs:
        """What this monitor reads besides text. Default: text only."""
        return Needs()

    def start(self, context: MonitorContext) -> Any:
        """Create the per-stream state. Default: ``None``."""
        return None

    @abstractmethod
    def update(self, state: Any, features: Features) -> Sequence[Score]:
        """Score the new tokens in ``features``. Return one score per token judged (a monitor may
        skip tokens it has no opinion on). Must not block on I/O."""

    def finish(self, state: Any) -> Sequence[Score]:
        """Called once at the end of the stream, after the last ``update``."""
        return ()

    def hold_from(self, state: Any) -> int | None:
        """A char offset the session must not release text from yet (asked of redact monitors
        after each ``update``): where a match that may still be growing starts, so no prefix of
        it reaches the reader before it is redacted. ``None``: hold nothing beyond the hold-back
        window. The monitor bounds how long it holds; the stream's end releases everything."""
        return None

    def truncate(self, state: Any, n_tokens: int) -> None:
        """The response was cut back to its first ``n_tokens`` tokens (a routed stream: the
        target model rewrites the rest). Drop what the state holds about later tokens; the next
        ``update`` starts at token ``n_tokens``. Default: nothing to drop."""
        return None
