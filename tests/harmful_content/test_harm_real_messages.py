"""The default guard (the shipped head on the real SmolLM2 observer) behind the proxy over
loopback: a request whose prompt comes as OpenAI content parts (text + image) is guarded exactly
like the same prompt as a string. Before the normaliser, SmolLM2's chat template raised on the
list, and fail_closed halted every such request at token 0 (a fire-safety answer too)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from importlib.resources import files
from typing import Any

import guardrail_harmful_content.plugin as harm_plugin
import httpx
import pytest
from guardrail_harmful_content.monitor import DEFAULT_WEIGHTS, HALT_MESSAGE
from guardrail_server import RunningServer, create_app, running

from guardrail import Guard
from guardrail.guard import default_policy
from guardrail.plugins import PluginHost
from guardrail.testing.upstream import Script, UpstreamServer

pytestmark = [pytest.mark.real_model,
              pytest.mark.skipif(not DEFAULT_WEIGHTS.exists(), reason="no shipped weights")]

IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}


def _replay(name: str, index: int) -> dict[str, str]:
    text = (files("guardrail_harmful_content") / "replays" / name).read_text("utf-8")
    return json.loads(text.splitlines()[index])


@pytest.fixture(scope="module")
def proxy() -> Iterator[tuple[RunningServer, UpstreamServer]]:
    host = PluginHost(autoload=False)
    host.register(harm_plugin, name="harm-test")
    guard = Guard(default_policy(host), host=host)
    assert guard.policy.on_error == "fail_closed"
    with UpstreamServer() as upstream, \
            running(create_app(guard, upstream=upstream.base_url)) as server:
        yield server, upstream


def _ask(proxy: tuple[RunningServer, UpstreamServer], content: Any, answer: str
         ) -> tuple[str, str | None]:
    server, upstream = proxy
    upstream.enqueue(Script(text=answer))
    shown, finish = [], None
    with httpx.stream("POST", f"{server.base_url}/chat/completions", timeout=120, json={
            "model": "m", "stream": True,
            "messages": [{"role": "user", "content": content}]}) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line.removeprefix("data: "))["choices"][0]
                shown.append(choice["delta"].get("content") or "")
                finish = choice.get("finish_reason") or finish
    return "".join(shown), finish


@pytest.mark.parametrize("name,index", [("harmful.jsonl", 8), ("benign.jsonl", 2)])
def test_content_parts_are_guarded_like_a_string_prompt(
        proxy: tuple[RunningServer, UpstreamServer], name: str, index: int) -> None:
    record = _replay(name, index)
    by_string = _ask(proxy, record["prompt"], record["response"])
    by_parts = _ask(proxy, [{"type": "text", "text": record["prompt"]}, IMAGE],
                    record["response"])
    assert by_parts == by_string
    if name == "harmful.jsonl":  # halted part-way, not at token 0
        assert by_parts[1] == "content_filter" and by_parts[0].endswith(HALT_MESSAGE)
        assert len(by_parts[0]) > len(HALT_MESSAGE) + 20
    else:  # the fire-safety answer streams through whole
        assert by_parts == (record["response"], "stop")
