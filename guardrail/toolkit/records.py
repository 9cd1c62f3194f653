"""Labelled stream data (JSON Lines) and replaying it through a guard.

One record a line (docs/quickstart.md, "Measure a policy on labelled data")::

    {"prompt": str, "response": str, "label": 0|1 (optional),
     "spans": [{"start": int, "end": int, "label": 0|1}] (optional, char offsets into response),
     "messages": [{"role": str, "content": str}] (optional: the conversation before the answer)}

A record with ``messages`` opens its session with that conversation (``guard.session(messages)``)
and its ``prompt`` is the last user message's content (given, it must agree); a record without
one opens it with ``prompt=`` as a single user message, as before.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import GuardrailError
from ..events import Flag, Route, event_to_dict
from ..guard import Guard
from ..messages import MessageError, normalize_messages
from ..session import GuardSession, Report

__all__ = ["MESSAGE_ROLES", "DataError", "Record", "SpanLabel", "check_messages", "conversation_of",
           "open_session", "random_splits", "read_records", "replay_record", "replay_summary"]

# The roles a record's conversation may hold (after normalize_messages' aliases: developer is
# system, function is tool): other role strings would reach a chat template that may not know them
MESSAGE_ROLES = ("system", "user", "assistant", "tool")


def random_splits(text: str, seed: int = 0, max_size: int = 12) -> list[str]:
    """Cut ``text`` into random deltas (1..max_size chars), reproducibly: how replays and
    evaluations feed a record's response, as a live stream would."""
    rng = random.Random(seed)
    out, pos = [], 0
    while pos < len(text):
        size = rng.randint(1, max_size)
        out.append(text[pos:pos + size])
        pos += size
    return out


@dataclass(frozen=True)
class SpanLabel:
    start: int
    end: int
    label: int


@dataclass(frozen=True)
class Record:
    prompt: str
    response: str
    label: int | None = None
    spans: tuple[SpanLabel, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)
    # the conversation before the answer (normalised); None: the prompt as one user message
    messages: tuple[dict[str, str], ...] | None = None

    def conversation(self) -> list[dict[str, str]]:
        """What an observer reads before the response (``conversation_of``)."""
        return conversation_of(self.prompt, self.messages)


def conversation_of(prompt: str, messages: Sequence[Mapping[str, str]] | None
                    ) -> list[dict[str, str]]:
    """What an observer reads before a record's response: its ``messages``, else its prompt as
    one user message (a fresh list, the caller's to change)."""
    if messages is not None:
        return [dict(m) for m in messages]
    return [{"role": "user", "content": prompt}]


class DataError(GuardrailError):
    """A data file has a bad line; the message names the file and line."""


def _bad(path: Path, line: int, message: str) -> DataError:
    return DataError(f"{path}:{line}: {message}")


def read_records(path: str | Path) -> Iterator[Record]:
    """Records of a JSON Lines file, validated; blank lines are skipped."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    with path.open(encoding="utf-8") as fh:
        for n, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                data = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise _bad(path, n, f"not JSON: {exc.msg}") from None
            if not isinstance(data, dict):
                raise _bad(path, n, "a record is a JSON object")
            prompt, response = data.get("prompt", ""), data.get("response")
            if not isinstance(response, str):
                raise _bad(path, n, "field 'response' must be a string")
            if not isinstance(prompt, str):
                raise _bad(path, n, "field 'prompt' must be a string")
            messages = None
            if "messages" in data:
                messages = check_messages(path, n, data["messages"])
                prompt = _prompt_of(path, n, messages, data.get("prompt"))
            label = data.get("label")
            if label is not None and label not in (0, 1):
                raise _bad(path, n, f"field 'label' must be 0 or 1, got {label!r}")
            spans = []
            for k, span in enumerate(data.get("spans") or []):
                try:
                    s = SpanLabel(int(span["start"]), int(span["end"]), int(span["label"]))
                except (KeyError, TypeError, ValueError):
                    raise _bad(path, n, f"spans[{k}] needs integer start, end, label") from None
                if not 0 <= s.start <= s.end <= len(response) or s.label not in (0, 1):
                    raise _bad(path, n, f"spans[{k}] is outside the response or has a bad label")
                spans.append(s)
            extra = {k: v for k, v in data.items() if k not in {"prompt", "response", "label",
                                                                 "spans", "messages"}}
            yield Record(prompt, response, label, tuple(spans), extra, messages)


def check_messages(path: Path, line: int, value: Any, roles: tuple[str, ...] = MESSAGE_ROLES
                   ) -> tuple[dict[str, str], ...]:
    """A record's ``messages``, normalised and checked: a non-empty list of chat messages with
    the ``roles`` (default ``MESSAGE_ROLES``), not ending in an assistant message (the answer is
    the record's ``response``); a ``DataError`` names ``path``, ``line`` and the message. Other
    line formats that carry a conversation (the harm trainer's writers' files) check it here."""
    if not isinstance(value, list) or not value:
        raise _bad(path, line, "field 'messages' must be a non-empty list of "
                               '{"role", "content"} objects (leave it out for a prompt alone)')
    for i, message in enumerate(value):
        if not isinstance(message, dict):  # normalize_messages also reads strings and pairs
            raise _bad(path, line, f"messages[{i}] must be an object with 'role' and 'content', "
                                   f"got {json.dumps(message)[:60]}")
    try:
        messages = normalize_messages(value)
    except MessageError as exc:
        raise _bad(path, line, str(exc)) from None
    for i, message in enumerate(messages):
        if message["role"] not in roles:
            raise _bad(path, line, f"messages[{i}].role must be one of {', '.join(roles)}, got "
                                   f"{message['role']!r}")
    if messages[-1]["role"] == "assistant":
        raise _bad(path, line, f"messages[{len(messages) - 1}] is an assistant message: "
                               "'messages' is the conversation before the answer, the answer is "
                               "'response'")
    return tuple(messages)


def _prompt_of(path: Path, line: int, messages: tuple[dict[str, str], ...], given: Any) -> str:
    """The prompt of a record with ``messages``: the last user message's content ("" without
    one); a ``prompt`` given beside it must be that text."""
    last = next((i for i in range(len(messages) - 1, -1, -1)
                 if messages[i]["role"] == "user"), None)
    prompt = messages[last]["content"] if last is not None else ""
    if given is not None and given != prompt:
        where = f"messages[{last}].content" if last is not None else "no user message"
        raise _bad(path, line, f"field 'prompt' must equal the last user message's content "
                               f"({where}) or be left out, got {given[:60]!r}")
    return prompt


def open_session(guard: Guard, record: Record, **options: Any) -> GuardSession:
    """The session a record streams through: opened with its conversation when it has one,
    else with its prompt as before (``options`` go to ``guard.session``)."""
    if record.messages is not None:
        return guard.session(record.conversation(), **options)
    return guard.session(prompt=record.prompt, **options)


def stream_record(guard: Guard, record: Record, seed: int, *,
                  record_scores: bool = False) -> tuple[Report, GuardSession]:
    """Feed a record's response through a session in random-sized deltas (reproducible)."""
    session = open_session(guard, record, record_scores=record_scores)
    for delta in random_splits(record.response, seed=seed):
        session.feed(delta)
        if session.halted is not None:
            break
    return session.finish(), session


def leaked_tokens(record: Record, report: Report, offsets: list[tuple[int, int]]) -> int:
    """Harmful tokens the reader saw: released tokens inside positive spans (a harmful record
    without spans counts every released token); for other records, tokens released at or after
    the halt."""
    released = offsets[: report.released_tokens]
    positive = [s for s in record.spans if s.label == 1]
    if positive:
        return sum(1 for a, b in released if any(a < s.end and b > s.start for s in positive))
    if record.label == 1:
        return len(released)
    return report.leaked_tokens


def replay_record(guard: Guard, record: Record, index: int, *,
                  on_stream: Callable[[int, Record, Report, list[tuple[int, int]]], None]
                  | None = None) -> dict[str, Any]:
    """The JSON line ``guardrail replay`` prints for one record (``on_stream`` also sees the
    report, with scores, and the token offsets: ``--report`` renders them)."""
    report, session = stream_record(guard, record, seed=index,
                                    record_scores=on_stream is not None)
    if on_stream is not None:
        on_stream(index, record, report, session.token_offsets())
    flags = [event_to_dict(f) for f in report.flags if isinstance(f, Flag)]
    routes = [event_to_dict(r) for r in report.routes if isinstance(r, Route)]
    return {
        "index": index,
        "tokens": report.tokens,
        "released_tokens": report.released_tokens,
        "halted": report.halted,
        "halt_token": report.halt.at if report.halt else None,
        "halt_monitor": report.halt.monitor if report.halt else None,
        "flags": flags,
        "routes": routes,
        "errors": [event_to_dict(e) for e in report.errors],
        "leaked_tokens": leaked_tokens(record, report, session.token_offsets()),
        "released_chars": len(report.released_text),
        "label": record.label,
    }


def replay_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts over replayed records (for the CLI's closing line)."""
    return {
        "records": len(rows),
        "halted": sum(r["halted"] for r in rows),
        "flagged": sum(bool(r["flags"]) for r in rows),
        "routed": sum(bool(r["routes"]) for r in rows),
        "errors": sum(bool(r["errors"]) for r in rows),
    }
