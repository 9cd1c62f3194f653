"""Decision rules: scores over time in, verdicts out.

Each rule is configured by a pydantic model (the ``rule:`` mapping of a policy monitor) and keeps
its per-stream state in a plain object that the session owns.

- ``threshold``: every token (or unit, see ``Score.span``) whose score reaches the threshold.
- ``count``: the cumulative number of tokens at or above the threshold reaches ``k`` (SCM's
  delay-k rule: a cumulative count, not a run).
- ``consecutive``: ``k`` tokens in a row at or above the threshold.
- ``span_max``: the maximum score over each unit (``Score.span``, e.g. an entity) reaches the
  threshold; decided when the unit ends.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from .monitor import Score

__all__ = [
    "ConsecutiveRule",
    "CountRule",
    "RuleSpec",
    "RuleState",
    "SpanMaxRule",
    "ThresholdRule",
    "Verdict",
]


@dataclass(frozen=True)
class Verdict:
    """A rule fired. ``tokens`` is the first and last token index of what it judged; ``span`` the
    char offsets of the unit when the monitor named one (``None``: the tokens themselves)."""

    index: int
    tokens: tuple[int, int]
    score: float
    rule: str
    span: tuple[int, int] | None = None
    label: str | None = None


@dataclass
class RuleState:
    """Per-stream state of any rule (each rule uses the fields it needs)."""

    count: int = 0
    run: int = 0
    run_start: int = 0
    fired: bool = False
    seen_spans: set[tuple[int, int]] = field(default_factory=set)
    unit: tuple[int, int] | None = None
    unit_max: float = float("-inf")
    unit_first: int = 0
    unit_last: int = 0
    unit_label: str | None = None


class _RuleBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def start(self) -> RuleState:
        return RuleState()

    def update(self, state: RuleState, scores: Iterable[Score], threshold: float) -> list[Verdict]:
        raise NotImplementedError

    def finish(self, state: RuleState, threshold: float) -> list[Verdict]:
        return []


class ThresholdRule(_RuleBase):
    """Fires for every token (or every unit once) whose score reaches the threshold."""

    kind: Literal["threshold"] = "threshold"

    def update(self, state: RuleState, scores: Iterable[Score], threshold: float) -> list[Verdict]:
        out = []
        for s in scores:
            if s.value < threshold:
                continue
            if s.span is not None:
                if s.span in state.seen_spans:
                    continue
                state.seen_spans.add(s.span)
            out.append(Verdict(s.index, (s.index, s.index), s.value, self.kind, s.span, s.label))
        return out


class CountRule(_RuleBase):
    """Fires once, when the cumulative count of tokens at or above the threshold reaches ``k``."""

    kind: Literal["count"] = "count"
    k: int = Field(default=1, ge=1, description="flagged tokens needed (cumulative)")

    def update(self, state: RuleState, scores: Iterable[Score], threshold: float) -> list[Verdict]:
        if state.fired:
            return []
        for s in scores:
            if s.value >= threshold:
                if state.count == 0:
                    state.run_start = s.index
                state.count += 1
                if state.count >= self.k:
                    state.fired = True
                    return [Verdict(s.index, (state.run_start, s.index), s.value, self.kind,
                                    s.span, s.label)]
        return []


class ConsecutiveRule(_RuleBase):
    """Fires when ``k`` tokens in a row reach the threshold (once per run)."""

    kind: Literal["consecutive"] = "consecutive"
    k: int = Field(default=2, ge=1, description="tokens in a row needed")

    def update(self, state: RuleState, scores: Iterable[Score], threshold: float) -> list[Verdict]:
        out = []
        for s in scores:
            if s.value >= threshold:
                if state.run == 0:
                    state.run_start = s.index
                state.run += 1
                if state.run == self.k:
                    out.append(Verdict(s.index, (state.run_start, s.index), s.value, self.kind,
                                       s.span, s.label))
            else:
                state.run = 0
        return out


class SpanMaxRule(_RuleBase):
    """Scores the maximum over each unit (``Score.span``); decides when the unit ends, that is when
    a score for another unit arrives or the stream finishes. Scores without a span are units of
    their own."""

    kind: Literal["span_max"] = "span_max"

    def update(self, state: RuleState, scores: Iterable[Score], threshold: float) -> list[Verdict]:
        out: list[Verdict] = []
        for s in scores:
            unit = s.span if s.span is not None else (-1 - s.index, -1 - s.index)
            if state.unit is not None and unit != state.unit:
                out.extend(self._close(state, threshold))
            if state.unit is None:
                state.unit, state.unit_first = unit, s.index
                state.unit_max, state.unit_label = float("-inf"), s.label
            if s.value > state.unit_max:
                state.unit_max = s.value
                state.unit_label = s.label or state.unit_label
            state.unit_last = s.index
        return out

    def finish(self, state: RuleState, threshold: float) -> list[Verdict]:
        return self._close(state, threshold)

    def _close(self, state: RuleState, threshold: float) -> list[Verdict]:
        unit, state.unit = state.unit, None
        if unit is None or state.unit_max < threshold:
            return []
        span = unit if unit[0] >= 0 else None
        return [Verdict(state.unit_last, (state.unit_first, state.unit_last), state.unit_max,
                        self.kind, span, state.unit_label)]


RuleSpec = Annotated[
    ThresholdRule | CountRule | ConsecutiveRule | SpanMaxRule, Field(discriminator="kind")
]
