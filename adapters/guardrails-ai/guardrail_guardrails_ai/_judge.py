"""Sans-I/O core of the validator: streamed chunks in, Guardrails-shaped decisions out.

Guardrails AI asks a validator about each streamed chunk and expects: nothing yet (``None``), a
pass for a piece of text (``validated_chunk``), or a fail with ``error_spans`` whose offsets are
relative to that piece. ``StreamJudge`` answers from one guard session: a piece is the text our
policy releases (so hold-back shows up as Guardrails waiting), flags inside it become error
spans, and a halt fails the text still held back. No Guardrails import, so it is tested without it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from guardrail import Event, Flag, Guard, GuardSession, Halt, Release, Report, halt_of

__all__ = ["Decision", "Span", "StreamJudge", "judge_text"]


@dataclass(frozen=True)
class Span:
    """An error span relative to the decided chunk, with the monitor's reason."""

    start: int
    end: int
    reason: str


@dataclass(frozen=True)
class Decision:
    """``wait``: nothing to release yet. ``pass``: ``chunk`` may be shown. ``fail``: ``chunk``
    holds flagged text (flags) or the text a halt retracted; ``fix_value`` is what the reader
    should see instead (the redacted text, or the halt message)."""

    kind: Literal["wait", "pass", "fail"]
    chunk: str = ""
    spans: tuple[Span, ...] = ()
    message: str = ""
    fix_value: str | None = None
    halted: bool = False


@dataclass
class StreamJudge:
    """One stream under guard; ``feed`` per chunk, ``finish`` at the end of the stream."""

    guard: Guard
    prompt: str | None = None
    session: GuardSession | None = None
    released_chars: int = 0
    flags: list[Flag] = field(default_factory=list)
    report: Report | None = None

    def _session(self) -> GuardSession:
        if self.session is None:
            self.session = self.guard.session(prompt=self.prompt)
        return self.session

    @property
    def halted(self) -> bool:
        return self.session is not None and self.session.halted is not None

    def feed(self, chunk: str) -> Decision:
        session = self._session()
        if session.closed or session.halted is not None:
            return Decision("wait")  # after a halt the rest of the stream is not shown
        return self._decide(session.feed(chunk) if chunk else [], session)

    def finish(self) -> Decision:
        """End of stream: judge the held-back tail."""
        session = self._session()
        if session.closed:
            return Decision("pass")
        if session.halted is not None:
            self.report = session.finish()
            return Decision("pass")
        self.report = session.finish()
        return self._decide(self.report.final_events, session)

    def _decide(self, events: Sequence[Event], session: GuardSession) -> Decision:
        self.flags += [e for e in events if isinstance(e, Flag)]
        halt = halt_of(events)
        releases = [e for e in events if isinstance(e, Release)]
        if halt is not None:
            return self._halted(halt, releases, session)
        if not releases:
            return Decision("wait")
        start, end = releases[0].start, releases[-1].end
        raw = session.text[start:end]
        shown = "".join(r.text for r in releases)
        self.released_chars = end
        spans = _spans(self.flags, start, end)
        if not spans:
            return Decision("pass", chunk=raw)
        reasons = "; ".join(sorted({s.reason for s in spans}))
        return Decision("fail", chunk=raw, spans=spans, message=f"flagged: {reasons}",
                        fix_value=shown)

    def _halted(self, halt: Halt, releases: Iterable[Release], session: GuardSession
                ) -> Decision:
        # Text released together with the halt went out before it; the failed chunk is the rest.
        for release in releases:
            self.released_chars = max(self.released_chars, release.end)
        start = self.released_chars
        chunk = session.text[start:]
        at = max(halt.at_char, start) - start
        spans: tuple[Span, ...] = ()
        if chunk:
            spans = (Span(at, len(chunk), f"{halt.monitor}: {halt.reason}"),)
        spans += _spans(self.flags, start, len(session.text))
        self.report = session.finish()
        # the fix follows the text already shown: the message set apart from it
        return Decision("fail", chunk=chunk, spans=spans, message=halt.message,
                        fix_value=halt.notice, halted=True)


def _spans(flags: Iterable[Flag], start: int, end: int) -> tuple[Span, ...]:
    """Flags overlapping ``[start, end)``, clipped and made relative to ``start``."""
    out = []
    for flag in flags:
        a, b = max(flag.span[0], start), min(flag.span[1], end)
        if b > a:
            label = f" ({flag.label})" if flag.label else ""
            out.append(Span(a - start, b - start,
                            f"{flag.monitor}{label}: score {flag.score:.3f} ({flag.rule} rule)"))
    return tuple(out)


def judge_text(guard: Guard, text: str, prompt: str | None = None) -> Decision:
    """A whole (non-streamed) text: pass, or fail with spans relative to ``text``."""
    judge = StreamJudge(guard, prompt)
    decision = judge.feed(text)
    if not decision.halted:
        decision = judge.finish()
    if decision.halted:  # the failed chunk is the text's tail: shift spans onto the whole text
        offset = len(text) - len(decision.chunk)
        return Decision("fail", chunk=text, spans=tuple(
            Span(s.start + offset, s.end + offset, s.reason) for s in decision.spans),
            message=decision.message, fix_value=decision.message, halted=True)
    spans = _spans(judge.flags, 0, len(text))
    if not spans:
        return Decision("pass", chunk=text)
    shown = judge.report.released_text if judge.report is not None else text
    reasons = "; ".join(sorted({s.reason for s in spans}))
    return Decision("fail", chunk=text, spans=spans, message=f"flagged: {reasons}",
                    fix_value=shown)
