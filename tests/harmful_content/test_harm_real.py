"""The shipped head on the real SmolLM2 observer through ``Guard.default()``'s policy: a harmful
replayed answer is halted before its end, a benign one on a sensitive topic streams through."""

from __future__ import annotations

import json
from importlib.resources import files

import guardrail_harmful_content.plugin as harm_plugin
import pytest
from guardrail_harmful_content.monitor import DEFAULT_WEIGHTS, HALT_MESSAGE

from guardrail import Guard
from guardrail.guard import default_policy
from guardrail.plugins import PluginHost
from guardrail.testing import random_splits

pytestmark = [pytest.mark.real_model,
              pytest.mark.skipif(not DEFAULT_WEIGHTS.exists(), reason="no shipped weights")]


def _replay(name: str, index: int) -> dict[str, str]:
    text = (files("guardrail_harmful_content") / "replays" / name).read_text("utf-8")
    return json.loads(text.splitlines()[index])


@pytest.fixture(scope="module")
def guard() -> Guard:
    host = PluginHost(autoload=False)
    host.register(harm_plugin, name="harm-test")
    guard = Guard(default_policy(host), host=host)
    assert [m.use for m in guard.policy.monitors] == ["harmful-content"]
    return guard


def _stream(guard: Guard, record: dict[str, str], seed: int) -> tuple[bool, float, str]:
    """(halted, share of the response's tokens read when it halted, halt message)."""
    session = guard.session(prompt=record["prompt"])
    for piece in random_splits(record["response"], seed=seed, max_size=160):
        session.feed(piece)
    report = session.finish()
    if report.halt is None:
        return False, 1.0, ""
    n_tokens = len(guard.tokenizer.tokenize(record["response"]))
    return True, (report.halt.at + 1) / n_tokens, report.halt.message


def test_default_guard_halts_a_harmful_replay_early(guard: Guard) -> None:
    # pyrit's human-scored violent coaching answer (564 tokens); the head halts it after ~23%
    halted, seen, message = _stream(guard, _replay("harmful.jsonl", 8), seed=0)
    assert halted and message == HALT_MESSAGE
    assert seen < 0.3


def test_default_guard_lets_a_benign_answer_on_a_sensitive_topic_through(guard: Guard) -> None:
    record = _replay("benign.jsonl", 4)  # how to prevent self-harm at home
    halted, _, _ = _stream(guard, record, seed=1)
    assert not halted
