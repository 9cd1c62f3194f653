"""Logprob entries follow the released text, so nothing the guard withholds leaks through them.

An upstream logprob entry carries its token's text (``token``, ``bytes``) and the alternatives at
that position (``top_logprobs``). ``LogprobFilter`` places each entry on the raw response by char
offsets and lets it out only once its whole token lies inside text the reader was shown verbatim:
entries for held-back text wait, and entries that touch redacted, halted or retracted text are
dropped (never rewritten: a rewritten entry would still say which alternatives were likely).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

from guardrail import Event, Flag, Release

__all__ = ["LogprobFilter"]


def _token(entry: Any) -> str | None:
    token = entry.get("token") if isinstance(entry, dict) else getattr(entry, "token", None)
    return token if isinstance(token, str) else None


class LogprobFilter:
    """One choice's logprob entries, released with the text they belong to.

    ``add(text, entries)`` as raw text is fed to the session, ``see(events)`` with the session's
    events, then ``take()`` for the entries that may go out now; ``drop()`` on a halt.
    """

    def __init__(self) -> None:
        self.fed = 0  # raw chars added so far
        self.released = 0  # raw chars the session has released (redacted or not)
        # Raw text not yet released, as (offset, piece), to compare with what a Release shows.
        self._raw: deque[tuple[int, str]] = deque()
        self._entries: deque[tuple[int, int, Any]] = deque()  # (start, end, entry), raw offsets
        self._clean: deque[tuple[int, int]] = deque()  # released verbatim, merged, in order
        self._dirty: list[tuple[int, int]] = []  # spans a redact verdict covered

    def add(self, text: str, entries: Sequence[Any] | None) -> None:
        """Raw ``text`` fed to the session with its upstream logprob ``entries``."""
        start = self.fed
        self.fed += len(text)
        if text:
            self._raw.append((start, text))
        if not entries or not text:
            return  # an entry without text of its own cannot be placed: it never goes out
        tokens = [_token(e) for e in entries]
        if all(t is not None for t in tokens) and sum(len(t or "") for t in tokens) == len(text):
            pos = start
            for entry, token in zip(entries, tokens, strict=True):
                self._entries.append((pos, pos + len(token or ""), entry))
                pos += len(token or "")
        else:  # the tokens do not spell the text: each entry stands for the whole delta
            self._entries.extend((start, self.fed, e) for e in entries)

    def see(self, events: Iterable[Event]) -> None:
        """Note the session's redactions and releases."""
        for event in events:
            if isinstance(event, Flag) and event.action == "redact":
                self._dirty.append(event.span)
            elif isinstance(event, Release):
                self._release(event)

    def _raw_slice(self, start: int, end: int) -> str:
        parts = []
        while self._raw:
            offset, piece = self._raw[0]
            if offset >= end:
                break
            parts.append(piece[max(0, start - offset):end - offset])
            if offset + len(piece) <= end:
                self._raw.popleft()
            else:
                self._raw[0] = (end, piece[end - offset:])
                break
        return "".join(parts)

    def _release(self, event: Release) -> None:
        raw = self._raw_slice(event.start, event.end)
        self.released = max(self.released, event.end)
        if event.text == raw:
            self._mark_clean(event.start, event.end)
            return
        # Redacted: only the common head and tail are shown as they were written.
        limit = min(len(raw), len(event.text))
        head = 0
        while head < limit and raw[head] == event.text[head]:
            head += 1
        tail = 0
        while tail < limit - head and raw[-1 - tail] == event.text[-1 - tail]:
            tail += 1
        self._mark_clean(event.start, event.start + head)
        self._mark_clean(event.end - tail, event.end)

    def _mark_clean(self, start: int, end: int) -> None:
        if end <= start:
            return
        if self._clean and self._clean[-1][1] == start:
            start = self._clean.pop()[0]
        self._clean.append((start, end))

    def _is_clean(self, start: int, end: int) -> bool:
        end = max(end, start + 1)  # an empty token counts as the char it stands before
        while self._clean and self._clean[0][1] < start:
            self._clean.popleft()
        inside = any(s <= start and end <= e for s, e in self._clean)
        return inside and not any(s < end and start < e for s, e in self._dirty)

    def take(self) -> list[Any]:
        """The entries whose text is now released; those not shown verbatim are dropped."""
        out = []
        while self._entries and self._entries[0][1] <= self.released:
            start, end, entry = self._entries.popleft()
            if self._is_clean(start, end):
                out.append(entry)
        if not self._entries:
            self._dirty = [span for span in self._dirty if span[1] > self.released]
        return out

    def drop(self) -> None:
        """The stream halted: nothing still waiting goes out."""
        self._entries.clear()
        self._raw.clear()
