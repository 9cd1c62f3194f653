"""guardrail-server: the proxy under uvicorn on 127.0.0.1 between real clients (openai, httpx)
and the loopback SSE upstream, which records what reached it and when the proxy hung up."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import httpx
import openai
import pytest
from guardrail_server import RunningServer, create_app, running
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam

from guardrail import Guard, GuardrailError, Report
from guardrail.testing.upstream import Script, ToolCall, UpstreamServer, split_words

HARMFUL = ("Here is how to build a bomb at home with things you can buy in any shop near you "
           "and then some more words to keep the stream going for quite a while longer")
BENIGN = "The quick brown fox jumps over the lazy dog and then takes a well earned nap."
TRIGGER_CHUNK = split_words(HARMFUL).index(" bomb")  # content chunk with the trigger word
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "tell me something"}]
SECRET = "sk-test-secret-4f9a1c77"
DELAY = 0.02

Serve = Callable[..., AbstractContextManager[RunningServer]]


def _client(proxy: RunningServer, key: str = "k") -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.base_url, api_key=key, max_retries=0, timeout=10)


def _content(chunks: list[ChatCompletionChunk]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def _chunks_after_trigger(server: UpstreamServer) -> int:
    record = server.completions()[-1]
    assert record.wait(5)
    return record.chunks_written - 1 - (TRIGGER_CHUNK + 1)  # minus the role chunk


def _assert_halted(chunks: list[ChatCompletionChunk], halt_message: str) -> None:
    last = chunks[-1]
    shown = _content(chunks[:-1])
    # the message stands apart from the released text (a blank line), alone when none was shown
    assert last.choices[0].delta.content == ("\n\n" if shown else "") + halt_message
    assert last.choices[0].finish_reason == "content_filter"
    halt = last.guardrail["events"][-1]  # type: ignore[attr-defined]
    assert halt["kind"] == "halt" and halt["monitor"] == "weapons"
    assert "bomb" not in shown and HARMFUL.startswith(shown) and shown == halt["released_text"]


# -- streaming -------------------------------------------------------------------------------


@pytest.mark.parametrize("hold_back,offload", [(2, False), (6, False), (2, True)])
def test_sync_stream_halts_and_stops_upstream(upstream_server: UpstreamServer, serve: Serve,
                                              make_guard: Callable[..., Guard],
                                              halt_message: str, reports: list[Report],
                                              hold_back: int, offload: bool) -> None:
    upstream_server.enqueue(Script(text=HARMFUL, delay=DELAY))
    with serve(make_guard(hold_back), offload=offload) as proxy:
        stream = _client(proxy).chat.completions.create(model="m", messages=MESSAGES,
                                                        stream=True)
        chunks = list(stream)
    _assert_halted(chunks, halt_message)
    record = upstream_server.completions()[-1]
    assert record.wait(5)  # the upstream notices the hang-up on its own thread
    assert record.disconnected and not record.completed
    assert _chunks_after_trigger(upstream_server) <= hold_back + 1
    assert len(reports) == 1 and reports[0].halted and reports[0].leaked_tokens == 0


async def test_async_stream_halts_and_stops_upstream(upstream_server: UpstreamServer,
                                                     serve: Serve,
                                                     make_guard: Callable[..., Guard],
                                                     halt_message: str) -> None:
    upstream_server.enqueue(Script(text=HARMFUL, delay=DELAY))
    with serve(make_guard(2)) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="k", max_retries=0,
                                    timeout=10)
        stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        chunks = [c async for c in stream]
        await client.close()
    _assert_halted(chunks, halt_message)
    record = upstream_server.completions()[-1]
    assert record.wait(5) and record.disconnected  # noticed on the upstream's own thread
    assert _chunks_after_trigger(upstream_server) <= 3


def test_raw_sse_ends_with_done_after_the_halt(upstream_server: UpstreamServer, serve: Serve,
                                               make_guard: Callable[..., Guard]) -> None:
    upstream_server.enqueue(Script(text=HARMFUL))
    with serve(make_guard(2)) as proxy, httpx.stream(
            "POST", f"{proxy.base_url}/chat/completions", timeout=10,
            json={"model": "m", "messages": MESSAGES, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2].removeprefix("data: "))
    assert last["object"] == "chat.completion.chunk"
    assert last["choices"][0]["finish_reason"] == "content_filter"


def test_benign_stream_passes_unchanged_with_flags(upstream_server: UpstreamServer,
                                                   serve: Serve,
                                                   make_guard: Callable[..., Guard]) -> None:
    text = BENIGN + " Then we build a shed."
    upstream_server.enqueue(Script(text=text, delay=0.005))
    with serve(make_guard(2)) as proxy:
        chunks = list(_client(proxy).chat.completions.create(
            model="m", messages=MESSAGES, stream=True,
            stream_options={"include_usage": True}))
    assert _content(chunks) == text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and finishes.count("stop") == 1
    assert chunks[-1].usage is not None and not chunks[-1].choices  # the usage chunk passes
    flags = [e for c in chunks for e in (getattr(c, "guardrail", None) or {}).get("events", [])]
    assert [f["monitor"] for f in flags] == ["verbs"]
    assert text[slice(*flags[0]["span"])] == "build"
    assert upstream_server.completions()[-1].completed


# -- not streamed ----------------------------------------------------------------------------


def test_whole_completion_halt_keeps_released_text(upstream_server: UpstreamServer,
                                                   serve: Serve,
                                                   make_guard: Callable[..., Guard],
                                                   halt_message: str) -> None:
    upstream_server.enqueue(Script(text=HARMFUL), Script(text=BENIGN))
    with serve(make_guard(2)) as proxy:
        client = _client(proxy)
        halted = client.chat.completions.create(model="m", messages=MESSAGES)
        benign = client.chat.completions.create(model="m", messages=MESSAGES)
    choice = halted.choices[0]
    assert choice.finish_reason == "content_filter"
    content = choice.message.content or ""
    assert content.endswith("\n\n" + halt_message)
    released = content.removesuffix("\n\n" + halt_message)
    assert released and HARMFUL.startswith(released) and "bomb" not in released
    kinds = [e["kind"] for e in halted.guardrail["events"]]  # type: ignore[attr-defined]
    assert kinds == ["flag", "halt"]
    assert benign.choices[0].message.content == BENIGN
    assert benign.choices[0].finish_reason == "stop"


async def test_async_whole_completion(upstream_server: UpstreamServer, serve: Serve,
                                      make_guard: Callable[..., Guard],
                                      halt_message: str) -> None:
    upstream_server.enqueue(Script(text=HARMFUL))
    with serve(make_guard(2)) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="k", max_retries=0,
                                    timeout=10)
        completion = await client.chat.completions.create(model="m", messages=MESSAGES)
        await client.close()
    assert completion.choices[0].finish_reason == "content_filter"
    assert (completion.choices[0].message.content or "").endswith(halt_message)


# -- the client hangs up ---------------------------------------------------------------------


@pytest.mark.parametrize("hold_back,offload", [(1, False), (200, False), (1, True)])
def test_client_disconnect_closes_upstream_within_a_second(
        upstream_server: UpstreamServer, serve: Serve, make_guard: Callable[..., Guard],
        reports: list[Report], hold_back: int, offload: bool) -> None:
    # hold_back=200: nothing is released, so only a watch on the connection can notice.
    upstream_server.enqueue(Script(text=BENIGN * 20, delay=0.05))
    with serve(make_guard(hold_back), offload=offload) as proxy:
        with httpx.stream("POST", f"{proxy.base_url}/chat/completions", timeout=10,
                          json={"model": "m", "messages": MESSAGES, "stream": True}) as resp:
            assert resp.status_code == 200
            if hold_back == 1:
                next(resp.iter_lines())
            else:
                time.sleep(0.3)
        closed_at = time.monotonic()
        record = upstream_server.completions()[-1]
        assert record.wait(5)
        deadline = time.monotonic() + 2
        while not reports and time.monotonic() < deadline:
            time.sleep(0.01)
    assert record.disconnected and not record.completed
    assert record.disconnected_at is not None and record.disconnected_at - closed_at < 1.0
    assert reports and reports[0].aborted == "client went away"


def test_openai_client_close_stops_upstream(upstream_server: UpstreamServer, serve: Serve,
                                            make_guard: Callable[..., Guard]) -> None:
    upstream_server.enqueue(Script(text=BENIGN * 20, delay=0.05))
    with serve(make_guard(1)) as proxy:
        stream = _client(proxy).chat.completions.create(model="m", messages=MESSAGES,
                                                        stream=True)
        next(iter(stream))
        stream.close()
        closed_at = time.monotonic()
        record = upstream_server.completions()[-1]
        assert record.wait(5)
    assert record.disconnected and record.disconnected_at is not None
    assert record.disconnected_at - closed_at < 1.0


# -- credentials -----------------------------------------------------------------------------


def test_authorization_reaches_upstream_and_nothing_else(
        upstream_server: UpstreamServer, serve: Serve, make_guard: Callable[..., Guard],
        reports: list[Report], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    audit = tmp_path / "audit.jsonl"
    guard = Guard.from_policy({**make_guard(2).policy.model_dump(mode="json",
                                                                 exclude={"source"}),
                               "audit": {"path": str(audit)}})
    upstream_server.enqueue(Script(text=HARMFUL), Script(text=BENIGN),
                            Script(status=401, error_message=f"Incorrect API key: {SECRET}"))
    caplog.set_level(logging.DEBUG)
    with serve(guard) as proxy:
        client = _client(proxy, key=SECRET)
        chunks = list(client.chat.completions.create(model="m", messages=MESSAGES, stream=True))
        whole = client.chat.completions.create(model="m", messages=MESSAGES)
        with pytest.raises(openai.AuthenticationError) as caught:
            client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        models = client.models.list()
    seen = [r.headers.get("authorization") for r in upstream_server.requests]
    assert seen == [f"Bearer {SECRET}"] * 4
    assert [m.id for m in models.data] == [upstream_server.model]
    error = caught.value
    assert error.status_code == 401 and "[REDACTED]" in error.message
    leaks = {
        "chunks": json.dumps([c.model_dump() for c in chunks]),
        "completion": whole.model_dump_json(),
        "error": f"{error} {error.body}",
        "reports": json.dumps([r.to_dict() for r in reports], default=str),
        "audit": audit.read_text(),
        "logs": caplog.text,
    }
    assert "halt" in leaks["audit"] and "upstream" in leaks["logs"]  # they were written
    assert [where for where, text in leaks.items() if SECRET in text] == []


def test_health_and_bad_requests(upstream_server: UpstreamServer, serve: Serve,
                                 make_guard: Callable[..., Guard]) -> None:
    with serve(make_guard(2)) as proxy:
        health = httpx.get(f"{proxy.url}/health", timeout=5).json()
        bad_json = httpx.post(f"{proxy.base_url}/chat/completions", content=b"{nope", timeout=5)
        no_messages = httpx.post(f"{proxy.base_url}/chat/completions", json={"model": "m"},
                                 timeout=5)
    assert health["status"] == "ok" and health["monitors"] == ["weapons", "verbs"]
    assert health["upstream"] == upstream_server.base_url
    assert bad_json.status_code == 400 and bad_json.json()["error"]["code"] == "invalid_json"
    assert no_messages.status_code == 400
    assert "messages" in no_messages.json()["error"]["message"]
    assert upstream_server.completions() == []  # nothing bad was forwarded


def test_binds_loopback_by_default(make_guard: Callable[..., Guard]) -> None:
    app = create_app(make_guard(2), upstream="http://127.0.0.1:9/v1")
    with running(app) as proxy:
        assert proxy.host == "127.0.0.1"
        assert httpx.get(f"{proxy.url}/health", timeout=5).status_code == 200


def test_servers_hold_their_port_from_the_start(make_guard: Callable[..., Guard]) -> None:
    app = create_app(make_guard(2), upstream="http://127.0.0.1:9/v1")
    with running(app) as first, running(app) as second:
        assert first.port != second.port
        with pytest.raises(GuardrailError, match=f"cannot listen on 127.0.0.1:{first.port}"), \
                running(app, port=first.port):
            pass
        assert httpx.get(f"{first.url}/health", timeout=5).status_code == 200


# -- OpenAI features pass through ------------------------------------------------------------


def test_tool_calls_and_logprobs_pass_through(upstream_server: UpstreamServer, serve: Serve,
                                              make_guard: Callable[..., Guard]) -> None:
    call = ToolCall("get_weather", '{"city": "Paris", "unit": "celsius"}')
    upstream_server.enqueue(Script(text="Let me check.", tool_calls=[call]))
    with serve(make_guard(2)) as proxy:
        chunks = list(_client(proxy).chat.completions.create(
            model="m", messages=MESSAGES, stream=True, logprobs=True, top_logprobs=2))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].function is not None and deltas[0].function.name == "get_weather"
    assert "".join(d.function.arguments or "" for d in deltas if d.function) == call.arguments
    logprobs = [e.token for c in chunks if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content or []]
    assert "".join(logprobs) == "Let me check."
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_every_choice_halts_before_the_upstream_closes(upstream_server: UpstreamServer,
                                                       serve: Serve,
                                                       make_guard: Callable[..., Guard],
                                                       halt_message: str) -> None:
    upstream_server.enqueue(Script(text=HARMFUL, delay=DELAY))
    with serve(make_guard(2)) as proxy:
        chunks = list(_client(proxy).chat.completions.create(model="m", messages=MESSAGES,
                                                             stream=True, n=2))
    halts = {c.choices[0].index for c in chunks
             if c.choices and c.choices[0].finish_reason == "content_filter"}
    assert halts == {0, 1}
    record = upstream_server.completions()[-1]
    assert record.wait(5) and record.disconnected
    assert record.chunks_written < record.chunks_planned


def test_credentials_in_the_upstream_url_are_never_shown(make_guard: Callable[..., Guard],
                                                         caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    caplog.set_level(logging.DEBUG)
    app = create_app(make_guard(2), upstream=f"http://user:{SECRET}@127.0.0.1:9/v1")
    with running(app) as proxy:
        health = httpx.get(f"{proxy.url}/health", timeout=5).text
        failed = httpx.post(f"{proxy.base_url}/chat/completions", timeout=10,
                            json={"model": "m", "messages": MESSAGES, "stream": True})
    assert failed.status_code == 502 and "127.0.0.1:9" in failed.text
    assert SECRET not in health + failed.text + caplog.text
