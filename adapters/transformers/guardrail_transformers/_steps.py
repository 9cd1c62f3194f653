"""Stream steps: merging one-token steps, and holding back text that may start a stop sequence."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from guardrail.stream import StepToken, StreamStep

__all__ = ["StopFilter", "merge_steps"]


def merge_steps(steps: Sequence[StreamStep]) -> StreamStep:
    """One step carrying the tokens of ``steps`` in order, their state rows stacked (and the
    first step's pooled context states, if it carries them)."""
    if len(steps) == 1:
        return steps[0]
    tokens = [t for s in steps for t in (s.tokens or ())]
    hidden = None
    if steps[0].hidden is not None:
        hidden = {layer: torch.cat([s.hidden[layer] for s in steps if s.hidden is not None])
                  for layer in steps[0].hidden}
    logits = None
    if steps[0].logits is not None:
        logits = torch.cat([s.logits for s in steps])
    return StreamStep(text="".join(s.text for s in steps), tokens=tokens, hidden=hidden,
                      logits=logits, context=steps[0].context)


def _cut(step: StreamStep, chars: int) -> StreamStep:
    """``step`` (one token) with its text cut to ``chars`` characters (a stop starts inside)."""
    assert step.tokens is not None and len(step.tokens) == 1
    text = step.text[:chars]
    return StreamStep(text=text, tokens=[StepToken(step.tokens[0].id, text)],
                      hidden=step.hidden, logits=step.logits, context=step.context)


class StopFilter:
    """Passes one-token steps through, holding back those whose text could be the start of a
    stop sequence; once a stop sequence appears, the text before it is released and the filter
    reports the stream done. Nothing of a stop sequence reaches the reader."""

    def __init__(self, stop: str | Sequence[str] | None) -> None:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not isinstance(s, str) for s in stops):
            raise TypeError("stop must be a string or a list of strings")
        self.stops = [s for s in stops if s]
        self.pending: list[StreamStep] = []
        self.done = False

    def feed(self, step: StreamStep) -> list[StreamStep]:
        """Add a one-token step; return the steps that may go out now."""
        if not self.stops:
            return [step]
        self.pending.append(step)
        text = "".join(s.text for s in self.pending)
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.done = True
            return self._release_chars(min(found))
        held = max((n for s in self.stops for n in range(1, len(s))
                    if text.endswith(s[:n])), default=0)
        return self._release_chars(len(text) - held)

    def flush(self) -> list[StreamStep]:
        """End of generation: whatever is held can go out (no stop sequence completed)."""
        out, self.pending = self.pending, []
        return out

    def clear(self) -> None:
        """Forget held steps (the stream was cut back before them)."""
        self.pending = []

    def _release_chars(self, chars: int) -> list[StreamStep]:
        out: list[StreamStep] = []
        used = 0
        while self.pending and used + len(self.pending[0].text) <= chars:
            step = self.pending.pop(0)
            used += len(step.text)
            out.append(step)
        if self.done:
            if self.pending and chars > used:
                out.append(_cut(self.pending[0], chars - used))
            self.pending = []
        return out
