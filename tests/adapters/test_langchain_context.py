"""The chain's prompt reaches the guard: ``prompt | model | guard.as_runnable()`` streams and
``prompt | guard.wrap_model(model)`` in every mode hand the model's input to the observer and the
monitors as the conversation (issue 27, item 2)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from langchain_core.language_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from langchain_core.prompts import ChatPromptTemplate

from guardrail import Features, Guard, Message, Monitor, Needs, Score
from guardrail.observer.hf import load_model_dir
from guardrail.plugins import PluginHost
from guardrail.testing import plugin_monitors
from guardrail.testing.tiny_models import build_tiny_model

QUESTION = "What is the capital of France?"
ANSWER = "The capital of France is Paris."


class ReadingMonitor(Monitor):
    """Reads the observer's last hidden layer (so the guard runs the observer); never fires."""

    def needs(self) -> Needs:
        return Needs(layers=frozenset({-1}))

    def update(self, state: Any, features: Features) -> Sequence[Score]:
        return [Score(i, 0.0) for i in features.indices]


class RecordingObserver:
    """The real tiny observer; remembers how many context tokens each stream read first."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.context_tokens: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def start(self, messages: Sequence[Message], needs: Needs) -> Any:
        state = self.inner.start(messages, needs)
        self.context_tokens.append(state.context_len)
        return state


@pytest.fixture(scope="module")
def observer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    path: Path = build_tiny_model(tmp_path_factory.mktemp("models") / "llama", arch="llama")
    return load_model_dir(path, name="tiny-llama", window=4096)


@pytest.fixture
def recording(observer: Any) -> tuple[Guard, RecordingObserver]:
    spy = RecordingObserver(observer)
    with plugin_monitors(PluginHost(autoload=False), reader=lambda: ReadingMonitor()) as host:
        guard = Guard.from_policy(
            {"monitors": [{"id": "reader", "use": "reader", "action": "flag"}]},
            host=host, observer=spy)
    return guard, spy


def _model() -> GenericFakeChatModel:
    return GenericFakeChatModel(messages=iter([AIMessage(ANSWER)]))


def _prompt_tokens(observer: Any) -> int:
    return len(observer.context_ids([{"role": "user", "content": QUESTION}]))


PROMPT = ChatPromptTemplate.from_template("{question}")


def test_streamed_chain_reads_the_prompt(recording: tuple[Guard, RecordingObserver]) -> None:
    guard, spy = recording
    chain = PROMPT | _model() | guard.as_runnable()
    chunks = list(chain.stream({"question": QUESTION}))
    assert "".join(str(c.content) for c in chunks) == ANSWER
    assert spy.context_tokens == [_prompt_tokens(spy)]
    assert spy.context_tokens[0] > 0


async def test_async_streamed_chain_reads_the_prompt(
        recording: tuple[Guard, RecordingObserver]) -> None:
    guard, spy = recording
    chain = PROMPT | _model() | guard.as_runnable()
    chunks = [c async for c in chain.astream({"question": QUESTION})]
    assert "".join(str(c.content) for c in chunks) == ANSWER
    assert spy.context_tokens == [_prompt_tokens(spy)]


@pytest.mark.parametrize("mode", ["invoke", "stream", "batch"])
def test_wrapped_model_reads_the_prompt(recording: tuple[Guard, RecordingObserver],
                                        mode: str) -> None:
    guard, spy = recording
    chain = PROMPT | guard.wrap_model(_model())
    question = {"question": QUESTION}
    if mode == "invoke":
        text = str(chain.invoke(question).content)
    elif mode == "stream":
        text = "".join(str(c.content) for c in chain.stream(question))
    else:
        text = str(chain.batch([question])[0].content)
    assert text == ANSWER
    assert spy.context_tokens == [_prompt_tokens(spy)]


def test_explicit_messages_win_over_the_chain(recording: tuple[Guard, RecordingObserver]) -> None:
    guard, spy = recording
    other = [{"role": "user", "content": "Say something else entirely, please, at length."}]
    chain = PROMPT | _model() | guard.as_runnable(messages=other)
    list(chain.stream({"question": QUESTION}))
    assert spy.context_tokens == [len(spy.context_ids(other))]


async def test_wrapped_model_ainvoke(recording: tuple[Guard, RecordingObserver]) -> None:
    guard, spy = recording
    out = await (PROMPT | guard.wrap_model(_model())).ainvoke({"question": QUESTION})
    assert out.content == ANSWER
    assert spy.context_tokens == [_prompt_tokens(spy)]


class _SlowStart(GenericFakeChatModel):
    """A chat model that takes its time to its first chunk; meanwhile it notes whether the
    guard's observer has read the conversation (``waited_for``: the cached tokens awaited)."""

    def _stream(self, messages: Any, stop: Any = None, run_manager: Any = None,
                **kwargs: Any) -> Any:
        import time

        observer, want = _SLOW["observer"], _SLOW["want"]
        deadline = time.monotonic() + 5
        while observer.cached_tokens() < want and time.monotonic() < deadline:
            time.sleep(0.01)
        _SLOW["read_before_first_chunk"] = observer.cached_tokens() >= want
        yield from super()._stream(messages, stop=stop, run_manager=run_manager, **kwargs)


_SLOW: dict[str, Any] = {}


@pytest.mark.parametrize("fails", [False, True])
def test_the_guard_reads_the_prompt_while_the_model_starts(observer: Any, fails: bool) -> None:
    """With a batched observer the guard's read of the chain's prompt begins when the model
    starts (``Guard.prepare``), before its first chunk; the stream's session takes it over, and
    a model that fails before its first chunk leaves nothing held."""
    with plugin_monitors(PluginHost(autoload=False), reader=lambda: ReadingMonitor()) as host:
        guard = Guard.from_policy(
            {"monitors": [{"id": "reader", "use": "reader", "action": "flag"}]},
            host=host, observer=observer)
    _SLOW.update(observer=guard.observer, want=_prompt_tokens(observer),
                 read_before_first_chunk=None)
    model = _SlowStart(messages=iter([] if fails else [AIMessage(ANSWER)]))
    chain = PROMPT | model | guard.as_runnable()
    if fails:
        with pytest.raises(RuntimeError, match="StopIteration"):  # it ran out of answers
            list(chain.stream({"question": QUESTION}))
    else:
        chunks = list(chain.stream({"question": QUESTION}))
        assert "".join(str(c.content) for c in chunks) == ANSWER
    assert _SLOW["read_before_first_chunk"] is True
    assert guard.observer.live_streams() == 0
