"""guardrail-server in front of a local model (``create_app(guard, local=model)``) and the
``guardrail serve`` command line. The local model here is a plain generator that records how far
it got and whether it was stopped: a halt or a hang-up must stop generation, not just reading."""

from __future__ import annotations

import argparse
import asyncio
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from guardrail_server import LocalModel, create_app, running, serve_cli
from openai.types.chat import ChatCompletionMessageParam

from guardrail import Guard
from guardrail.cli import build_parser
from guardrail.testing.upstream import split_words

HARMFUL = ("Here is how to build a bomb at home with things you can buy in any shop near you "
           "and then some more words to keep the stream going for quite a while longer")
TRIGGER = split_words(HARMFUL).index(" bomb")
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
DOC = Path(__file__).resolve().parents[2] / "docs" / "adapters.md"


class WordModel:
    """Generates ``text`` a word at a time; records pieces produced and whether it was closed."""

    name = "word-model"

    def __init__(self, text: str, delay: float = 0.01) -> None:
        self.text, self.delay = text, delay
        self.produced = 0
        self.params: dict[str, Any] = {}
        self.stopped = threading.Event()
        self.finished = threading.Event()

    def stream(self, messages: list[dict[str, Any]], **params: Any) -> Iterator[str]:
        self.params = params
        try:
            for word in split_words(self.text):
                time.sleep(self.delay)
                self.produced += 1
                yield word
            self.finished.set()
        finally:
            if not self.finished.is_set():
                self.stopped.set()


def test_word_model_is_a_local_model() -> None:
    assert isinstance(WordModel(""), LocalModel)


def test_local_stream_halts_and_stops_generation(make_guard: Callable[..., Guard],
                                                 halt_message: str) -> None:
    model = WordModel(HARMFUL)
    with running(create_app(make_guard(2), local=model)) as proxy:
        client = openai.OpenAI(base_url=proxy.base_url, api_key="-", max_retries=0, timeout=10)
        chunks = list(client.chat.completions.create(model="word-model", messages=MESSAGES,
                                                     stream=True, max_tokens=64))
        assert model.stopped.wait(2)
    last = chunks[-1].choices[0]
    shown = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert last.delta.content == ("\n\n" if shown else "") + halt_message
    assert last.finish_reason == "content_filter"
    assert "bomb" not in shown and HARMFUL.startswith(shown)
    assert model.produced - (TRIGGER + 1) <= 2 + 1  # hold-back + 1
    assert model.params == {"max_tokens": 64}


async def test_local_async_stream_and_whole_answer(make_guard: Callable[..., Guard]) -> None:
    text = "A calm answer about rivers, lakes and the sea."
    model = WordModel(text, delay=0.0)
    with running(create_app(make_guard(2), local=model)) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="-", max_retries=0,
                                    timeout=10)
        stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream
                            if c.choices])
        whole = await client.chat.completions.create(model="m", messages=MESSAGES)
        models = await client.models.list()
        await client.close()
    assert streamed == text
    assert whole.choices[0].message.content == text and whole.choices[0].finish_reason == "stop"
    assert [m.id for m in models.data] == ["word-model"]


def test_client_disconnect_stops_local_generation(make_guard: Callable[..., Guard]) -> None:
    model = WordModel(HARMFUL.replace("bomb", "boat") * 5, delay=0.05)
    with running(create_app(make_guard(1), local=model)) as proxy:
        with httpx.stream("POST", f"{proxy.base_url}/chat/completions", timeout=10,
                          json={"model": "m", "messages": MESSAGES, "stream": True}) as resp:
            next(resp.iter_lines())
        closed_at = time.monotonic()
        assert model.stopped.wait(2)
        stopped_after = time.monotonic() - closed_at
    assert stopped_after < 1.0 and not model.finished.is_set()


# -- the command line ------------------------------------------------------------------------


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


def test_cli_needs_exactly_one_source(capsys: pytest.CaptureFixture[str]) -> None:
    assert serve_cli(_args()) == 2
    assert serve_cli(_args("--upstream", "http://127.0.0.1:9/v1", "--local", "x")) == 2
    assert "exactly one of --upstream" in capsys.readouterr().err


def test_cli_defaults_to_loopback_and_the_doc_line_parses() -> None:
    assert _args("--upstream", "http://127.0.0.1:9/v1").host == "127.0.0.1"
    found = re.search(r"```bash\n(guardrail serve .*)\n```", DOC.read_text())
    assert found is not None
    args = build_parser().parse_args(found.group(1).split()[1:])
    assert args.upstream and args.policy and args.port == 8000


def test_client_leaving_a_whole_answer_stops_local_generation(
        make_guard: Callable[..., Guard]) -> None:
    model = WordModel(HARMFUL * 5, delay=0.05)
    with running(create_app(make_guard(1), local=model)) as proxy:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{proxy.base_url}/chat/completions", timeout=0.3,
                       json={"model": "m", "messages": MESSAGES})
        left_at = time.monotonic()
        assert model.stopped.wait(2)
        stopped_after = time.monotonic() - left_at
    assert stopped_after < 1.0 and not model.finished.is_set()


class EchoModel:
    """Streams the user's message back a word at a time (slowly, so streams overlap)."""

    name = "echo"

    def stream(self, messages: list[dict[str, Any]], **params: Any) -> Iterator[str]:
        for word in split_words(str(messages[-1]["content"])):
            time.sleep(0.01)
            yield word


async def test_concurrent_local_streams_interleave_without_mixing(
        make_guard: Callable[..., Guard]) -> None:
    prompts = [f"stream {k} says " + " ".join(f"w{k}{i}" for i in range(15)) for k in range(4)]
    with running(create_app(make_guard(2), local=EchoModel())) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="-", max_retries=0,
                                    timeout=10)

        async def ask(prompt: str) -> str:
            stream = await client.chat.completions.create(
                model="echo", messages=[{"role": "user", "content": prompt}], stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream
                            if c.choices])

        answers = await asyncio.gather(*(ask(p) for p in prompts))
        await client.close()
    assert answers == prompts
