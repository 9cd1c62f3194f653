"""The audit sink: every flag, halt, route and error as JSON Lines, opt-in per policy.

    audit: {path: /var/log/guardrail/audit.jsonl}

Each line is written and flushed to the OS inside ``guardrail_on_event``, which the session calls
before the adapter acts on the event: a halt is on disk before the reader sees it, and killing the
process afterwards loses no recorded event. Text is not recorded (no releases, no
released text, only offsets); session starts and ends are, with the end's summary.
"""

from __future__ import annotations

import atexit
import json
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from ..events import Event, Release, event_to_dict
from ..hookspecs import hookimpl

if TYPE_CHECKING:
    from ..session import GuardSession, Report

_lock = threading.Lock()
_files: dict[str, TextIO] = {}  # one append handle per audit file, shared by all sessions


@atexit.register
def _close_all() -> None:
    with _lock:
        for fh in _files.values():
            fh.close()
        _files.clear()


def _write(session: GuardSession, record: dict[str, Any]) -> None:
    audit = session.policy.audit
    if audit is None:
        return
    path = str(Path(audit.path).expanduser())
    # ASCII escapes: a lone surrogate in metadata must not make the write fail
    line = json.dumps({"time": time.time(), "session": session.id, **record})
    with _lock:
        fh = _files.get(path)
        if fh is None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            fh = _files[path] = open(path, "a", encoding="utf-8")  # noqa: SIM115
        fh.write(line + "\n")
        fh.flush()
        if audit.fsync:
            os.fsync(fh.fileno())


@hookimpl
def guardrail_session_start(session: GuardSession) -> None:
    _write(session, {"kind": "session_start", "metadata": session.metadata})


@hookimpl
def guardrail_on_event(event: Event, session: GuardSession) -> None:
    if isinstance(event, Release) or session.policy.audit is None:
        return  # cheap exit first: this runs for every flag of every stream
    record = event_to_dict(event)
    released = record.pop("released_text", None)  # decisions, not the user's text
    if released is not None:
        record["released_chars"] = len(released)
    _write(session, record)


@hookimpl
def guardrail_session_end(session: GuardSession, report: Report) -> None:
    if session.policy.audit is None:
        return
    summary = report.to_dict()
    summary.pop("released_text", None)
    for key in ("flags", "routes", "errors", "halt"):  # already recorded one by one
        summary.pop(key, None)
    _write(session, {"kind": "session_end", **summary})
