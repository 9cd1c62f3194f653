"""The loopback upstream itself: it must tell a closed connection from an abandoned one, since the
adapter tests rely on it to prove that a halt stopped the upstream."""

from __future__ import annotations

import httpx
import openai
import pytest

from guardrail.testing.upstream import Script, ToolCall, UpstreamServer

TEXT = "one two three four five six seven eight nine ten eleven twelve"


def test_break_without_close_leaves_the_server_writing(upstream_server: UpstreamServer) -> None:
    upstream_server.enqueue(Script(text=TEXT, delay=0.01))
    client = openai.OpenAI(base_url=upstream_server.base_url, api_key="k")
    stream = client.chat.completions.create(model="m", messages=[], stream=True)
    for _chunk in stream:
        break  # openai's Stream keeps the response open: the server goes on
    record = upstream_server.completions()[-1]
    assert record.wait(5)
    assert record.completed and not record.disconnected
    assert record.chunks_written == record.chunks_planned
    stream.close()


def test_close_is_recorded_promptly(upstream_server: UpstreamServer) -> None:
    upstream_server.enqueue(Script(text=TEXT, delay=0.05))
    client = openai.OpenAI(base_url=upstream_server.base_url, api_key="k")
    stream = client.chat.completions.create(model="m", messages=[], stream=True)
    next(stream), next(stream)
    stream.close()
    record = upstream_server.completions()[-1]
    assert record.wait(5) and record.disconnected and not record.completed
    assert record.chunks_written < record.chunks_planned
    assert record.disconnect_delay is not None and record.disconnect_delay < 0.05


def test_stream_shapes(upstream_server: UpstreamServer) -> None:
    upstream_server.enqueue(Script(chunks=["Hel", "lo"], logprobs=[-0.5, -1.5],
                                   tool_calls=[ToolCall("lookup", '{"q": "x"}', pieces=2)]))
    client = openai.OpenAI(base_url=upstream_server.base_url, api_key="secret")
    chunks = list(client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], stream=True, logprobs=True,
        top_logprobs=2, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello"
    logprobs = [e.logprob for c in chunks if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content or []]
    assert logprobs == [-0.5, -1.5]
    args = "".join((t.function and t.function.arguments) or "" for c in chunks if c.choices
                   for t in c.choices[0].delta.tool_calls or [])
    assert args == '{"q": "x"}'
    assert chunks[-2].choices[0].finish_reason == "tool_calls"
    assert chunks[-1].usage is not None
    record = upstream_server.completions()[-1]
    assert record.headers["authorization"] == "Bearer secret"
    assert record.body["messages"] == [{"role": "user", "content": "hi"}]


def test_whole_response_models_and_errors(upstream_server: UpstreamServer) -> None:
    upstream_server.enqueue(Script(text="Fine, thanks."), Script(status=429, error_message="slow"))
    client = openai.OpenAI(base_url=upstream_server.base_url, api_key="k", max_retries=0)
    completion = client.chat.completions.create(model="m", messages=[])
    assert completion.choices[0].message.content == "Fine, thanks."
    assert completion.choices[0].finish_reason == "stop"
    with pytest.raises(openai.RateLimitError, match="slow"):
        client.chat.completions.create(model="m", messages=[])
    assert [m.id for m in client.models.list()] == ["scripted-model"]
    assert httpx.get(upstream_server.base_url + "/nothing").status_code == 404


def test_responder_builds_scripts_from_the_request() -> None:
    with UpstreamServer(responder=lambda body: Script(text=f"model {body['model']}")) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="k")
        reply = client.chat.completions.create(model="tiny", messages=[])
    assert reply.choices[0].message.content == "model tiny"


def test_text_completions_continue_the_prompt(upstream_server: UpstreamServer) -> None:
    upstream_server.enqueue(Script(text=" Canberra. It is"), Script(text=" Canberra."))
    client = openai.OpenAI(base_url=upstream_server.base_url, api_key="k")
    stream = client.completions.create(model="m", prompt="The capital is", stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == " Canberra. It is"
    whole = client.completions.create(model="m", prompt="The capital is")
    assert (whole.choices[0].text, whole.choices[0].finish_reason) == (" Canberra.", "stop")
    assert [r.body["prompt"] for r in upstream_server.requests] == ["The capital is"] * 2
    assert upstream_server.completions() == []  # chat-completion records only
