"""The ``entity-hallucination`` monitor: a token probe (``span_max`` over an entity's tokens) or a
span head (one score per entity) flags entities found in the streamed text as it grows
(``spans.find_entities``). An entity's scores are handed out only once it can no longer change,
with its char offsets, so a flag names the whole entity; a span head keeps per token only its dot
products, surprisal and entropy. States come from the shared observer or from a generator that
owns the model (one row later); a reroute that cuts the stream back re-reads from the cut.
docs/entity-hallucination.md describes both sources, reroutes and the weights it loads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from guardrail.monitor import Features, Monitor, MonitorContext, Needs, Score
from guardrail.probes.arrays import float32_rows
from guardrail.probes.io import ProbeFileError

from .logit_stats import token_stats
from .probe import DEFAULT_WEIGHTS, AnyEntityProbe, load_entity_probe, shipped_threshold
from .span_probe import STATS, EntitySpanProbe
from .spans import EntitySpan, find_entities

__all__ = ["EntityHallucinationMonitor"]


@dataclass
class _Token:
    index: int
    start: int
    end: int
    score: float | None = None  # token probe: the token's score
    dot: float | None = None  # span head: the state's dot product with the head's weights
    prev: float = 0.0  # span head: its dot product with the "prev" blocks' weights
    surprisal: float = math.nan  # span head: the token's surprisal and entropy
    entropy: float = math.nan
    extras: dict[str, float] = field(default_factory=dict)  # span head: margin, rank if read

    @property
    def ready(self) -> bool:
        return self.score is not None or self.dot is not None


@dataclass
class _State:
    text: str = ""
    pending: list[_Token] = field(default_factory=list)  # not yet resolved, in order
    emitted_until: int = 0  # char end of the last entity handed out
    next_index: int = 0
    previous_logits: np.ndarray | None = None  # observer: last row's logits
    waiting: _Token | None = None  # generator: the token whose state comes with the next step
    waiting_extras: dict[str, float] = field(default_factory=dict)
    before: _Token | None = None  # the last token resolved out of ``pending`` (a span's "prev")
    # Running sums of the known surprisal of tokens [0, i): a span's "prefix" level in O(1).
    prefix_sum: list[float] = field(default_factory=lambda: [0.0])
    prefix_count: list[int] = field(default_factory=lambda: [0])




def _token_stats(logits: np.ndarray, ids: Sequence[int],
                 names: Sequence[str] = STATS) -> dict[str, list[float]]:
    """``names`` (surprisal and entropy in nats, and the ``TOKEN_EXTRAS`` a head reads) of
    tokens ``ids`` (-1: unknown, NaN) under the distributions of the row-aligned ``logits (n,
    vocab)``: ``logit_stats.token_stats``, numpy on the max-shifted logits in one pass."""
    return token_stats(logits, ids, None, names)


class EntityHallucinationMonitor(Monitor):
    """Flags fabricated entities with a token-level linear probe or a span head (see the module
    docstring)."""

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        weights: str | None = Field(
            None, description="entity probe .safetensors (default: shipped)")
        probe_dir: str | None = Field(
            None, description="a probe in the paper's format (probe_config.json + probe_head.*); "
            "overrides weights")
        spans: Literal["heuristic", "tokens"] = Field(
            "heuristic", description="score entity tokens with the entity as unit, or every token "
            "as its own unit")
        mode: Literal["auto", "observer", "generator"] = Field(
            "auto", description="where states come from; auto: the observer when it sent top-k "
            "logits, else the generator")

    _shipped: ClassVar[float | None] = shipped_threshold()
    score_range: ClassVar[tuple[float, float] | None] = (0.0, 1.0)  # probabilities
    default_threshold: float = _shipped if _shipped is not None else 0.5
    # One verdict per entity (its highest-scoring token) unless the policy says otherwise.
    default_rule: dict[str, Any] | None = {"kind": "span_max"}
    default_spec: ClassVar[dict[str, Any]] = {"id": "facts", "threshold": default_threshold,
                                              "rule": default_rule, "action": "flag"}

    def __init__(self, options: Options | None = None) -> None:
        self.options = options or self.Options()
        try:  # a ValueError becomes a policy error that names the option
            self.probe: AnyEntityProbe = self._load()
        except ProbeFileError as exc:
            raise ValueError(str(exc)) from None
        if isinstance(self.probe, EntitySpanProbe) and self.options.spans == "tokens":
            raise ValueError("option 'spans: tokens' scores every token alone; the probe in "
                             f"{self.options.weights or DEFAULT_WEIGHTS} is a span head, which "
                             "scores whole entities (use 'spans: heuristic' or a token probe)")
        # The per-token statistics the probe reads (surprisal, entropy, margin, rank), if any.
        self._stat_names: tuple[str, ...] = (
            self._span_stats(self.probe) if isinstance(self.probe, EntitySpanProbe)
            else self.probe.features)
        # The loaded probe's own threshold (0.5 for paper probes); the guard reads the instance.
        self.default_threshold = self.probe.threshold

    @staticmethod
    def _span_stats(probe: EntitySpanProbe) -> tuple[str, ...]:
        if not probe.reads_stats:
            return ()
        needs = probe.token_needs
        if "top_entity" in needs:  # would need the tokenizer's vocabulary in both modes
            raise ValueError("this span head reads 'top_entity_first', which the monitor does "
                             "not compute")
        priors = sorted(n for n in needs if n.startswith("prior_"))
        if priors:  # the sixth pass's token priors: training features only (not shipped)
            raise ValueError(f"this span head reads token priors ({', '.join(priors)}), which "
                             "the monitor does not load")
        return STATS + tuple(n for n in ("margin", "rank") if n in needs)

    def _load(self) -> AnyEntityProbe:
        if self.options.probe_dir:
            from .paper_probe import load_paper_entity_probe

            return load_paper_entity_probe(self.options.probe_dir)
        path = Path(self.options.weights).expanduser() if self.options.weights \
            else DEFAULT_WEIGHTS
        return load_entity_probe(path)

    def needs(self) -> Needs:
        return Needs(layers=frozenset(self.probe.layers), logits=bool(self._stat_names),
                     top_k=1)

    def start(self, context: MonitorContext) -> _State:
        observer = context.observer
        if self.options.mode == "generator":
            observer = None  # states come from the generating model, not the observer
        if observer is not None and int(observer.hidden_size) != self.probe.hidden_size:
            raise ProbeFileError(
                f"entity probe reads hidden size {self.probe.hidden_size}, observer "
                f"{getattr(observer, 'name', '?')!r} has {observer.hidden_size}")
        return _State()

    # -- scoring -------------------------------------------------------------------------------

    def _generator(self, features: Features) -> bool:
        if self.options.mode != "auto":
            return self.options.mode == "generator"
        return features.top_logits is None

    def _extras(self, state: _State, features: Features, generator: bool
                ) -> dict[str, list[float]] | None:
        if not self._stat_names:
            return None
        if features.logits is None:
            raise ValueError("this entity probe reads surprisal and entropy: it needs logits")
        logits = float32_rows(features.logits)
        ids = [-1 if t.id is None else t.id for t in features.tokens]
        names = self._stat_names
        if generator:  # row i is the distribution token i was drawn from
            return _token_stats(logits, ids, names)
        # observer: row i predicts token i + 1; the last read's last row predicts this read's
        # first token (scored on its own rather than joined to the rows: a copy of them all)
        first = state.previous_logits
        state.previous_logits = logits[-1].copy()
        rest = _token_stats(logits[:-1], ids[len(ids) - len(logits) + 1:], names)
        if first is None:  # the first response token: no distribution here
            head = {k: [math.nan] * (len(ids) - len(logits) + 1) for k in names}
        else:
            head = _token_stats(first[None], ids[len(ids) - len(logits):][:1], names)
        return {k: head[k] + rest[k] for k in names}

    @staticmethod
    def _count_prefix(state: _State, tokens: list[_Token]) -> None:
        """Extend the running surprisal sums by ``tokens`` (assigned in index order)."""
        for token in tokens:
            if token.index != len(state.prefix_sum) - 1:
                continue  # already counted, or a gap (cannot happen in order)
            # the first response token counts in neither mode (the observer has no row for it)
            known = token.index > 0 and math.isfinite(token.surprisal)
            state.prefix_sum.append(state.prefix_sum[-1] + (token.surprisal if known else 0.0))
            state.prefix_count.append(state.prefix_count[-1] + int(known))

    def _score_new(self, state: _State, features: Features, tokens: list[_Token]) -> None:
        all_rows: dict[int, np.ndarray] = {}
        for layer in self.probe.layers:
            hidden = features.hidden.get(layer)
            if hidden is None:
                raise ValueError(f"the entity probe needs hidden layer {layer}; the features "
                                 f"have layers {sorted(features.hidden)}")
            all_rows[layer] = float32_rows(hidden)
        generator = self._generator(features)
        extras = self._extras(state, features, generator)
        if not generator:
            self._assign(tokens, all_rows, extras)
            self._count_prefix(state, tokens)
            return
        # Generator: row j is the state after the token before tokens[j].
        targets = ([state.waiting] if state.waiting is not None else []) + tokens[:-1]
        target_rows = {layer: (rows[len(rows) - len(targets):] if state.waiting is None
                               else rows)[: len(targets)] for layer, rows in all_rows.items()}
        target_extras = None
        if extras is not None:
            names = self._stat_names
            before = [[state.waiting_extras.get(n, math.nan)] if state.waiting is not None
                      else [] for n in names]
            target_extras = {n: b + extras[n][: len(tokens) - 1]
                             for n, b in zip(names, before, strict=True)}
            state.waiting_extras = {n: extras[n][-1] for n in names}
        if targets:
            self._assign(targets, target_rows, target_extras)
            self._count_prefix(state, targets)
        state.waiting = tokens[-1]

    def _assign(self, tokens: list[_Token], rows: dict[int, np.ndarray],
                extras: dict[str, list[float]] | None) -> None:
        """Give each token what the probe keeps of it: its score (token probe), or its state's
        dot products (the ``mean`` and ``prev`` parts) and its surprisal and entropy (span
        head)."""
        probe = self.probe
        if not isinstance(probe, EntitySpanProbe):
            for token, value in zip(tokens, probe.score_rows(rows[probe.layer], extras),
                                    strict=True):
                token.score = value
            return
        dots, prevs = probe.token_dots(rows)
        for r, (token, dot, prev) in enumerate(zip(tokens, dots, prevs, strict=True)):
            token.dot, token.prev = dot, prev
            if extras is not None:
                token.surprisal = extras["surprisal"][r]
                token.entropy = extras["entropy"][r]
                token.extras = {n: extras[n][r] for n in extras if n not in STATS}

    # -- entity resolution ---------------------------------------------------------------------

    def _resolve(self, state: _State, final: bool) -> list[Score]:
        """Hand out the scores of every pending token whose entity can no longer change."""
        if self.options.spans == "tokens":
            ready = [Score(t.index, t.score) for t in state.pending if t.score is not None]
            state.pending = [t for t in state.pending if t.score is None and not final]
            return ready
        if not state.pending:
            return []
        text = state.text
        scan_from = min(state.pending[0].start, len(text))
        while scan_from > state.emitted_until and text[scan_from - 1].isalnum():
            scan_from -= 1  # start at a word boundary
        spans = [s for s in find_entities(text, scan_from, final)
                 if s.start >= state.emitted_until]
        out: list[Score] = []
        k = 0
        tokens = state.pending
        i = 0
        while i < len(tokens):
            token = tokens[i]
            while k < len(spans) and spans[k].end <= token.start:
                k += 1
            span = spans[k] if k < len(spans) else None
            if span is None or span.start >= token.end:
                i += 1  # outside every entity: resolved, not scored
                continue
            members = []
            j = i
            while j < len(tokens) and tokens[j].start < span.end:
                members.append(tokens[j])
                j += 1
            complete = members[-1].end >= span.end
            scored = all(t.ready for t in members)
            if not final and not (span.final and complete and scored):
                break
            before = tokens[i - 1] if i > 0 else state.before
            out.extend(self._span_scores(members, span, before, self._prefix(state, members)))
            state.emitted_until = span.end
            i, k = j, k + 1
        if i > 0:
            state.before = tokens[i - 1]
        state.pending = tokens[i:]
        return out

    @staticmethod
    def _prefix(state: _State, members: list[_Token]) -> float:
        """The mean known surprisal of the tokens before the span (NaN: none)."""
        at = min(members[0].index, len(state.prefix_sum) - 1)
        n = state.prefix_count[at]
        return state.prefix_sum[at] / n if n else math.nan

    def _span_scores(self, members: list[_Token], span: EntitySpan,
                     before: _Token | None = None, prefix: float = math.nan) -> list[Score]:
        """The scores of one resolved entity's tokens: each token's own (token probe), or the
        span head's score of the entity for every token (none when no token has a state, e.g.
        the last token of a generator stream). ``before`` is the token resolved just before
        the entity's tokens, if known: a span head's ``prev`` blocks read it when it is the
        token right before the first member and has a state."""
        where = (span.start, span.end)
        probe = self.probe
        if not isinstance(probe, EntitySpanProbe):
            return [Score(t.index, t.score, where, span.kind) for t in members
                    if t.score is not None]
        known = [t for t in members if t.dot is not None]
        if not known:
            return []
        prev = before.prev if (before is not None and before.dot is not None
                               and before.index == members[0].index - 1) else None
        extras = {n: [t.extras.get(n, math.nan) for t in known]
                  for n in self._stat_names if n not in STATS}
        value = probe.score([t.dot for t in known if t.dot is not None],
                            [t.surprisal for t in known], [t.entropy for t in known], span.kind,
                            prev, extras, prefix)
        return [Score(t.index, value, where, span.kind) for t in members]

    def update(self, state: _State, features: Features) -> list[Score]:
        if features.first_index < state.next_index:  # the stream was cut back (a reroute)
            state.pending = [t for t in state.pending if t.index < features.first_index]
            state.previous_logits, state.waiting = None, None
            if state.before is not None and state.before.index >= features.first_index:
                state.before = None
            del state.prefix_sum[features.first_index + 1:]
            del state.prefix_count[features.first_index + 1:]
            cut = features.tokens[0].start if features.tokens else len(features.text)
            state.emitted_until = min(state.emitted_until, cut)  # entities after it are new
        new = [_Token(features.first_index + n, t.start, t.end)
               for n, t in enumerate(features.tokens)]
        state.next_index = features.first_index + len(new)
        if new:
            self._score_new(state, features, new)
            state.pending.extend(new)
        state.text = features.text
        return self._resolve(state, features.final)

    def finish(self, state: _State) -> list[Score]:
        return self._resolve(state, final=True)
