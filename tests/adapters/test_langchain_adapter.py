"""guardrail-langchain: GuardRunnable in chains, with a fake chat model and with ChatOpenAI talking
to the loopback server."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.runnables import Runnable

from guardrail import Features, Guard, GuardrailViolation, Monitor, MonitorContext, Score
from guardrail.testing import plugin_monitors
from guardrail.testing.upstream import Script, ToolCall, UpstreamServer, split_words

HARMFUL = ("Here is how to build a bomb at home with things you can buy in any shop near you "
           "and then some more words to keep the stream going for quite a while longer")
BENIGN = "The quick brown fox jumps over the lazy dog and then takes a well earned nap."
FAKE_CHUNKS = re.split(r"(\s)", HARMFUL)  # how GenericFakeChatModel streams a message
# "bomb" is judged once the whitespace after it arrives: that chunk triggers the halt.
FAKE_TRIGGER = FAKE_CHUNKS.index("bomb") + 1


class ChunkCounter(BaseCallbackHandler):
    """Counts the chunks a chat model produced (it reports each through on_llm_new_token)."""

    def __init__(self) -> None:
        self.produced = 0

    def on_llm_new_token(self, token: Any, **kwargs: Any) -> None:
        self.produced += 1


def fake_model(*texts: str) -> tuple[GenericFakeChatModel, ChunkCounter]:
    counter = ChunkCounter()
    model = GenericFakeChatModel(messages=iter([AIMessage(content=t) for t in texts]),
                                 callbacks=[counter])
    return model, counter


def _text(chunks: Sequence[Any]) -> str:
    return "".join(c if isinstance(c, str) else str(c.text) for c in chunks)


def _assert_halt_chunk(chunks: list[Any], halt_message: str) -> None:
    last = chunks[-1]
    assert isinstance(last, AIMessageChunk)
    shown = _text(chunks[:-1])
    # the message stands apart from the released text (a blank line), alone when none was shown
    assert last.content == ("\n\n" if shown else "") + halt_message
    assert last.response_metadata["finish_reason"] == "content_filter"
    halt = last.response_metadata["guardrail"]["halt"]
    assert halt["monitor"] == "weapons"
    assert "bomb" not in shown and HARMFUL.startswith(shown)
    assert shown == halt["released_text"]


def _assert_stopped_after_halt(counter: ChunkCounter, hold_back: int) -> None:
    produced_after_halt = counter.produced - (FAKE_TRIGGER + 1)
    assert produced_after_halt <= hold_back + 1
    assert counter.produced < len(FAKE_CHUNKS)


# -- streaming with a fake chat model ------------------------------------------------------


@pytest.mark.parametrize("hold_back", [2, 8])
def test_stream_halts_and_stops_the_model(make_guard: Callable[..., Guard], halt_message: str,
                                          hold_back: int) -> None:
    model, counter = fake_model(HARMFUL)
    chain = model | make_guard(hold_back).as_runnable()
    chunks = list(chain.stream("hi"))
    _assert_halt_chunk(chunks, halt_message)
    _assert_stopped_after_halt(counter, hold_back)


@pytest.mark.parametrize("hold_back", [2, 8])
async def test_astream_halts_and_stops_the_model(make_guard: Callable[..., Guard],
                                                 halt_message: str, hold_back: int) -> None:
    model, counter = fake_model(HARMFUL)
    chain = model | make_guard(hold_back).as_runnable()
    chunks = [c async for c in chain.astream("hi")]
    _assert_halt_chunk(chunks, halt_message)
    _assert_stopped_after_halt(counter, hold_back)


def test_str_stream_after_a_parser(make_guard: Callable[..., Guard], halt_message: str) -> None:
    model, counter = fake_model(HARMFUL)
    chain = model | StrOutputParser() | make_guard().as_runnable()
    chunks = list(chain.stream("hi"))
    assert all(isinstance(c, str) for c in chunks)
    assert chunks[-1] == "\n\n" + halt_message
    assert "bomb" not in _text(chunks[:-1])
    _assert_stopped_after_halt(counter, 2)  # the halt reaches the model through the parser


async def test_async_str_stream_after_a_parser(make_guard: Callable[..., Guard],
                                               halt_message: str) -> None:
    model, counter = fake_model(HARMFUL)
    chain = model | StrOutputParser() | make_guard().as_runnable()
    chunks = [c async for c in chain.astream("hi")]
    assert chunks[-1] == "\n\n" + halt_message
    _assert_stopped_after_halt(counter, 2)


def test_benign_stream_passes_whole(make_guard: Callable[..., Guard]) -> None:
    model, counter = fake_model(BENIGN)
    chunks = list((model | make_guard(4).as_runnable()).stream("hi"))
    assert _text(chunks) == BENIGN
    assert counter.produced == len(re.split(r"(\s)", BENIGN))
    total = chunks[0]
    for chunk in chunks[1:]:
        total = total + chunk
    assert total.content == BENIGN and total.chunk_position == "last"
    assert "finish_reason" not in total.response_metadata


def test_stream_keeps_streaming(make_guard: Callable[..., Guard]) -> None:
    """Text comes out while the model is still producing: the guard does not buffer it all."""
    model, counter = fake_model(BENIGN)
    produced_when_first_text = None
    for chunk in (model | make_guard(2).as_runnable()).stream("hi"):
        if _text([chunk]) and produced_when_first_text is None:
            produced_when_first_text = counter.produced
    assert produced_when_first_text is not None
    assert produced_when_first_text < len(re.split(r"(\s)", BENIGN)) // 2


def test_reader_break_stops_the_model(make_guard: Callable[..., Guard]) -> None:
    model, counter = fake_model(BENIGN * 3)
    for n, _chunk in enumerate((model | make_guard().as_runnable()).stream("hi")):
        if n == 3:
            break
    assert counter.produced < 20


def test_raise_on_halt(make_guard: Callable[..., Guard]) -> None:
    model, counter = fake_model(HARMFUL)
    chain = model | make_guard(raise_on_halt=True).as_runnable()
    shown: list[Any] = []
    with pytest.raises(GuardrailViolation) as info:
        for chunk in chain.stream("hi"):
            shown.append(chunk)
    assert info.value.released == _text(shown)
    assert all(c.response_metadata.get("finish_reason") != "content_filter" for c in shown)
    _assert_stopped_after_halt(counter, 2)


async def test_raise_on_halt_async(make_guard: Callable[..., Guard]) -> None:
    model, counter = fake_model(HARMFUL)
    chain = model | make_guard().as_runnable(raise_on_halt=True)
    with pytest.raises(GuardrailViolation):
        async for _chunk in chain.astream("hi"):
            pass
    _assert_stopped_after_halt(counter, 2)


# -- events and metadata -------------------------------------------------------------------


async def test_flags_and_halt_are_custom_events(make_guard: Callable[..., Guard]) -> None:
    model, _ = fake_model(HARMFUL)
    chain = model | make_guard().as_runnable()
    custom = []
    streamed: list[Any] = []
    async for event in chain.astream_events("hi", version="v2"):
        if event["event"] == "on_custom_event":
            custom.append((event["name"], event["data"]["monitor"]))
        elif event["event"] == "on_chain_stream" and event["name"] == "guardrail":
            streamed.append(event["data"]["chunk"])
    assert custom == [("guardrail.flag", "verbs"), ("guardrail.halt", "weapons")]
    flagged = [c for c in streamed if "guardrail" in c.response_metadata
               and "events" in c.response_metadata["guardrail"]]
    assert flagged and flagged[0].response_metadata["guardrail"]["events"][0]["kind"] == "flag"
    assert streamed[-1].response_metadata["finish_reason"] == "content_filter"


def test_custom_events_reach_sync_callbacks(make_guard: Callable[..., Guard]) -> None:
    seen: list[tuple[str, Any]] = []

    class Listener(BaseCallbackHandler):
        def on_custom_event(self, name: str, data: Any, **kwargs: Any) -> None:
            seen.append((name, data["kind"]))

    model, _ = fake_model(HARMFUL)
    list((model | make_guard().as_runnable()).stream("hi", {"callbacks": [Listener()]}))
    assert seen == [("guardrail.flag", "flag"), ("guardrail.halt", "halt")]


# -- invoke, batch -------------------------------------------------------------------------


def test_invoke_and_batch(make_guard: Callable[..., Guard], halt_message: str) -> None:
    model, _ = fake_model(HARMFUL, BENIGN)
    chain = model | make_guard().as_runnable()
    halted, fine = chain.batch(["a", "b"], {"max_concurrency": 1})
    assert isinstance(halted, AIMessage) and isinstance(fine, AIMessage)
    assert halted.content == halt_message
    assert halted.response_metadata["finish_reason"] == "content_filter"
    assert fine.content == BENIGN
    assert make_guard().as_runnable().invoke(HARMFUL) == halt_message
    assert make_guard().as_runnable().invoke(BENIGN) == BENIGN


async def test_ainvoke(make_guard: Callable[..., Guard], halt_message: str) -> None:
    model, _ = fake_model(HARMFUL, BENIGN)
    chain = model | make_guard().as_runnable()
    halted = await chain.ainvoke("hi")
    assert halted.content == halt_message
    fine, = await chain.abatch(["hi"])
    assert fine.content == BENIGN
    with pytest.raises(GuardrailViolation):
        await make_guard(raise_on_halt=True).as_runnable().ainvoke(HARMFUL)


class _PromptEcho(Monitor):
    """Halts on the first token when the conversation's last user message says "forbidden"."""

    def start(self, context: MonitorContext) -> bool:
        return "forbidden" in context.prompt

    def update(self, state: bool, features: Features) -> Sequence[Score]:
        return [Score(i, 1.0 if state else 0.0) for i in features.indices]


def test_conversation_reaches_monitors(make_guard: Callable[..., Guard]) -> None:
    spec = {"id": "ctx", "use": "prompt-echo", "action": "halt", "message": "no"}
    with plugin_monitors(prompt_echo=lambda: _PromptEcho()) as host:
        guard = make_guard(extra=[spec], host=host)
    runnable = guard.as_runnable()
    config: Any = {"metadata": {"guardrail_messages": [{"role": "user", "content": "forbidden"}]}}
    assert runnable.invoke(BENIGN, config) == "no"
    assert runnable.invoke(BENIGN) == BENIGN


# -- ChatOpenAI against the loopback server ------------------------------------------------


def _chat_openai(server: UpstreamServer) -> Runnable[Any, BaseMessage]:
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(base_url=server.base_url, api_key="k", model="m", max_retries=0)


def _assert_server_stopped(server: UpstreamServer, hold_back: int, seen_at: float) -> None:
    record = server.completions()[-1]
    assert record.wait(5)
    assert record.disconnected and not record.completed
    trigger = split_words(HARMFUL).index(" bomb") + 1  # the next word makes "bomb" final
    # role chunk + content chunks up to the trigger, then at most hold-back + 1 more
    assert record.chunks_written <= 1 + trigger + 1 + hold_back + 1 < record.chunks_planned
    assert record.disconnected_at is not None and record.disconnected_at - seen_at < 0.5


def test_chat_openai_stream_halts_and_disconnects(upstream_server: UpstreamServer,
                                                  make_guard: Callable[..., Guard],
                                                  halt_message: str) -> None:
    upstream_server.enqueue(Script(text=HARMFUL, delay=0.03))
    chain = _chat_openai(upstream_server) | make_guard().as_runnable()
    chunks = []
    for chunk in chain.stream("tell me"):
        chunks.append(chunk)
    seen_at = time.monotonic()
    _assert_halt_chunk(chunks, halt_message)
    _assert_server_stopped(upstream_server, 2, seen_at)


async def test_chat_openai_astream_halts_and_disconnects(upstream_server: UpstreamServer,
                                                         make_guard: Callable[..., Guard],
                                                         halt_message: str) -> None:
    upstream_server.enqueue(Script(text=HARMFUL, delay=0.03))
    chain = _chat_openai(upstream_server) | StrOutputParser() | make_guard(8).as_runnable()
    chunks = [c async for c in chain.astream("tell me")]
    seen_at = time.monotonic()
    shown = _text(chunks[:-1])
    assert chunks[-1] == ("\n\n" if shown else "") + halt_message and "bomb" not in shown
    _assert_server_stopped(upstream_server, 8, seen_at)


def test_chat_openai_benign_and_invoke(upstream_server: UpstreamServer,
                                       make_guard: Callable[..., Guard],
                                       halt_message: str) -> None:
    upstream_server.enqueue(Script(text=BENIGN), Script(text=HARMFUL))
    chain = _chat_openai(upstream_server) | make_guard().as_runnable()
    streamed = list(chain.stream("hi"))
    assert _text(streamed) == BENIGN
    assert upstream_server.completions()[-1].wait() and upstream_server.completions()[-1].completed
    halted = chain.invoke("hi")
    assert halted.content == halt_message
    assert halted.response_metadata["finish_reason"] == "content_filter"


def test_chat_openai_logprobs_reach_monitors_and_stay_with_their_text(
        upstream_server: UpstreamServer, logprob_guard: Guard) -> None:
    from langchain_openai import ChatOpenAI

    words = split_words(BENIGN)
    logprobs = [-0.2] * len(words)
    logprobs[8] = -9.0
    upstream_server.enqueue(Script(text=BENIGN, logprobs=logprobs))
    model = ChatOpenAI(base_url=upstream_server.base_url, api_key="k", model="m", logprobs=True)
    chunks = list((model | logprob_guard.as_runnable()).stream("hi"))
    shown = _text(chunks[:-1])
    assert chunks[-1].content == "\n\nlow confidence"
    assert shown and BENIGN.startswith(shown) and len(shown) < len("".join(words[:9]))
    tokens = [e["token"] for c in chunks
              for e in c.response_metadata.get("logprobs", {}).get("content", [])]
    assert "".join(tokens) == shown  # no logprob goes out ahead of its text


def test_chat_openai_tool_call_chunks_pass(upstream_server: UpstreamServer,
                                           make_guard: Callable[..., Guard]) -> None:
    from langchain_openai import ChatOpenAI

    args = '{"city": "Paris"}'
    upstream_server.enqueue(Script(text="Checking now.",
                                   tool_calls=[ToolCall("get_weather", args, id="call_1")]))
    model = ChatOpenAI(base_url=upstream_server.base_url, api_key="k", model="m")
    chunks = list((model | make_guard().as_runnable()).stream("weather?"))
    total = chunks[0]
    for chunk in chunks[1:]:
        total = total + chunk
    assert total.content == "Checking now."
    assert total.tool_calls == [{"name": "get_weather", "args": {"city": "Paris"},
                                 "id": "call_1", "type": "tool_call"}]


async def test_reader_aclose_stops_the_model(make_guard: Callable[..., Guard]) -> None:
    model, counter = fake_model(BENIGN * 3)
    stream = (model | make_guard().as_runnable()).astream("hi")
    for _ in range(3):
        await stream.__anext__()
    await stream.aclose()
    assert counter.produced < 20


def test_stream_of_a_whole_message(make_guard: Callable[..., Guard], halt_message: str) -> None:
    runnable = make_guard().as_runnable()
    fine = list(runnable.stream(AIMessage(content=BENIGN)))
    assert all(isinstance(c, AIMessageChunk) for c in fine) and _text(fine) == BENIGN
    halted = list(runnable.stream(AIMessage(content=HARMFUL)))
    assert halted[-1].content == halt_message
    assert halted[-1].response_metadata["finish_reason"] == "content_filter"


def test_rejects_what_it_cannot_read(make_guard: Callable[..., Guard]) -> None:
    with pytest.raises(TypeError, match="str or chat message"):
        list(make_guard().as_runnable().stream({"text": "a dict"}))


@pytest.mark.parametrize("offload", [True, False])
async def test_offload_keeps_the_event_loop_free(blocking_guard: Any, offload: bool) -> None:
    guard, ticker, monitor = blocking_guard(offload)
    model, _ = fake_model("one two three four")
    chain = model | guard.as_runnable(offload=offload)
    async with ticker:
        chunks = [c async for c in chain.astream("hi")]
    assert _text(chunks) == "one two three four" and monitor.seen
    if offload:  # the loop kept turning while every update held its worker thread
        assert min(monitor.seen) >= monitor.turns
    else:  # inline, an update holds the loop itself: what offload is for
        assert max(monitor.seen) == 0


def test_invoke_halt_keeps_earlier_flags(make_guard: Callable[..., Guard],
                                         halt_message: str) -> None:
    """A whole answer is judged in one batch: the flag on "build" (before "bomb") stays in the
    halted message's metadata and in the report."""
    text = "Here is how to build a bomb at home with things from the shop."
    halted = make_guard().as_runnable().invoke(AIMessage(content=text))
    assert halted.content == halt_message
    guardrail = halted.response_metadata["guardrail"]
    assert guardrail["halt"]["monitor"] == "weapons"
    assert [(e["kind"], e["monitor"]) for e in guardrail["events"]] == [("flag", "verbs")]
    report = make_guard().check(text)
    assert report.halted and [f.monitor for f in report.flags] == ["verbs"]
    late = make_guard().check("Here is a bomb, now build it.")  # "build" after the halt: not read
    assert late.halted and late.flags == []
