"""Every chat-message shape the OpenAI and LangChain APIs allow reads as the same conversation:
the normaliser on each shape, its errors, and a guard with a real (tiny) observer model whose
chat template, like SmolLM2's, only takes string content."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from guardrail import Guard, MessageError, Needs, Report, normalize_messages
from guardrail.testing import ScriptedMonitor, plugin_monitors, split_text

IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
AUDIO = {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}
FILE = {"type": "file", "file": {"file_id": "file-1"}}


# -- the normaliser, shape by shape -------------------------------------------------------


@pytest.mark.parametrize("message,expected", [
    ({"role": "user", "content": "plain"}, {"role": "user", "content": "plain"}),
    ({"role": "user", "content": [{"type": "text", "text": "what is this?"}, IMAGE]},
     {"role": "user", "content": "what is this?"}),
    ({"role": "user", "content": [{"type": "text", "text": "one"}, AUDIO, FILE,
                                  {"type": "text", "text": "two"}]},
     {"role": "user", "content": "one\ntwo"}),
    ({"role": "user", "content": [IMAGE]}, {"role": "user", "content": ""}),
    ({"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't."}]},
     {"role": "assistant", "content": "I can't."}),
    ({"role": "system", "content": [{"type": "text", "text": "be brief"}]},
     {"role": "system", "content": "be brief"}),
    ({"role": "developer", "content": "be brief"}, {"role": "system", "content": "be brief"}),
    ({"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function",
         "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
     {"role": "assistant", "content": 'weather({"city": "Paris"})'}),
    ({"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "a", "arguments": "{}"}},
        {"id": "c2", "type": "custom", "custom": {"name": "b", "input": "x"}}]},
     {"role": "assistant", "content": "Checking.\na({})\nb(x)"}),
    ({"role": "assistant", "content": None,
      "function_call": {"name": "weather", "arguments": "{}"}},
     {"role": "assistant", "content": "weather({})"}),
    ({"role": "assistant", "audio": {"id": "audio-1"}}, {"role": "assistant", "content": ""}),
    ({"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "18 C"}]},
     {"role": "tool", "content": "18 C"}),
    ({"role": "function", "name": "weather", "content": "18 C"},
     {"role": "tool", "content": "18 C"}),
    ({"role": "user", "name": "ann", "content": [{"type": "input_text", "text": "hi"}]},
     {"role": "user", "content": "hi"}),
    ({"type": "human", "content": "a LangChain dict"},
     {"role": "user", "content": "a LangChain dict"}),
    (("ai", "a LangChain pair"), {"role": "assistant", "content": "a LangChain pair"}),
    ("a bare LangChain string", {"role": "user", "content": "a bare LangChain string"}),
])
def test_each_openai_and_langchain_shape(message: Any, expected: dict[str, str]) -> None:
    assert normalize_messages([message]) == [expected]
    assert normalize_messages(normalize_messages([message])) == [expected]  # idempotent


def test_openai_sdk_models_are_read() -> None:
    from openai.types.chat import ChatCompletionMessage
    from openai.types.chat.chat_completion_message_function_tool_call import (
        ChatCompletionMessageFunctionToolCall,
        Function,
    )

    call = ChatCompletionMessageFunctionToolCall(
        id="c1", type="function", function=Function(name="weather", arguments="{}"))
    reply = ChatCompletionMessage(role="assistant", content=None, tool_calls=[call])
    assert normalize_messages([reply]) == [{"role": "assistant", "content": "weather({})"}]


def test_langchain_messages_are_read_without_the_core_importing_langchain() -> None:
    lc = pytest.importorskip("langchain_core.messages")
    messages = [
        lc.SystemMessage("be brief"),
        lc.HumanMessage(content=[{"type": "text", "text": "what is this?"},
                                 {"type": "image", "url": "https://example.com/a.png"}, "and"]),
        lc.AIMessage(content="", tool_calls=[{"name": "look", "args": {"q": 1}, "id": "t1"}]),
        lc.ToolMessage(content="a cat", tool_call_id="t1"),
        lc.AIMessageChunk(content=[{"type": "text", "text": "A cat."}]),
        lc.ChatMessage(role="user", content="thanks"),
        lc.RemoveMessage(id="gone"),
    ]
    assert normalize_messages(messages) == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "what is this?\nand"},
        {"role": "assistant", "content": 'look({"q": 1})'},
        {"role": "tool", "content": "a cat"},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "thanks"},
    ]


@pytest.mark.parametrize("messages,where", [
    ([{"role": "user", "content": "ok"}, {"content": "no role"}], "messages[1].role"),
    ([{"role": 3, "content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": 42}], "messages[0].content"),
    ([{"role": "user", "content": {"type": "text", "text": "x"}}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}, {"text": "b"}]}],
     "messages[0].content[1].type"),
    ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0].text"),
    ([{"role": "user", "content": [{"type": "text", "text": ["x"]}]}],
     "messages[0].content[0].text"),
    ([{"role": "user", "content": [7]}], "messages[0].content[0]"),
    ([{"role": "assistant", "tool_calls": "weather"}], "messages[0].tool_calls"),
    ([{"role": "assistant", "tool_calls": [{"type": "function", "function": {}}]}],
     "messages[0].tool_calls[0].function.name"),
    ([{"role": "user", "content": "ok"}, 7], "messages[1]"),
    ([("user", "a", "b")], "messages[0]"),
    ("just a string", "messages"),
    ({"role": "user", "content": "a dict, not a list"}, "messages"),
])
def test_bad_shapes_name_the_message_and_field(messages: Any, where: str) -> None:
    with pytest.raises(MessageError) as info:
        normalize_messages(messages)
    assert info.value.where == where and str(info.value).startswith(f"{where}: ")


def test_a_guard_refuses_bad_messages_up_front() -> None:
    guard = Guard.from_policy({"monitors": [
        {"id": "kw", "use": "keywords", "options": {"words": ["bomb"]}, "action": "halt"}]})
    with pytest.raises(MessageError, match=r"messages\[0\]\.content\[0\]\.type"):
        guard.session([{"role": "user", "content": [{"kind": "text"}]}])


# -- a guard on a real (tiny) observer model --------------------------------------------------


ANSWER = "Mix flour, water, salt and yeast; knead it for ten minutes. Mix flour and water."
TRIGGER = "knead"  # the tiny tokenizer cuts it into "kn" + "ead"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    from guardrail.testing.tiny_models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", arch="llama")


def _guard(model: Path, on_error: str) -> Guard:
    """Halts on the word "knead"; the monitor reads layer 1 of the observer, so every stream
    runs the tiny model over the conversation first."""
    monitor = ScriptedMonitor.factory({"ead": 1.0}, needs=Needs(layers=frozenset({1})))
    with plugin_monitors(scripted=monitor) as host:
        return Guard.from_policy({
            "observer": {"model": str(model), "window": 256}, "on_error": on_error,
            "monitors": [{"id": "harm", "use": "scripted", "action": "halt",
                          "message": "halted"}]}, host=host)


def _stream(guard: Guard, messages: list[Any], answer: str) -> Report:
    session = guard.session(messages)
    for piece in split_text(answer, [7, 3, 11]):
        session.feed(piece)
        if session.halted is not None:
            break
    return session.report or session.finish()


def _parts(text: str) -> list[dict[str, Any]]:
    return [{"role": "system", "content": [{"type": "text", "text": "You help with baking."}]},
            {"role": "user", "content": [{"type": "text", "text": text}, IMAGE]}]


def _strings(text: str) -> list[dict[str, Any]]:
    return [{"role": "system", "content": "You help with baking."},
            {"role": "user", "content": text}]


@pytest.fixture(params=["fail_closed", "fail_open"])
def guard(request: pytest.FixtureRequest, tiny_model: Path) -> Iterator[Guard]:
    yield _guard(tiny_model, request.param)


def test_content_parts_halt_exactly_like_string_content(guard: Guard) -> None:
    by_string = _stream(guard, _strings("How do I bake bread?"), ANSWER)
    by_parts = _stream(guard, _parts("How do I bake bread?"), ANSWER)
    assert by_string.halt is not None and by_string.errors == []
    assert by_parts.errors == []
    assert by_parts.halt is not None and by_parts.halt.at == by_string.halt.at
    assert by_parts.released_text == by_string.released_text
    assert TRIGGER not in by_parts.released_text and by_parts.released_text


def test_a_benign_content_parts_answer_streams_through(guard: Guard) -> None:
    answer = "The river flows north through the valley, past the old mill and the church."
    report = _stream(guard, _parts("Tell me about the river."), answer)
    assert report.halt is None and report.errors == []
    assert report.released_text == answer


def test_tool_call_history_and_langchain_messages_reach_the_observer(guard: Guard) -> None:
    lc = pytest.importorskip("langchain_core.messages")
    history = [lc.HumanMessage(content=[{"type": "text", "text": "Bread?"}]),
               lc.AIMessage(content="", tool_calls=[{"name": "recipe", "args": {}, "id": "1"}]),
               lc.ToolMessage(content="flour, water", tool_call_id="1"),
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "2", "type": "function",
                    "function": {"name": "oven", "arguments": "{}"}}]},
               {"role": "tool", "tool_call_id": "2", "content": [{"type": "text", "text": "on"}]}]
    report = _stream(guard, history, ANSWER)
    assert report.errors == [] and report.halt is not None
    assert TRIGGER not in report.released_text
