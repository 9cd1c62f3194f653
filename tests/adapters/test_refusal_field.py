"""Text a model sends in its ``refusal`` field reaches the reader, so it is judged like content:
through the OpenAI wrapper and the proxy, streamed and whole."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import openai
from guardrail_server import RunningServer
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessageParam

from guardrail import Guard
from guardrail.testing.upstream import Script, UpstreamServer

HARMFUL = ("I will not refuse: here is how to build a bomb at home with things you can buy "
           "in any shop near you and more words to keep the stream going")
REFUSAL = "I can't help with that request, but I can point you to safety resources instead."
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "tell me something"}]

Serve = Callable[..., AbstractContextManager[RunningServer]]


def _refusal(chunks: list[ChatCompletionChunk]) -> str:
    return "".join(c.choices[0].delta.refusal or "" for c in chunks if c.choices)


def _check_stream(chunks: list[ChatCompletionChunk], halt_message: str) -> None:
    shown = _refusal(chunks)
    assert "bomb" not in shown and HARMFUL.startswith(shown) and shown
    last = chunks[-1].choices[0]
    assert last.finish_reason == "content_filter"
    assert last.delta.content is not None and last.delta.content.endswith(halt_message)
    assert not any(e.token == " bomb" for c in chunks if c.choices and c.choices[0].logprobs
                   for e in c.choices[0].logprobs.refusal or ())


def _check_whole(completion: ChatCompletion, halt_message: str) -> None:
    message = completion.choices[0].message
    assert message.refusal is None and message.content is not None
    assert message.content.endswith(halt_message) and "bomb" not in message.content
    assert completion.choices[0].finish_reason == "content_filter"
    assert completion.choices[0].logprobs is None


def test_wrapper_judges_streamed_refusal_text(upstream_server: UpstreamServer,
                                              make_guard: Callable[..., Guard],
                                              halt_message: str) -> None:
    upstream_server.enqueue(Script(text=HARMFUL, refusal=True))
    client = make_guard().wrap(openai.OpenAI(base_url=upstream_server.base_url, api_key="k"))
    chunks = list(client.chat.completions.create(model="m", messages=MESSAGES,
                                                 stream=True, logprobs=True))
    _check_stream(chunks, halt_message)


def test_wrapper_judges_whole_refusal_text(upstream_server: UpstreamServer,
                                           make_guard: Callable[..., Guard],
                                           halt_message: str) -> None:
    upstream_server.enqueue(Script(text=HARMFUL, refusal=True), Script(text=REFUSAL, refusal=True))
    client = make_guard().wrap(openai.OpenAI(base_url=upstream_server.base_url, api_key="k"))
    _check_whole(client.chat.completions.create(model="m", messages=MESSAGES,
                                                logprobs=True), halt_message)
    fine = client.chat.completions.create(model="m", messages=MESSAGES, logprobs=True)
    assert fine.choices[0].message.refusal == REFUSAL and fine.choices[0].message.content is None
    assert fine.choices[0].logprobs is not None and fine.choices[0].logprobs.refusal


def test_proxy_judges_refusal_text(upstream_server: UpstreamServer, serve: Serve,
                                   make_guard: Callable[..., Guard], halt_message: str) -> None:
    upstream_server.enqueue(Script(text=HARMFUL, refusal=True), Script(text=HARMFUL, refusal=True),
                            Script(text=REFUSAL, refusal=True))
    with serve(make_guard()) as proxy:
        client = openai.OpenAI(base_url=proxy.base_url, api_key="k", max_retries=0, timeout=10)
        chunks = list(client.chat.completions.create(model="m", messages=MESSAGES,
                                                     stream=True, logprobs=True))
        _check_stream(chunks, halt_message)
        _check_whole(client.chat.completions.create(model="m", messages=MESSAGES,
                                                    logprobs=True), halt_message)
        fine = list(client.chat.completions.create(model="m", messages=MESSAGES,
                                                   stream=True))
        assert _refusal(fine) == REFUSAL
        assert not any(c.choices[0].delta.content for c in fine if c.choices)
