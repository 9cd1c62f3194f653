"""Eight streams at once through ``guardrail serve`` with a policy that reads hidden states: their
reads share the Guard's batched observer (the first ones in one forward), and each stream still
shows, flags (with scores from its own hidden states) and halts exactly as it does alone; a
halted stream shows nothing from the halting word on."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import openai
import pytest

from guardrail import Features, Guard, Monitor, Needs, Report, Score, hookimpl
from guardrail.observer.batch import BatchedObserver
from guardrail.testing import WordEndMonitor, plugin_monitors
from guardrail.testing.upstream import Script, UpstreamServer

pytest.importorskip("torch")
pytest.importorskip("transformers")

HOLD_BACK = 4
BASE = ("The guide walked us along the river and past the mill, then we went on to the church "
        "and the market and the station and home again by the evening train through the hills.")
# Streams 0, 3 and 6 carry the halting word at different depths; the others are benign.
TEXTS = [BASE.replace(" the market", " a bomb", 1) if k % 3 == 0 else
         BASE.replace("river", f"river number {k}", 1) for k in range(8)]
TEXTS[3] = TEXTS[3].replace("mill", "bomb shelter", 1)
PROMPT = "Tell me about the trip."


class NormMonitor(Monitor):
    """Scores every token by the norm of its last-layer state (and flags it: threshold 0), so
    a stream that got another stream's rows of a batched forward flags other scores."""

    def __init__(self, options: Any = None) -> None:
        pass

    def needs(self) -> Needs:
        return Needs(layers=frozenset({-1}))

    def update(self, state: Any, features: Features) -> list[Score]:
        import torch

        rows = torch.as_tensor(features.hidden[-1])
        return [Score(i, float(torch.linalg.vector_norm(r)))
                for i, r in zip(features.indices, rows, strict=True)]


class Flags:
    """Each stream's flags (token span, score), by the stream's model name."""

    def __init__(self) -> None:
        self.by_model: dict[str, list[tuple[tuple[int, int], float]]] = {}

    @hookimpl
    def guardrail_session_end(self, session: Any, report: Report) -> None:
        self.by_model[str(session.metadata.get("model"))] = [
            (f.tokens, f.score) for f in report.flags]


@pytest.fixture(scope="module")
def observer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from guardrail.observer.hf import load_model_dir
    from guardrail.testing.tiny_models import build_tiny_model

    path = build_tiny_model(tmp_path_factory.mktemp("models") / "llama", arch="llama")
    return load_model_dir(Path(path), name="tiny-llama", window=4096)


@pytest.fixture
def guard_and_flags(observer: Any) -> Iterator[tuple[Guard, Flags]]:
    policy = {
        # reads only when a release needs one, in one forward (one worker: none spread)
        "observer": {"max_delay_ms": 60_000, "options": {"workers": 1}},
        "release": {"hold_back_tokens": HOLD_BACK},
        "monitors": [{"id": "norm", "use": "norm", "threshold": 0.0, "action": "flag"},
                     {"id": "weapons", "use": "bomb", "threshold": 0.5, "action": "halt",
                      "message": "no"}],
    }
    flags = Flags()
    with plugin_monitors(bomb=WordEndMonitor.factory("bomb"), norm=NormMonitor) as host:
        host.register(flags, name="flags-by-stream")
        yield Guard.from_policy(policy, host=host, observer=observer), flags


def _respond(body: Mapping[str, Any]) -> Script:
    k = int(str(body.get("model", "s0")).split("s")[-1])
    return Script(text=TEXTS[k], delay=0.005)


async def _stream(client: openai.AsyncOpenAI, k: int) -> tuple[str, str | None]:
    stream = await client.chat.completions.create(
        model=f"s{k}", stream=True, messages=[{"role": "user", "content": PROMPT}])
    content, finish = "", None
    async with stream:
        async for chunk in stream:
            for choice in chunk.choices:
                finish = choice.finish_reason or finish
                if choice.finish_reason != "content_filter":
                    content += choice.delta.content or ""
    return content, finish


@pytest.mark.slow  # eight paced streams through a proxy, twice
def test_eight_streams_share_forwards_and_halt_as_alone(
        upstream_server: UpstreamServer, guard_and_flags: tuple[Guard, Flags],
        serve: Callable[..., AbstractContextManager[Any]]) -> None:
    upstream_server.responder = _respond
    guard, flags = guard_and_flags
    observer = guard.observer
    assert isinstance(observer, BatchedObserver)
    with serve(guard) as proxy:
        async def one_by_one() -> list[tuple[str, str | None]]:
            async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key="k",
                                          max_retries=0) as client:
                return [await _stream(client, k) for k in range(len(TEXTS))]

        alone = asyncio.run(one_by_one())
        flags_alone, flags.by_model = flags.by_model, {}

        queued, held = threading.Event(), threading.Event()

        def hold() -> None:
            # No forward runs until all eight streams have queued their context and first
            # read, so those share one forward (after 60 s the reads run anyway, and the
            # batch-size assertion below fails instead of the test hanging).
            with observer.hold():
                held.set()
                queued.wait(timeout=60)

        async def together() -> list[tuple[str, str | None]]:
            async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key="k",
                                          max_retries=0) as client:
                tasks = [asyncio.create_task(_stream(client, k)) for k in range(len(TEXTS))]
                deadline = time.monotonic() + 60
                while observer.pending() < 2 * len(TEXTS) and time.monotonic() < deadline:
                    await asyncio.sleep(0.005)
                queued.set()
                return list(await asyncio.gather(*tasks))

        holder = threading.Thread(target=hold)
        holder.start()
        held.wait()
        concurrent = asyncio.run(together())
        holder.join()

    assert observer.stats.largest == len(TEXTS)  # the eight first reads in one forward
    assert concurrent == alone  # no stream's text or verdict crossed into another's
    assert flags.by_model.keys() == flags_alone.keys()
    for model, mine in flags.by_model.items():
        theirs = flags_alone[model]
        assert mine and [span for span, _ in mine] == [span for span, _ in theirs]
        assert [v for _, v in mine] == pytest.approx([v for _, v in theirs], rel=1e-4, abs=1e-4)
    halted = [k for k, (_, finish) in enumerate(concurrent) if finish == "content_filter"]
    assert halted == [0, 3, 6]
    for k, (content, _) in enumerate(concurrent):
        if k in halted:
            assert content and "bomb" not in content  # nothing from the halting word on
            assert TEXTS[k].startswith(content)
        else:
            assert content == TEXTS[k]
    # (how soon each halted stream's upstream stopped: tests/adapters/test_backpressure.py)
    assert len(upstream_server.completions()) == 2 * len(TEXTS)
    assert observer.live_streams() == 0  # every stream's KV cache freed


def test_the_conversation_is_read_while_the_upstream_works_on_its_first_token(
        upstream_server: UpstreamServer, guard_and_flags: tuple[Guard, Flags],
        serve: Callable[..., AbstractContextManager[Any]], reports: list[Report]) -> None:
    """The proxy starts the observer's read of the conversation when it sends the request
    upstream (``Guard.prepare``): it is done before the upstream's first chunk, and the stream's
    session takes it over (no second read). A request the upstream fails leaves nothing held."""
    guard, _ = guard_and_flags
    observer = guard.observer
    context = len(observer.context_ids([{"role": "user", "content": PROMPT}]))
    upstream_server.enqueue(Script(text=TEXTS[1], delay=0.005, first_delay=1.5),
                            Script(status=503, first_delay=0.3))
    with serve(guard) as proxy:
        got: list[tuple[str, str | None]] = []

        def ask() -> None:
            async def one() -> None:
                async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key="k",
                                              max_retries=0) as client:
                    got.append(await _stream(client, 1))
            asyncio.run(one())

        asker = threading.Thread(target=ask)
        asker.start()
        deadline = time.monotonic() + 1.2  # well inside the upstream's first delay
        while observer.cached_tokens() < context and time.monotonic() < deadline:
            time.sleep(0.01)
        read_early = observer.cached_tokens()
        nothing_yet = upstream_server.completions()[0].chunks_written == 0
        asker.join(timeout=60)
        assert read_early == context and nothing_yet
        assert got == [(TEXTS[1], "stop")]
        assert observer.live_streams() == 0
        reads = observer.stats.reads

        with pytest.raises(openai.APIStatusError):
            asyncio.run(_failing(proxy.base_url))
        assert observer.live_streams() == 0  # the read begun for it was freed
    assert len(reports) == 1  # no session for the failed request
    assert observer.stats.reads <= reads + 1  # at most its conversation was read


async def _failing(base_url: str) -> None:
    async with openai.AsyncOpenAI(base_url=base_url, api_key="k", max_retries=0) as client:
        await _stream(client, 1)


@pytest.mark.parametrize("fails", [False, True])
def test_the_wrapped_client_reads_the_conversation_before_the_upstream_answers(
        upstream_server: UpstreamServer, guard_and_flags: tuple[Guard, Flags],
        fails: bool) -> None:
    """``guard.wrap(client)``: the conversation's read starts when ``create(stream=True)`` sends
    the request; a request the upstream refuses frees it."""
    guard, _ = guard_and_flags
    observer = guard.observer
    context = len(observer.context_ids([{"role": "user", "content": PROMPT}]))
    upstream_server.enqueue(Script(text=TEXTS[1], delay=0.005, first_delay=1.5,
                                   status=503 if fails else 200))
    client = guard.wrap(openai.OpenAI(base_url=upstream_server.base_url, api_key="k",
                                      max_retries=0))
    seen: list[int] = []
    watching = threading.Event()

    def watch() -> None:  # what the observer holds while the upstream is still silent
        while not watching.is_set():
            records = upstream_server.completions()
            if not records or records[0].chunks_written == 0:
                seen.append(observer.cached_tokens())
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        if fails:
            with pytest.raises(openai.APIStatusError):
                client.chat.completions.create(model="s1", stream=True,
                                               messages=[{"role": "user", "content": PROMPT}])
        else:
            stream = client.chat.completions.create(
                model="s1", stream=True, messages=[{"role": "user", "content": PROMPT}])
            text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            assert text == TEXTS[1]
    finally:
        watching.set()
        watcher.join()
    assert context in seen  # read while the upstream had not answered
    assert observer.live_streams() == 0
