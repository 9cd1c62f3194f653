"""Exceptions raised by guardrail."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .events import Halt
    from .session import Report

__all__ = [
    "GuardrailError",
    "GuardrailViolation",
    "MonitorNotFound",
    "ObserverError",
    "PolicyError",
    "PolicyIssue",
]


class GuardrailError(Exception):
    """Base class for every error guardrail raises on purpose."""


class PolicyIssue:
    """One problem found in a policy: where it is and what is wrong."""

    __slots__ = ("line", "message", "path")

    def __init__(self, path: str, message: str, line: int | None = None) -> None:
        self.path = path
        self.message = message
        self.line = line

    def __str__(self) -> str:
        where = self.path or "<policy>"
        if self.line is not None:
            where = f"line {self.line}: {where}"
        return f"{where}: {self.message}"

    def __repr__(self) -> str:
        return f"PolicyIssue({self.path!r}, {self.message!r}, line={self.line!r})"

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "message": self.message, "line": self.line}


class PolicyError(GuardrailError):
    """A policy file or mapping is invalid. ``issues`` lists every problem found. ``data`` and
    ``lines`` (path -> line) are the parsed policy when it parsed but failed validation, so a
    caller can look for more problems (``guard.load_checked`` adds unknown monitor names)."""

    def __init__(self, issues: list[PolicyIssue], source: str | None = None, *,
                 data: Any = None, lines: dict[tuple[str | int, ...], int] | None = None
                 ) -> None:
        self.issues = issues
        self.source = source
        self.data = data
        self.lines = lines or {}
        head = f"invalid policy {source}" if source else "invalid policy"
        listing = "\n".join(f"  - {issue}" for issue in issues)
        super().__init__(f"{head}:\n{listing}")


class MonitorNotFound(GuardrailError, KeyError):
    """No installed plugin registers a monitor (or observer) of this name."""

    def __init__(self, name: str, available: list[str], kind: str = "monitor") -> None:
        self.name = name
        self.available = available
        listing = ", ".join(sorted(available)) or "none"
        super().__init__(f"unknown {kind} {name!r}; installed: {listing}")

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0])


class ObserverError(GuardrailError):
    """The hidden-state observer could not be loaded or run."""


class GuardrailViolation(GuardrailError):
    """Raised by adapters (when the policy asks for it) after a monitor halted the stream.

    ``halt`` is the halt event; ``released`` is the text the reader already received.
    """

    def __init__(self, halt: Halt, report: Report | None = None) -> None:
        self.halt = halt
        self.report = report
        self.released = halt.released_text
        super().__init__(f"stream halted by monitor {halt.monitor!r}: {halt.reason}")
