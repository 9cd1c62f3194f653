"""Routing between two OpenAI-compatible loopback servers: one seamless stream, the small
upstream closed when the route fires, the large one asked to continue the released prefix."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import openai
import pytest
from guardrail_router.remote import RemoteRouter

from guardrail import Guard
from guardrail.plugins import PluginHost
from guardrail.testing import ScriptedMonitor, plugin_monitors
from guardrail.testing.upstream import RequestRecord, Script, UpstreamServer

QUESTION = [{"role": "user", "content": "What is the capital of Chad?"}]


def _guard(host: PluginHost, max_tokens: int = 32) -> Guard:
    policy = {"monitors": [{"id": "router", "use": "unsure", "threshold": 0.5, "action": "route",
                            "route_to": {"model": "large", "max_tokens": max_tokens}}]}
    return Guard.from_policy(policy, host=host)


def _route_chad(**options: Any) -> tuple[str, RemoteRouter, list[RequestRecord],
                                          list[RequestRecord]]:
    """The small model names a wrong capital; the scripted router fires on it. Returns the text,
    the router and the small and large servers' requests (finished)."""
    with UpstreamServer(model="small") as small, UpstreamServer(model="large") as large, \
            plugin_monitors(unsure=ScriptedMonitor.factory({"kouile": 1.0})) as host:
        small.enqueue(Script(text="The capital of Chad is Kouile, a small town near the lake. "
                                  "It is in Africa.", delay=0.02),
                      Script(text=" It is in Africa."))
        large.enqueue(Script(text=" N'Djamena. It has about a million people.", delay=0.02))
        router = RemoteRouter(_guard(host),
                              openai.OpenAI(base_url=small.base_url, api_key="test"), "small",
                              openai.OpenAI(base_url=large.base_url, api_key="test"), "large",
                              **options)
        text = "".join(router.stream(QUESTION))
        smalls, larges = list(small.requests), list(large.requests)
        for record in (*smalls, *larges):
            record.wait()
    return text, router, smalls, larges


def test_route_hands_one_sentence_to_the_large_model_and_resumes_the_small_one() -> None:
    text, router, (first_small, resumed_small), (segment,) = _route_chad()

    assert text == "The capital of Chad is N'Djamena. It is in Africa."
    # the small model stopped generating when the route fired
    assert first_small.disconnected and not first_small.completed
    # the large model continued the released prefix and was closed after its sentence
    assert segment.body["messages"][-1] == {"role": "assistant",
                                            "content": "The capital of Chad is"}
    assert segment.body["max_tokens"] == 32
    assert segment.disconnected and not segment.completed
    # the small model resumed from the new prefix, which holds the large model's sentence
    assert resumed_small.body["messages"][-1]["content"] == "The capital of Chad is N'Djamena."
    assert [(s.text, s.monitor) for s in router.segments] == [(" N'Djamena.", "router")]
    assert router.report is not None and len(router.report.routes) == 1
    assert router.report.released_text == text


def test_without_a_route_the_small_stream_passes_through() -> None:
    with UpstreamServer(model="small") as small, UpstreamServer(model="large") as large, \
            plugin_monitors(unsure=ScriptedMonitor.factory({"kouile": 1.0})) as host:
        small.enqueue(Script(text="The capital of Chad is N'Djamena."))
        router = RemoteRouter(_guard(host),
                              openai.OpenAI(base_url=small.base_url, api_key="test"), "small",
                              openai.OpenAI(base_url=large.base_url, api_key="test"), "large")
        text = "".join(router.stream(QUESTION))
        assert large.completions() == []
    assert text == "The capital of Chad is N'Djamena." and router.segments == []


def _render(messages: list[dict[str, str]]) -> str:
    return "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>"


def test_completions_prefill_continues_the_rendered_prompt_with_the_answer_so_far() -> None:
    """Servers that start a new answer after a final assistant message (llama-cpp-python's,
    OpenAI) continue text exactly through /v1/completions."""
    text, router, (first_small, resumed_small), (segment,) = _route_chad(
        prefill="completions", render=_render)

    assert text == "The capital of Chad is N'Djamena. It is in Africa."
    assert [r.path for r in (first_small, resumed_small, segment)] == ["/v1/completions"] * 3
    prompt = "<user>What is the capital of Chad?\n<assistant>"
    assert first_small.body["prompt"] == prompt
    assert segment.body["prompt"] == prompt + "The capital of Chad is"
    assert segment.body["max_tokens"] == 32 and segment.disconnected
    assert resumed_small.body["prompt"] == prompt + "The capital of Chad is N'Djamena."
    assert [s.text for s in router.segments] == [" N'Djamena."]


def test_completions_prefill_needs_a_chat_template() -> None:
    with plugin_monitors(unsure=ScriptedMonitor.factory({})) as host:
        guard = _guard(host)  # no observer: nothing to render the conversation with
        with pytest.raises(ValueError, match="render="):
            RemoteRouter(guard, None, "small", None, "large", prefill="completions")
        with pytest.raises(ValueError, match="'chat' or 'completions'"):
            RemoteRouter(guard, None, "small", None, "large", prefill="prefix")


def test_the_http_driver_loads_without_torch() -> None:
    """A process that only routes between two endpoints never loads torch or the models."""
    code = ("import sys\nimport guardrail_router.remote\n"
            "print([m for m in ('torch', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "[]"
