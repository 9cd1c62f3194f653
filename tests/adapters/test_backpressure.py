"""Backpressure on halt, per driver: a guard that reads hidden states when a decision is due
(a tiny observer), behind each driver, against the loopback upstream that stamps every chunk it
writes. The upstream must stop within hold-back + one read of the halting token, and write
nothing more once the verdict is in (every driver pulls one read at a time and closes at once).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import openai
import pytest

from guardrail import Guard, hookimpl
from guardrail.events import Halt
from guardrail.testing import WordEndMonitor, plugin_monitors
from guardrail.testing.upstream import Script, UpstreamServer, split_words

pytest.importorskip("torch")
pytest.importorskip("transformers")

TEXT = ("The guide walked us along the river and past the mill, then someone asked how to "
        "build a bomb and the guide said no, and we all went on to the church and the market "
        "and the station and home again by the evening train through the hills.")
TRIGGER_CHUNK = split_words(TEXT).index(" bomb") + 1  # 1-based content chunk with the word
HOLD_BACK = 4
DELAY = 0.08  # s between upstream chunks: the tiny observer keeps pace with this easily
PROMPT = "Tell me about the trip."


class VerdictClock:
    """Stamps the first halt verdict (``time.monotonic``, the upstream's clock)."""

    def __init__(self) -> None:
        self.at: float | None = None

    @hookimpl
    def guardrail_on_event(self, event: Any, session: Any) -> None:
        if isinstance(event, Halt) and self.at is None:
            self.at = time.monotonic()


@pytest.fixture(scope="module")
def observer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from guardrail.observer.hf import load_model_dir
    from guardrail.testing.tiny_models import build_tiny_model

    path = build_tiny_model(tmp_path_factory.mktemp("models") / "llama", arch="llama")
    return load_model_dir(Path(path), name="tiny-llama", window=4096)


@pytest.fixture
def clocked_guard(observer: Any) -> Iterator[tuple[Guard, VerdictClock]]:
    policy = {
        # Reads only when due: the verdict may wait for hold-back tokens, never longer.
        "observer": {"max_delay_ms": 60_000},
        "release": {"hold_back_tokens": HOLD_BACK},
        "monitors": [{"id": "weapons", "use": "bomb-end", "threshold": 0.5, "action": "halt",
                      "message": "no"}],
    }
    clock = VerdictClock()
    with plugin_monitors(bomb_end=WordEndMonitor.factory("bomb")) as host:
        host.register(clock, name="verdict-clock")
        yield Guard.from_policy(policy, host=host, observer=observer), clock


def _sync_openai(guard: Guard, base_url: str) -> None:
    client = guard.wrap(openai.OpenAI(base_url=base_url, api_key="k", max_retries=0))
    for _ in client.chat.completions.create(model="m", stream=True,
                                            messages=[{"role": "user", "content": PROMPT}]):
        pass


def _async_openai(guard: Guard, base_url: str) -> None:
    async def go() -> None:
        client = guard.wrap(openai.AsyncOpenAI(base_url=base_url, api_key="k", max_retries=0))
        stream = await client.chat.completions.create(
            model="m", stream=True, messages=[{"role": "user", "content": PROMPT}])
        async with stream:
            async for _ in stream:
                pass

    asyncio.run(go())


def _langchain(guard: Guard, base_url: str) -> None:
    from langchain_openai import ChatOpenAI

    model = ChatOpenAI(base_url=base_url, api_key="k", model="m",
                       max_retries=0)
    for _ in guard.wrap_model(model).stream([("user", PROMPT)]):
        pass


def _langchain_async(guard: Guard, base_url: str) -> None:
    from langchain_openai import ChatOpenAI

    async def go() -> None:
        model = ChatOpenAI(base_url=base_url, api_key="k", model="m",
                           max_retries=0)
        async for _ in guard.wrap_model(model).astream([("user", PROMPT)]):
            pass

    asyncio.run(go())


DRIVERS: dict[str, Callable[[Guard, str], None]] = {
    "openai": _sync_openai, "openai-async": _async_openai, "langchain": _langchain,
    "langchain-async": _langchain_async}


def _assert_stopped_in_time(server: UpstreamServer, clock: VerdictClock) -> None:
    record = server.completions()[-1]
    assert record.wait(5)
    assert clock.at is not None, "the guard never halted"
    assert record.disconnected and not record.completed
    content = record.chunk_times[1:]  # the first chunk carries the role
    at_verdict = sum(1 for t in content if t <= clock.at)
    # The word is final with the next chunk; a read is due before hold-back more pass.
    assert TRIGGER_CHUNK <= at_verdict <= TRIGGER_CHUNK + 1 + HOLD_BACK + 1
    # Nothing read ahead: the close reached the upstream before it wrote another chunk.
    assert len(content) - at_verdict <= 1
    assert len(content) < len(split_words(TEXT))


# A paced stream takes seconds: the fast lane runs one driver, make test all of them.
@pytest.mark.parametrize("driver", [
    pytest.param(d, marks=[] if d == "openai" else pytest.mark.slow) for d in sorted(DRIVERS)])
def test_wrapper_stops_upstream_within_hold_back(
        driver: str, upstream_server: UpstreamServer,
        clocked_guard: tuple[Guard, VerdictClock]) -> None:
    guard, clock = clocked_guard
    upstream_server.enqueue(Script(text=TEXT, delay=DELAY))
    DRIVERS[driver](guard, upstream_server.base_url)
    _assert_stopped_in_time(upstream_server, clock)


@pytest.mark.slow
def test_proxy_stops_upstream_within_hold_back(
        upstream_server: UpstreamServer, clocked_guard: tuple[Guard, VerdictClock],
        serve: Callable[..., AbstractContextManager[Any]]) -> None:
    guard, clock = clocked_guard
    upstream_server.enqueue(Script(text=TEXT, delay=DELAY))
    with serve(guard) as proxy:
        client = openai.OpenAI(base_url=proxy.base_url, api_key="k", max_retries=0)
        chunks = list(client.chat.completions.create(
            model="m", stream=True, messages=[{"role": "user", "content": PROMPT}]))
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    _assert_stopped_in_time(upstream_server, clock)
