"""Labelled records with a conversation (``messages``): what ``read_records`` accepts, what it
refuses (naming the file, the line and the message), and what the commands do with it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from guardrail import Guard
from guardrail.toolkit.records import DataError, Record, open_session, read_records

CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "How do I store rat poison at home?"},
    {"role": "assistant", "content": "Locked, high up, in its original box."},
    {"role": "user", "content": "Thanks!"},
]


def _write(tmp_path: Path, *records: Any) -> Path:
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_a_record_with_messages_takes_its_prompt_from_the_last_user_message(
        tmp_path: Path) -> None:
    data = _write(tmp_path,
                  {"messages": CONVERSATION, "response": "You're welcome.", "label": 0,
                   "kind": "thanks"},
                  {"messages": CONVERSATION, "prompt": "Thanks!", "response": "Any time."})
    first, second = read_records(data)
    assert first.prompt == second.prompt == "Thanks!"
    assert first.messages == tuple(CONVERSATION) and first.conversation() == CONVERSATION
    assert first.extra == {"kind": "thanks"}  # the conversation is no extra field


def test_records_without_messages_read_as_before(tmp_path: Path) -> None:
    (record,) = read_records(_write(tmp_path, {"prompt": "Hi", "response": "Hello.",
                                               "label": 0}))
    assert record == Record("Hi", "Hello.", 0, (), {})
    assert record.messages is None
    assert record.conversation() == [{"role": "user", "content": "Hi"}]


def test_messages_in_any_shape_normalize_messages_reads_are_stored_plain(tmp_path: Path) -> None:
    parts = [{"role": "developer", "content": "Be brief."},
             {"role": "user", "content": [{"type": "text", "text": "Hello"}]},
             {"role": "assistant", "content": None,
              "tool_calls": [{"function": {"name": "weather", "arguments": "{}"}}]},
             {"role": "function", "content": "sunny"}]
    (record,) = read_records(_write(tmp_path, {"messages": parts, "response": "It is sunny."}))
    assert record.conversation() == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "weather({})"}, {"role": "tool", "content": "sunny"}]
    assert record.prompt == "Hello"  # the last user message, even before a tool turn


@pytest.mark.parametrize(("messages", "error"), [
    ("Hello", "field 'messages' must be a non-empty list"),
    ([], "field 'messages' must be a non-empty list"),
    ([{"role": "user", "content": "Hi"}, "Hello"],
     "messages[1] must be an object with 'role' and 'content', got \"Hello\""),
    ([{"content": "Hi"}], "messages[0].role: expected a non-empty string, got missing"),
    ([{"role": "user", "content": 3}], "messages[0].content: expected a string, a list of "
                                       "content parts or null, got int"),
    ([{"role": "narrator", "content": "Once"}],
     "messages[0].role must be one of system, user, assistant, tool, got 'narrator'"),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
     "messages[1] is an assistant message: 'messages' is the conversation before the answer"),
])
def test_bad_messages_name_the_file_the_line_and_the_message(tmp_path: Path, messages: Any,
                                                             error: str) -> None:
    data = _write(tmp_path, {"prompt": "ok", "response": "fine"},
                  {"messages": messages, "response": "An answer."})
    with pytest.raises(DataError) as caught:
        list(read_records(data))
    assert str(caught.value).startswith(f"{data}:2: ")
    assert error in str(caught.value)


def test_a_prompt_beside_messages_must_agree(tmp_path: Path) -> None:
    data = _write(tmp_path, {"messages": CONVERSATION, "prompt": "Hello", "response": "Hi."})
    with pytest.raises(DataError, match=r":1: field 'prompt' must equal the last user message's "
                                        r"content \(messages\[3\].content\) or be left out"):
        list(read_records(data))
    system_only = [{"role": "system", "content": "Be brief."}]
    with pytest.raises(DataError, match=r"\(no user message\)"):
        list(read_records(_write(tmp_path, {"messages": system_only, "prompt": "Hi",
                                            "response": "Hello."})))
    (record,) = read_records(_write(tmp_path, {"messages": system_only, "response": "Hello."}))
    assert record.prompt == ""


def test_a_session_opens_with_the_records_conversation() -> None:
    guard = Guard.from_policy({"monitors": [{"id": "k", "use": "keywords", "action": "flag",
                                             "options": {"words": ["never"]}}]})
    with_messages = Record("Thanks!", "Welcome.", messages=tuple(CONVERSATION))
    assert open_session(guard, with_messages).messages == CONVERSATION
    plain = Record("Hi", "Hello.")
    assert open_session(guard, plain).messages == [{"role": "user", "content": "Hi"}]


POLICY = """\
version: 1
monitors:
  - id: weapons
    use: keywords
    action: halt
    options: {words: [bomb]}
"""


def test_eval_and_replay_read_conversations_and_name_a_bad_line(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    data = _write(tmp_path,
                  {"messages": CONVERSATION, "response": "You're welcome.", "label": 0},
                  {"messages": CONVERSATION[:2], "response": "Build a bomb.", "label": 1})
    run = [sys.executable, "-m", "guardrail.cli"]
    out = subprocess.run([*run, "eval", "--policy", str(policy), "--data", str(data), "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["monitors"]["weapons"]["macro_f1"] == 1.0
    bad = _write(tmp_path, {"messages": [{"role": "user"}, {"role": "bot", "content": "x"}],
                            "response": "y"})
    out = subprocess.run([*run, "replay", "--policy", str(policy), "--data", str(bad)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert f"{bad}:1: messages[1].role must be one of system, user, assistant, tool, " \
           "got 'bot'" in out.stderr
