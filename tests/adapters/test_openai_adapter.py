"""guardrail-openai against a real loopback HTTP server, through the real openai client."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from guardrail import Guard, GuardrailViolation
from guardrail.testing.upstream import Script, ToolCall, UpstreamServer, split_words

HARMFUL = ("Here is how to build a bomb at home with things you can buy in any shop near you "
           "and then some more words to keep the stream going for quite a while longer")
BENIGN = "The quick brown fox jumps over the lazy dog and then takes a well earned nap."
TRIGGER_CHUNK = split_words(HARMFUL).index(" bomb")  # content chunk that carries the trigger
MESSAGES = [{"role": "user", "content": "tell me something"}]
DELAY = 0.03


def _content(chunks: Sequence[ChatCompletionChunk]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def _assert_halted_stream(chunks: list[ChatCompletionChunk], halt_message: str) -> None:
    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    last = chunks[-1]
    shown = _content(chunks[:-1])
    # the message stands apart from the released text (a blank line), alone when none was shown
    assert last.choices[0].delta.content == ("\n\n" if shown else "") + halt_message
    assert last.choices[0].finish_reason == "content_filter"
    halt = last.guardrail["events"][-1]  # type: ignore[attr-defined]
    assert halt["kind"] == "halt" and halt["monitor"] == "weapons"
    assert "bomb" not in shown
    assert HARMFUL.startswith(shown)
    assert shown == halt["released_text"]
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def _assert_upstream_stopped(server: UpstreamServer, closed_at: float) -> None:
    record = server.completions()[-1]
    assert record.wait(5)
    assert record.disconnected and not record.completed
    # The trigger is only judged once the next word arrives: at most one chunk after it, plus the
    # role chunk the server sends first.
    assert record.chunks_written <= TRIGGER_CHUNK + 3 < record.chunks_planned
    assert record.disconnected_at is not None
    assert record.disconnected_at - closed_at < 0.5


# -- streaming, sync and async -------------------------------------------------------------


def test_sync_stream_halts_and_closes_upstream(upstream_server: UpstreamServer,
                                               make_guard: Callable[..., Guard],
                                               halt_message: str) -> None:
    upstream_server.enqueue(Script(text=HARMFUL, delay=DELAY))
    client = make_guard().wrap(openai.OpenAI(base_url=upstream_server.base_url, api_key="k"))
    stream = client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    chunks = []
    for chunk in stream:
        chunks.append(chunk)
        if chunk.choices and chunk.choices[0].finish_reason == "content_filter":
            seen_at = time.monotonic()
    _assert_halted_stream(chunks, halt_message)
    _assert_upstream_stopped(upstream_server, seen_at)
    assert stream.reports[0].halted


async def test_async_stream_halts_and_closes_upstream(upstream_server: UpstreamServer,
                                                      make_guard: Callable[..., Guard],
                                                      halt_message: str) -> None:
    upstream_server.enqueue(Script(text=HARMFUL, delay=DELAY))
    client = make_guard().wrap(openai.AsyncOpenAI(base_url=upstream_server.base_url,
                                                  api_key="k"))
    stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    chunks = []
    async with stream:
        async for chunk in stream:
            chunks.append(chunk)
    seen_at = time.monotonic()
    _assert_halted_stream(chunks, halt_message)
    _assert_upstream_stopped(upstream_server, seen_at)


def test_benign_stream_arrives_whole_and_held_back(upstream_server: UpstreamServer,
                                                   make_guard: Callable[..., Guard]) -> None:
    hold_back = 4
    upstream_server.enqueue(Script(text=BENIGN, delay=DELAY))
    client = make_guard(hold_back).wrap(openai.OpenAI(base_url=upstream_server.base_url,
                                                      api_key="k"))
    record_at_first_text = None
    chunks = []
    with client.chat.completions.create(model="m", messages=MESSAGES, stream=True) as stream:
        for chunk in stream:
            if _content([chunk]) and record_at_first_text is None:
                record_at_first_text = upstream_server.completions()[-1].chunks_written
            chunks.append(chunk)
    assert _content(chunks) == BENIGN
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[0].choices[0].delta.role == "assistant"
    # Nothing is shown before hold_back newer words exist (role chunk + hold_back + 1 words).
    assert record_at_first_text is not None and record_at_first_text >= hold_back + 2
    record = upstream_server.completions()[-1]
    assert record.wait() and record.completed and not record.disconnected


def test_usage_chunk_passes_through(upstream_server: UpstreamServer,
                                    make_guard: Callable[..., Guard]) -> None:
    upstream_server.enqueue(Script(text=BENIGN))
    client = make_guard().wrap(openai.OpenAI(base_url=upstream_server.base_url, api_key="k"))
    chunks = list(client.chat.completions.create(
        model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert _content(chunks) == BENIGN


def test_reader_break_closes_upstream(upstream_server: UpstreamServer,
                                      make_guard: Callable[..., Guard]) -> None:
    upstream_server.enqueue(Script(text=BENIGN, delay=DELAY))
    client = make_guard().wrap(openai.OpenAI(base_url=upstream_server.base_url, api_key="k"))
    for n, _chunk in enumerate(client.chat.completions.create(model="m", messages=MESSAGES,
                                                              stream=True)):
        if n == 2:
            break
    record = upstream_server.completions()[-1]
    assert record.wait(5) and record.disconnected
    assert record.chunks_written < record.chunks_planned


def test_raise_on_halt_raises_after_closing(upstream_server: UpstreamServer,
                                            make_guard: Callable[..., Guard]) -> None:
    upstream_server.enqueue(Script(text=HARMFUL, delay=DELAY))
    client = make_guard(raise_on_halt=True).wrap(
        openai.OpenAI(base_url=upstream_server.base_url, api_key="k"))
    shown = []
    with pytest.raises(GuardrailViolation) as info:
        for chunk in client.chat.completions.create(model="m", messages=MESSAGES, stream=True):
            shown.append(chunk)
    assert all(c.choices[0].finish_reason != "content_filter" for c in shown)
    assert info.value.released == _content(shown)
    assert info.value.halt.monitor == "weapons"
    _assert_upstream_stopped(upstream_server, time.monotonic())


def test_wrap_override_of_raise_on_halt(upstream_server: UpstreamServer,
                                        make_guard: Callable[..., Guard]) -> None:
    upstream_server.enqueue(Script(text=HARMFUL))
    client = make_guard().wrap(openai.OpenAI(base_url=upstream_server.base_url, api_key="k"),
                               raise_on_halt=True)
    with pytest.raises(GuardrailViolation):
        client.chat.completions.create(model="m", messages=MESSAGES)


def test_flags_ride_on_chunks(upstream_server: UpstreamServer,
                              make_guard: Callable[..., Guard]) -> None:
    upstream_server.enqueue(Script(text="We build bridges and roads across the valley."))
    client = make_guard().wrap(openai.OpenAI(base_url=upstream_server.base_url, api_key="k"))
    chunks = list(client.chat.completions.create(model="m", messages=MESSAGES, stream=True))
    events = [e for c in chunks for e in (getattr(c, "guardrail", None) or {}).get("events", [])]
    assert [(e["kind"], e["monitor"]) for e in events] == [("flag", "verbs")]
    assert _content(chunks) == "We build bridges and roads across the valley."
    assert all(c.choices for c in chunks)  # no chunk without a choice reaches the reader


def test_redaction_is_applied_in_the_stream(upstream_server: UpstreamServer,
                                            make_guard: Callable[..., Guard]) -> None:
    redact = {"id": "pii", "use": "regex", "options": {"patterns": [r"\d{3}-\d{4}"]},
              "action": "redact"}
    upstream_server.enqueue(Script(text="Call me at 555-1234 tomorrow after lunch please."))
    client = make_guard(3, extra=[redact]).wrap(
        openai.OpenAI(base_url=upstream_server.base_url, api_key="k"))
    chunks = list(client.chat.completions.create(model="m", messages=MESSAGES, stream=True))
    assert _content(chunks) == "Call me at [REDACTED] tomorrow after lunch please."


# -- logprobs and tool calls ---------------------------------------------------------------


def test_logprobs_reach_monitors_and_stay_with_their_text(upstream_server: UpstreamServer,
                                                          logprob_guard: Guard) -> None:
    words = split_words(BENIGN)
    logprobs = [-0.2] * len(words)
    logprobs[8] = -9.0
    upstream_server.enqueue(Script(text=BENIGN, logprobs=logprobs))
    client = logprob_guard.wrap(openai.OpenAI(base_url=upstream_server.base_url, api_key="k"))
    chunks = list(client.chat.completions.create(model="m", messages=MESSAGES, stream=True,
                                                 logprobs=True, top_logprobs=2))
    assert chunks[-1].choices[0].delta.content == "\n\nlow confidence"
    shown = _content(chunks[:-1])
    assert shown and BENIGN.startswith(shown) and len(shown) < len("".join(words[:9]))
    # Logprobs go out with the text they belong to, never ahead of it.
    tokens = [e.token for c in chunks for e in ((c.choices[0].logprobs and
                                                 c.choices[0].logprobs.content) or [])]
    assert "".join(tokens) == shown


def test_tool_call_deltas_pass_untouched(upstream_server: UpstreamServer,
                                         make_guard: Callable[..., Guard]) -> None:
    args = '{"city": "Paris", "unit": "celsius"}'
    upstream_server.enqueue(Script(text="Let me check the weather.",
                                   tool_calls=[ToolCall("get_weather", args, id="call_w")]))
    client = make_guard().wrap(openai.OpenAI(base_url=upstream_server.base_url, api_key="k"))
    chunks = list(client.chat.completions.create(model="m", messages=MESSAGES, stream=True))
    calls = [t for c in chunks for t in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].id == "call_w" and calls[0].function.name == "get_weather"
    assert "".join(t.function.arguments or "" for t in calls) == args
    assert _content(chunks) == "Let me check the weather."
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


# -- non-streaming -------------------------------------------------------------------------


def test_non_stream_halt_replaces_content(upstream_server: UpstreamServer,
                                          make_guard: Callable[..., Guard],
                                          halt_message: str) -> None:
    upstream_server.enqueue(Script(text=HARMFUL, tool_calls=[ToolCall("do_it")]),
                            Script(text=BENIGN))
    client = make_guard().wrap(openai.OpenAI(base_url=upstream_server.base_url, api_key="k"))
    halted = client.chat.completions.create(model="m", messages=MESSAGES)
    assert isinstance(halted, ChatCompletion)
    assert halted.choices[0].message.content == halt_message
    assert halted.choices[0].finish_reason == "content_filter"
    assert halted.choices[0].message.tool_calls is None
    fine = client.chat.completions.create(model="m", messages=MESSAGES)
    assert fine.choices[0].message.content == BENIGN
    assert fine.choices[0].finish_reason == "stop"


async def test_async_non_stream(upstream_server: UpstreamServer,
                                make_guard: Callable[..., Guard], halt_message: str) -> None:
    upstream_server.enqueue(Script(text=HARMFUL), Script(text=BENIGN))
    client = make_guard().wrap(openai.AsyncOpenAI(base_url=upstream_server.base_url,
                                                  api_key="k"))
    halted = await client.chat.completions.create(model="m", messages=MESSAGES)
    fine = await client.chat.completions.create(model="m", messages=MESSAGES)
    assert halted.choices[0].message.content == halt_message
    assert fine.choices[0].message.content == BENIGN


# -- the .stream() helper and delegation ----------------------------------------------------


def test_stream_helper_is_guarded(upstream_server: UpstreamServer,
                                  make_guard: Callable[..., Guard], halt_message: str) -> None:
    upstream_server.enqueue(Script(text=HARMFUL, delay=DELAY))
    client = make_guard().wrap(openai.OpenAI(base_url=upstream_server.base_url, api_key="k"))
    with client.chat.completions.stream(model="m", messages=MESSAGES) as stream:
        deltas = [e.delta for e in stream if e.type == "content.delta"]
        # As with OpenAI's own content filter, the helper refuses to build a final completion.
        with pytest.raises(openai.ContentFilterFinishReasonError):
            stream.get_final_completion()
    assert deltas[-1] == "\n\n" + halt_message and "bomb" not in "".join(deltas)
    _assert_upstream_stopped(upstream_server, time.monotonic())


async def test_async_stream_helper_is_guarded(upstream_server: UpstreamServer,
                                              make_guard: Callable[..., Guard],
                                              halt_message: str) -> None:
    upstream_server.enqueue(Script(text=HARMFUL, delay=DELAY))
    client = make_guard().wrap(openai.AsyncOpenAI(base_url=upstream_server.base_url,
                                                  api_key="k"))
    async with client.chat.completions.stream(model="m", messages=MESSAGES) as stream:
        deltas = [e.delta async for e in stream if e.type == "content.delta"]
    assert deltas[-1] == "\n\n" + halt_message
    _assert_upstream_stopped(upstream_server, time.monotonic())


def test_everything_else_delegates(upstream_server: UpstreamServer,
                                   make_guard: Callable[..., Guard]) -> None:
    real = openai.OpenAI(base_url=upstream_server.base_url, api_key="secret-key")
    client = make_guard().wrap(real)
    assert [m.id for m in client.models.list()] == ["scripted-model"]
    assert client.unwrapped is real and client.api_key == "secret-key"
    narrowed = client.with_options(timeout=5)
    upstream_server.enqueue(Script(text=HARMFUL))
    halted = narrowed.chat.completions.create(model="m", messages=MESSAGES)
    assert halted.choices[0].finish_reason == "content_filter"
    assert upstream_server.completions()[-1].headers["authorization"] == "Bearer secret-key"


def test_each_choice_has_its_own_guard(upstream_server: UpstreamServer,
                                       make_guard: Callable[..., Guard],
                                       halt_message: str) -> None:
    upstream_server.enqueue(Script(text=BENIGN), Script(text=HARMFUL, delay=DELAY / 2))
    client = make_guard().wrap(openai.OpenAI(base_url=upstream_server.base_url, api_key="k"))
    chunks = list(client.chat.completions.create(model="m", messages=MESSAGES, stream=True, n=2))
    for index in (0, 1):
        mine = [c for c in chunks if c.choices[0].index == index]
        assert _content(mine) == BENIGN and mine[-1].choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model="m", messages=MESSAGES, stream=True, n=2))
    for index in (0, 1):
        mine = [c for c in chunks if c.choices[0].index == index]
        assert mine[-1].choices[0].delta.content == ("\n\n" if _content(mine[:-1]) else "") \
            + halt_message
        assert mine[-1].choices[0].finish_reason == "content_filter"
    record = upstream_server.completions()[-1]
    assert record.wait(5) and record.disconnected  # closed once both choices halted
    assert record.chunks_written < record.chunks_planned


@pytest.mark.parametrize("offload", [True, False])
async def test_offload_keeps_the_event_loop_free(upstream_server: UpstreamServer,
                                                 blocking_guard: Any, offload: bool) -> None:
    guard, ticker, monitor = blocking_guard(offload)
    upstream_server.enqueue(Script(text="one two three four"))
    client = guard.wrap(openai.AsyncOpenAI(base_url=upstream_server.base_url, api_key="k"),
                        offload=offload)
    async with ticker:
        stream = await client.chat.completions.create(model="m", messages=[], stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream])
    assert text == "one two three four" and monitor.seen
    if offload:  # the loop kept turning while every update held its worker thread
        assert min(monitor.seen) >= monitor.turns
    else:  # inline, an update holds the loop itself: what offload is for
        assert max(monitor.seen) == 0


# -- secrets -------------------------------------------------------------------------------

SECRET = "sk-test-0123456789abcdefSECRET"


async def test_the_api_key_reaches_no_event_report_audit_log_or_error(
        upstream_server: UpstreamServer, tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    caplog.set_level(logging.DEBUG)
    audit = tmp_path / "audit.jsonl"
    guard = Guard.from_policy({
        "audit": {"path": str(audit)},
        "monitors": [{"id": "weapons", "use": "keywords", "options": {"words": ["bomb"]},
                      "action": "halt"}]})
    client = guard.wrap(openai.AsyncOpenAI(base_url=upstream_server.base_url, api_key=SECRET))
    upstream_server.enqueue(Script(text=HARMFUL))
    stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    seen = [chunk.model_dump_json() async for chunk in stream]
    upstream_server.enqueue(Script(status=401, error_message="invalid key"))
    with pytest.raises(openai.AuthenticationError) as failed:
        await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    assert upstream_server.completions()[0].headers["authorization"] == f"Bearer {SECRET}"
    visible = "\n".join([*seen, repr(stream.reports), str(failed.value), repr(failed.value),
                         audit.read_text(), caplog.text])
    assert "halt" in audit.read_text()
    assert SECRET not in visible and SECRET[:12] not in visible


def test_drivers_that_cannot_route_say_so_when_the_policy_routes(
        caplog: pytest.LogCaptureFixture) -> None:
    from guardrail_server import create_app

    from guardrail.testing import ScriptedMonitor, plugin_monitors

    route = {"id": "escalate", "use": "unsure", "action": "route",
             "route_to": {"model": "large", "base_url": "http://127.0.0.1:9/v1"}}
    flag = {"id": "note", "use": "unsure", "action": "flag"}
    with plugin_monitors(unsure=ScriptedMonitor.factory({"x": 1.0})) as host:
        routing = Guard.from_policy({"version": 1, "monitors": [route, flag]}, host=host)
        flagging = Guard.from_policy({"version": 1, "monitors": [flag]}, host=host)
        client = openai.OpenAI(base_url="http://127.0.0.1:9/v1", api_key="k")
        with caplog.at_level("WARNING", logger="guardrail.guard"):
            flagging.wrap(client)
            flagging.as_runnable()
            create_app(flagging, upstream="http://127.0.0.1:9/v1")
            assert caplog.records == []
            routing.wrap(client)
            routing.as_runnable()
            create_app(routing, upstream="http://127.0.0.1:9/v1")
    drivers = [r.getMessage().split(" records")[0] for r in caplog.records]
    assert drivers == ["the OpenAI client wrapper", "the LangChain runnable", "the proxy server"]
    assert all("'escalate'" in r.getMessage() and "'note'" not in r.getMessage()
               for r in caplog.records)
