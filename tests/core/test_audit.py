"""The audit sink keeps every decision, even when the process dies right after a halt."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from guardrail import Guard
from guardrail.plugins import PluginHost


def test_audit_records_decisions_not_text(tmp_path: Path, host: PluginHost) -> None:
    log = tmp_path / "audit" / "guard.jsonl"
    guard = Guard.from_policy({
        "audit": {"path": str(log)},
        "release": {"hold_back_tokens": 1},
        "monitors": [
            {"id": "years", "use": "regex", "options": {"patterns": [r"\b1[0-9]{3}\b"]}},
            {"id": "w", "use": "keywords", "action": "halt", "options": {"words": ["bomb"]}},
        ],
    }, host=host)
    session = guard.session(prompt="history", metadata={"user": "u1"})
    for word in "In 1905 someone built a bomb and then more".split():
        session.feed(word + " ")
    session.finish()
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["kind"] for r in records] == ["session_start", "flag", "halt", "session_end"]
    assert {r["session"] for r in records} == {session.id}
    assert records[1]["monitor"] == "years" and records[2]["monitor"] == "w"
    assert records[0]["metadata"] == {"user": "u1"}
    assert records[-1]["halted"] is True
    assert "released_text" not in json.dumps(records)


def test_a_process_killed_after_a_halt_loses_no_recorded_event(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    script = textwrap.dedent(f"""
        import os, sys, time
        from guardrail import Guard, Halt
        guard = Guard.from_policy({{
            "audit": {{"path": {str(log)!r}}},
            "monitors": [{{"id": "w", "use": "keywords", "action": "halt",
                           "options": {{"words": ["bomb"]}}}}]}})
        session = guard.session()
        for word in "how to build a bomb quickly".split():
            if any(isinstance(e, Halt) for e in session.feed(word + " ")):
                print("HALTED", flush=True)
                time.sleep(60)   # the client would see the halt now; we get killed instead
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "HALTED"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    kinds = [json.loads(line)["kind"] for line in log.read_text().splitlines()]
    assert kinds == ["session_start", "halt"]
