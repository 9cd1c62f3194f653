"""Async drivers await the observer's reads and, when behind their upstream, take the chunks that
arrived meanwhile in one go: the client sees what the sync driver (one chunk at a time) shows,
the halt lands on the same token, the reads are fewer, and the event loop runs during a read."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from guardrail import Guard
from guardrail.catch_up import catch_up
from guardrail.testing import WordEndMonitor, plugin_monitors
from guardrail.testing.upstream import Script, UpstreamServer

pytest.importorskip("torch")
pytest.importorskip("transformers")

TEXT = ("The guide walked us along the river and past the mill, then someone asked how to "
        "build a bomb and the guide said no, and we all went on to the church and the market "
        "and the station and home again by the evening train through the hills.")
CALM = TEXT.replace("bomb", "kite")
PROMPT = [{"role": "user", "content": "Tell me about the trip."}]


@pytest.fixture(scope="module")
def observer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from guardrail.observer.hf import load_model_dir
    from guardrail.testing.tiny_models import build_tiny_model

    path = build_tiny_model(tmp_path_factory.mktemp("models") / "llama", arch="llama")
    return load_model_dir(Path(path), name="tiny-llama", window=4096)


@pytest.fixture
def guard(observer: Any) -> Iterator[Guard]:
    policy = {
        # reads only when due (not sent ahead): the chunks' releases do not depend on timing
        "observer": {"max_delay_ms": 60_000, "read_ahead": False},
        "release": {"hold_back_tokens": 4},
        "monitors": [{"id": "weapons", "use": "bomb-end", "threshold": 0.5, "action": "halt",
                      "message": "no"}],
    }
    with plugin_monitors(bomb_end=WordEndMonitor.factory("bomb")) as host:
        yield Guard.from_policy(policy, host=host, observer=observer)


class Held:
    """The guard's scheduler held (its reads wait) until ``release``, or a watchdog's 20 s: a
    blocked event loop could never release it itself."""

    def __init__(self, guard: Guard) -> None:
        self._hold = guard.observer.hold()
        self._hold.__enter__()
        self._lock = threading.Lock()
        self._held = True
        self._watchdog = threading.Timer(20.0, self.release)
        self._watchdog.start()

    def release(self) -> None:
        self._watchdog.cancel()
        with self._lock:
            if self._held:
                self._held = False
                self._hold.__exit__(None, None, None)


def _sync_run(guard: Guard, server: UpstreamServer, text: str) -> tuple[list[Any], Any]:
    server.enqueue(Script(text=text))
    client = guard.wrap(openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0))
    stream = client.chat.completions.create(model="m", stream=True, messages=PROMPT)
    chunks = list(stream)
    return chunks, stream.reports[0]


def _seen(chunks: list[Any]) -> list[tuple[Any, ...]]:
    """What the reader gets, chunk by chunk (the guard's events without timing)."""
    out = []
    for c in chunks:
        choice = c.choices[0] if c.choices else None
        events = [(e["kind"], e.get("at"), e.get("released_text"))
                  for e in (getattr(c, "guardrail", None) or {}).get("events", [])]
        out.append((choice.delta.content if choice else None,
                    choice.finish_reason if choice else None, events))
    return out


@pytest.mark.parametrize("text", [TEXT, CALM])
async def test_async_stream_catching_up_shows_what_the_sync_stream_shows(
        guard: Guard, upstream_server: UpstreamServer, text: str) -> None:
    sync_chunks, sync_report = await asyncio.to_thread(_sync_run, guard, upstream_server, text)
    upstream_server.enqueue(Script(text=text))  # written at once: the guard is behind at once
    client = guard.wrap(openai.AsyncOpenAI(base_url=upstream_server.base_url, api_key="k",
                                           max_retries=0))
    held = Held(guard)  # the first read waits until every chunk has arrived
    stream = await client.chat.completions.create(model="m", stream=True, messages=PROMPT)
    record = upstream_server.completions()[-1]
    reading = asyncio.ensure_future(_collect(stream))
    while not record.completed and not record.disconnected:
        await asyncio.sleep(0.01)
    held.release()
    chunks = await reading
    report = stream.reports[0]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        "".join(c.choices[0].delta.content or "" for c in sync_chunks if c.choices)
    assert (report.halted, report.released_text, report.tokens) == (
        sync_report.halted, sync_report.released_text, sync_report.tokens)
    if text == TEXT:
        assert report.halt.at == sync_report.halt.at and report.leaked_tokens == 0
        assert _seen(chunks)[-1] == _seen(sync_chunks)[-1]  # the same halt chunk
    else:
        assert _seen(chunks) == _seen(sync_chunks)  # chunk for chunk: catching up shows nothing
    assert report.observer_reads < sync_report.observer_reads  # reads of a catch-up shared


async def _collect(stream: Any) -> list[Any]:
    async with stream:
        return [chunk async for chunk in stream]


async def test_async_stream_leaves_the_loop_free_while_a_read_waits(
        guard: Guard, upstream_server: UpstreamServer) -> None:
    """Not offloaded to a thread: the read is awaited, so a ticker keeps ticking while the
    scheduler holds it, and the stream goes on once it is let go."""
    upstream_server.enqueue(Script(text=CALM))
    client = guard.wrap(openai.AsyncOpenAI(base_url=upstream_server.base_url, api_key="k",
                                           max_retries=0), offload=False)
    held = Held(guard)
    stream = await client.chat.completions.create(model="m", stream=True, messages=PROMPT)
    reading = asyncio.ensure_future(_collect(stream))
    ticks = 0
    while guard.observer.pending() == 0 and not reading.done():
        await asyncio.sleep(0.005)  # until a read is queued behind the hold
    while ticks < 20 and not reading.done():
        await asyncio.sleep(0.005)
        ticks += 1
    done_while_held = reading.done()
    held.release()
    chunks = await reading
    assert not done_while_held and ticks == 20
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == CALM


async def test_catch_up_takes_what_arrived_and_no_more_than_its_limit() -> None:
    async def source() -> Any:
        for i in range(10):  # everything is there at once
            yield i

    got = []
    async for batch in catch_up(source(), 3):
        got.append(batch)
        await asyncio.sleep(0.01)  # a busy driver: the rest arrives meanwhile
    assert [i for b in got for i in b] == list(range(10))
    assert max(len(b) for b in got) == 3 and len(got) <= 5


async def test_catch_up_raises_the_source_error_after_its_items() -> None:
    async def source() -> Any:
        yield 1
        yield 2
        raise RuntimeError("upstream dropped")

    seen: list[int] = []
    with pytest.raises(RuntimeError, match="upstream dropped"):
        async for batch in catch_up(source(), 5):
            seen += batch
    assert seen == [1, 2]


def test_catch_up_limit_is_checked() -> None:
    with pytest.raises(ValueError, match="limit"):
        asyncio.run(catch_up(_empty(), 0).__anext__())


async def _empty() -> Any:
    for _ in ():
        yield None


@pytest.mark.parametrize("text", [TEXT, CALM])
def test_proxy_catching_up_shows_what_the_sync_wrapper_shows(
        guard: Guard, upstream_server: UpstreamServer, serve: Any, reports: list[Any],
        text: str) -> None:
    """The proxy reads the upstream's bytes as they come; the chunks that arrived while a read
    was held are judged together (default: reads awaited on the event loop)."""
    sync_chunks, sync_report = _sync_run(guard, upstream_server, text)
    upstream_server.enqueue(Script(text=text))
    with serve(guard) as proxy:
        held = Held(guard)
        client = openai.OpenAI(base_url=proxy.base_url, api_key="k", max_retries=0)
        stream = client.chat.completions.create(model="m", stream=True, messages=PROMPT)
        record = upstream_server.completions()[-1]
        got: list[Any] = []
        reader = threading.Thread(target=lambda: got.extend(stream))
        reader.start()
        while not record.completed and not record.disconnected:
            record.wait(0.01)
        held.release()
        reader.join(20)
    assert not reader.is_alive()
    assert _content(got) == _content(sync_chunks)
    report = reports[0]
    assert (report.halted, report.released_text, report.tokens) == (
        sync_report.halted, sync_report.released_text, sync_report.tokens)
    if report.halted:
        assert report.halt.at == sync_report.halt.at and report.leaked_tokens == 0
    assert report.observer_reads < sync_report.observer_reads


def test_proxy_serves_health_while_a_stream_read_waits(
        guard: Guard, upstream_server: UpstreamServer, serve: Any) -> None:
    import httpx

    upstream_server.enqueue(Script(text=CALM))
    with serve(guard, offload=False) as proxy:
        held = Held(guard)
        client = openai.OpenAI(base_url=proxy.base_url, api_key="k", max_retries=0)
        got: list[Any] = []
        reader = threading.Thread(target=lambda: got.extend(client.chat.completions.create(
            model="m", stream=True, messages=PROMPT)))
        reader.start()
        while guard.observer.pending() == 0 and reader.is_alive():
            reader.join(0.01)  # until a read is queued behind the hold
        try:
            health = httpx.get(f"{proxy.url}/health", timeout=5)
        finally:
            still_reading = reader.is_alive()
            held.release()
        reader.join(20)
    assert health.status_code == 200 and still_reading
    assert _content(got) == CALM


def _content(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


async def test_langchain_astream_leaves_the_loop_free_while_a_read_waits(
        guard: Guard, upstream_server: UpstreamServer) -> None:
    from langchain_openai import ChatOpenAI

    upstream_server.enqueue(Script(text=CALM))
    model = ChatOpenAI(base_url=upstream_server.base_url, api_key="k", model="m", max_retries=0)
    guarded = guard.wrap_model(model, offload=False)
    held = Held(guard)

    async def read() -> str:
        return "".join([str(c.content) async for c in guarded.astream([("user", "Tell me.")])])

    reading = asyncio.ensure_future(read())
    while guard.observer.pending() == 0 and not reading.done():
        await asyncio.sleep(0.005)  # until a read is queued behind the hold
    ticks = 0
    while ticks < 20 and not reading.done():
        await asyncio.sleep(0.005)
        ticks += 1
    done_while_held = reading.done()
    held.release()
    text = await reading
    assert not done_while_held and ticks == 20
    assert text == CALM
