"""Events a guard session emits: every decision is one of these.

Char offsets (``start``/``end``, ``span``) index into the response text as the upstream produced
it; token indices count the session's tokens from 0.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = [
    "CONTENT_FILTER",
    "Error",
    "Event",
    "Flag",
    "Halt",
    "Release",
    "Route",
    "event_to_dict",
    "halt_notice",
    "halt_of",
    "released_text",
]

# The OpenAI ``finish_reason`` drivers give an answer the guard halted.
CONTENT_FILTER = "content_filter"


@dataclass(frozen=True)
class Release:
    """Text the reader may now see. ``start``/``end`` are offsets into the raw response; ``text``
    is what to show (it differs from the raw slice only where a monitor redacted)."""

    text: str
    start: int
    end: int
    kind: Literal["release"] = field(default="release", init=False)


@dataclass(frozen=True)
class Flag:
    """A monitor's verdict that does not stop the stream (actions ``flag`` and ``redact``; in a
    dry-run session every verdict is a flag whose ``action`` says what it would have done)."""

    monitor: str
    score: float
    span: tuple[int, int]
    tokens: tuple[int, int]
    rule: str
    action: Literal["flag", "redact", "halt", "route"] = "flag"
    label: str | None = None
    kind: Literal["flag"] = field(default="flag", init=False)


@dataclass(frozen=True)
class Halt:
    """The stream stops here. Nothing after ``released_text`` reaches the reader.

    ``at`` is the token index where the verdict fired (``-1`` for a halt that no token caused,
    such as a monitor failure under ``fail_closed`` before any token); ``message`` is what the
    reader should be shown instead of the rest.
    """

    monitor: str
    reason: str
    at: int
    at_char: int
    message: str
    released_text: str
    retracted_tokens: int
    score: float | None = None
    kind: Literal["halt"] = field(default="halt", init=False)

    @property
    def notice(self) -> str:
        """``message`` as it follows ``released_text`` on screen: after a blank line, so it never
        runs into the last released word. Adapters that append the halt to the text show this."""
        return halt_notice(self.released_text, self.message)


def halt_notice(released_text: str, message: str) -> str:
    """``message`` set apart from ``released_text`` (nothing before it when nothing was shown)."""
    if not released_text or released_text.endswith("\n\n"):
        return message
    return ("\n" if released_text.endswith("\n") else "\n\n") + message


@dataclass(frozen=True)
class Route:
    """Hand the stream to another model from ``prefix`` on (the adapter carries it out)."""

    monitor: str
    at: int
    at_char: int
    target: dict[str, Any]
    prefix: str
    score: float
    kind: Literal["route"] = field(default="route", init=False)


@dataclass(frozen=True)
class Error:
    """A monitor failed; ``outcome`` says what the policy's ``on_error`` made of it."""

    monitor: str
    error: str
    error_type: str
    outcome: Literal["fail_open", "fail_closed"]
    kind: Literal["error"] = field(default="error", init=False)


Event = Release | Flag | Halt | Route | Error


def event_to_dict(event: Event) -> dict[str, Any]:
    """A JSON-ready dict of an event, with its ``kind`` first."""
    data = asdict(event)
    kind = data.pop("kind")
    return {"kind": kind, **data}


def released_text(events: Iterable[Event]) -> str:
    """What the reader may see now, from the events of one ``feed`` or ``finish``: the texts of
    their ``Release`` events, in order (redactions applied)."""
    return "".join(e.text for e in events if isinstance(e, Release))


def halt_of(events: Iterable[Event]) -> Halt | None:
    """The ``Halt`` among ``events``, if any (a session halts once; nothing is released after)."""
    return next((e for e in events if isinstance(e, Halt)), None)
