"""The proxy over loopback with a real (tiny) observer model: a request whose messages use
content parts (text + image) or carry tool calls is guarded exactly like the same request with
string content, under fail_closed and fail_open; the upstream still gets the request as sent; a
message the guard cannot read is a 400 naming it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("torch")

from guardrail_server import RunningServer, create_app, running

from guardrail import Guard, Needs
from guardrail.testing import ScriptedMonitor, plugin_monitors
from guardrail.testing.tiny_models import build_tiny_model
from guardrail.testing.upstream import Script, UpstreamServer

HARMFUL = "Mix flour, water, salt and yeast; knead it for ten minutes. Mix flour and water."
BENIGN = "The river flows north through the valley, past the old mill and the church."
HALTED = "Sorry, I can't continue with that."
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", arch="llama")


@pytest.fixture(params=["fail_closed", "fail_open"])
def proxy(request: pytest.FixtureRequest, tiny_model: Path,
          upstream_server: UpstreamServer) -> Iterator[RunningServer]:
    """Halts on "knead" (the tiny tokenizer's "ead" token); the monitor reads the observer's
    layer 1, so every request runs the tiny model over the conversation first."""
    monitor = ScriptedMonitor.factory({"ead": 1.0}, needs=Needs(layers=frozenset({1})))
    with plugin_monitors(scripted=monitor) as host:
        guard = Guard.from_policy({
            "observer": {"model": str(tiny_model), "window": 256}, "on_error": request.param,
            "monitors": [{"id": "harm", "use": "scripted", "action": "halt",
                          "message": HALTED}]}, host=host)
    with running(create_app(guard, upstream=upstream_server.base_url)) as server:
        yield server


def _strings(prompt: str) -> list[dict[str, Any]]:
    return [{"role": "system", "content": "You help with baking."},
            {"role": "user", "content": prompt}]


def _parts(prompt: str) -> list[dict[str, Any]]:
    return [{"role": "system", "content": [{"type": "text", "text": "You help with baking."}]},
            {"role": "user", "content": [{"type": "text", "text": prompt}, IMAGE]}]


def _with_tools(prompt: str) -> list[dict[str, Any]]:
    return [*_parts(prompt),
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function",
                 "function": {"name": "recipe", "arguments": '{"dish": "bread"}'}}]},
            {"role": "tool", "tool_call_id": "c1",
             "content": [{"type": "text", "text": "flour, water, salt, yeast"}]}]


def _sse(server: RunningServer, messages: list[dict[str, Any]]) -> tuple[str, str | None]:
    """(content the client saw, last finish_reason) of a streamed request."""
    shown, finish = [], None
    with httpx.stream("POST", f"{server.base_url}/chat/completions", timeout=30,
                      json={"model": "m", "messages": messages, "stream": True}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            choice = json.loads(line.removeprefix("data: "))["choices"][0]
            shown.append(choice["delta"].get("content") or "")
            finish = choice.get("finish_reason") or finish
    return "".join(shown), finish


def _whole(server: RunningServer, messages: list[dict[str, Any]]) -> tuple[str, str | None]:
    response = httpx.post(f"{server.base_url}/chat/completions", timeout=30,
                          json={"model": "m", "messages": messages})
    assert response.status_code == 200
    choice = response.json()["choices"][0]
    return choice["message"]["content"], choice["finish_reason"]


@pytest.mark.parametrize("ask", [_sse, _whole], ids=["stream", "whole"])
@pytest.mark.parametrize("shape", [_parts, _with_tools], ids=["parts", "tool-calls"])
def test_a_harmful_answer_is_halted_exactly_like_the_string_request(
        proxy: RunningServer, upstream_server: UpstreamServer, ask: Any, shape: Any) -> None:
    upstream_server.enqueue(Script(text=HARMFUL), Script(text=HARMFUL))
    by_string = ask(proxy, _strings("How do I bake bread?"))
    by_shape = ask(proxy, shape("How do I bake bread?"))
    assert by_string[1] == "content_filter" and by_string[0].endswith(HALTED)
    assert by_shape == by_string
    assert "knead" not in by_shape[0] and by_shape[0].startswith("Mix")  # not halted at token 0
    sent = upstream_server.completions()[-1].body["messages"]
    assert sent == shape("How do I bake bread?")  # the upstream got the request as sent


@pytest.mark.parametrize("ask", [_sse, _whole], ids=["stream", "whole"])
def test_a_benign_content_parts_answer_is_not_halted(
        proxy: RunningServer, upstream_server: UpstreamServer, ask: Any) -> None:
    upstream_server.enqueue(Script(text=BENIGN))
    assert ask(proxy, _parts("Tell me about the river.")) == (BENIGN, "stop")


@pytest.mark.parametrize("messages,where", [
    ([{"role": "user", "content": [{"kind": "text", "text": "hi"}]}],
     "messages[0].content[0].type"),
    ([{"role": "user", "content": "hi"}, {"content": "no role"}], "messages[1].role"),
    ([{"role": "user", "content": 42}], "messages[0].content"),
])
def test_an_unreadable_message_is_a_400_naming_it(
        proxy: RunningServer, upstream_server: UpstreamServer, messages: list[Any],
        where: str) -> None:
    response = httpx.post(f"{proxy.base_url}/chat/completions", timeout=30,
                          json={"model": "m", "messages": messages, "stream": True})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_messages" and error["message"].startswith(f"{where}: ")
    assert upstream_server.completions() == []
