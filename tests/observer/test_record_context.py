"""A labelled record's conversation reaches the observer: ``guardrail eval`` and ``guardrail
replay`` stream a record with ``messages`` after that conversation, so a monitor gets the context
states a session opened with the same messages gets; a record with a prompt alone reads it as
one user message, as before."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from guardrail import Guard
from guardrail.testing import plugin_monitors
from guardrail.toolkit.evaluate import evaluate
from guardrail.toolkit.records import read_records, replay_record

from .test_context_states import ANSWER, POLICY, SYSTEM, ContextMonitor, _stream

TURNS = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "Who was Marie Curie?"},
    {"role": "assistant", "content": "A physicist, born in Warsaw in 1867."},
    {"role": "user", "content": "Thanks!"},
]


def _contexts(monitor: ContextMonitor) -> list[dict[int, np.ndarray]]:
    """Each stream's context states (its first update's)."""
    return [seen[0][1] for seen in monitor.streams]


def _same(a: dict[int, np.ndarray], b: dict[int, np.ndarray]) -> bool:
    return set(a) == set(b) and all(np.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_eval_and_replay_read_a_records_conversation(tiny_llama: Path, tmp_path: Path) -> None:
    data = tmp_path / "records.jsonl"
    rows: list[dict[str, Any]] = [{"messages": TURNS, "response": ANSWER, "label": 0},
                                  {"prompt": "Thanks!", "response": ANSWER, "label": 0}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    policy = {**POLICY, "observer": {"model": str(tiny_llama), "window": 256}}
    with plugin_monitors(ctx=ContextMonitor) as host:
        guard = Guard.from_policy(policy, host=host)
        monitor = guard.monitors[0][1]
        assert isinstance(monitor, ContextMonitor)
        evaluate(guard, data)
        for i, record in enumerate(read_records(data)):
            replay_record(guard, record, i)
        _stream(guard, TURNS)  # a session opened with the same messages
        _stream(guard, [{"role": "user", "content": "Thanks!"}])  # ... and with the prompt alone
    ev_turns, ev_prompt, re_turns, re_prompt, turns, prompt = _contexts(monitor)
    assert _same(ev_turns, turns) and _same(re_turns, turns)
    assert _same(ev_prompt, prompt) and _same(re_prompt, prompt)
    # the conversation is read, not only its last message: the two contexts differ
    assert not _same(turns, prompt)
