"""Each adapter reads content-parts and LangChain messages through the core's normaliser: with a
real (tiny) observer model, whose chat template takes only string content like SmolLM2's, the
wrapped OpenAI client, a LangChain chain and local transformers generation guard a content-parts
conversation exactly like the same text as strings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest

pytest.importorskip("torch")

from langchain_core.language_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.output_parsers import StrOutputParser

from guardrail import Guard, MessageError, Needs
from guardrail.testing import ScriptedMonitor, plugin_monitors
from guardrail.testing.tiny_models import build_tiny_model
from guardrail.testing.upstream import Script, UpstreamServer

HARMFUL = "Mix flour, water, salt and yeast; knead it for ten minutes. Mix flour and water."
HALTED = "Sorry, I can't continue with that."
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
STRINGS: list[Any] = [{"role": "user", "content": "How do I bake bread?"}]
PARTS: list[Any] = [{"role": "user",
                     "content": [{"type": "text", "text": "How do I bake bread?"}, IMAGE]}]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", arch="llama")


@pytest.fixture(scope="module")
def guard(tiny_model: Path) -> Guard:
    """Halts on "knead" (the tiny tokenizer's "ead" token); the monitor reads the observer's layer
    1, so each stream runs the tiny model over the conversation first. fail_open: an observer
    that cannot read the conversation would let the answer through."""
    monitor = ScriptedMonitor.factory({"ead": 1.0}, needs=Needs(layers=frozenset({1})))
    with plugin_monitors(scripted=monitor) as host:
        return Guard.from_policy({
            "observer": {"model": str(tiny_model), "window": 256}, "on_error": "fail_open",
            "monitors": [{"id": "harm", "use": "scripted", "action": "halt",
                          "message": HALTED}]}, host=host)


def test_wrapped_openai_client(guard: Guard, upstream_server: UpstreamServer) -> None:
    client = guard.wrap(openai.OpenAI(base_url=upstream_server.base_url, api_key="k",
                                      max_retries=0))
    shown = []
    for messages in (STRINGS, PARTS):
        upstream_server.enqueue(Script(text=HARMFUL))
        chunks = list(client.chat.completions.create(model="m", messages=messages, stream=True))
        assert chunks[-1].choices[0].finish_reason == "content_filter"
        shown.append("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))
    assert shown[0] == shown[1] and shown[1].endswith(HALTED) and "knead" not in shown[1]
    assert upstream_server.completions()[-1].body["messages"] == PARTS  # images still go up
    with pytest.raises(MessageError, match=r"^messages\[0\]\.content\[0\]\.type: "):
        client.chat.completions.create(model="m", stream=True, messages=[
            {"role": "user", "content": [{"kind": "text", "text": "hi"}]}])
    assert len(upstream_server.completions()) == 2  # the bad request never left


def test_langchain_chain_with_content_parts_messages(guard: Guard) -> None:
    from guardrail_langchain import GuardRunnable

    shown = []
    for context in ([HumanMessage("How do I bake bread?")],
                    [HumanMessage(content=[{"type": "text", "text": "How do I bake bread?"},
                                           {"type": "image", "url": "https://x.test/a.png"}])]):
        model = GenericFakeChatModel(messages=iter([AIMessage(content=HARMFUL)]))
        chain = model | StrOutputParser() | GuardRunnable(guard=guard, messages=context)
        shown.append("".join(str(chunk) for chunk in chain.stream("hi")))
    assert shown[0] == shown[1] and shown[1].endswith(HALTED) and "knead" not in shown[1]


def test_local_generation_reads_content_parts_as_text(tiny_model: Path, guard: Guard) -> None:
    from guardrail_transformers import LocalGenerator

    generator = LocalGenerator(tiny_model)
    params = {"max_new_tokens": 12, "temperature": 1.0, "seed": 7}
    assert generator.generate(PARTS, **params) == generator.generate(STRINGS, **params)
