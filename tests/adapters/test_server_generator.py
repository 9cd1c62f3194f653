"""guardrail-server serving a guardrail-transformers ``LocalGenerator`` (``--local``): monitors
read the generator's own hidden states (no observer forward), a halt stops generation, and the
client sees OpenAI chunks. A tiny random Llama stands in for SmolLM2 (nothing is downloaded)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import openai
import pytest

pytest.importorskip("torch")
guardrail_transformers = pytest.importorskip("guardrail_transformers")

from guardrail_server import create_app, running  # noqa: E402

from guardrail import Features, Guard, Monitor, Needs, Report, Score  # noqa: E402
from guardrail.testing import plugin_monitors  # noqa: E402
from guardrail.testing.tiny_models import build_tiny_model  # noqa: E402

HALT_AT = 3  # the monitor fires on the 4th generated token
MESSAGES: list[Any] = [{"role": "user", "content": "Tell me about Marie Curie."}]


class StateMonitor(Monitor):
    """Fires on token ``HALT_AT``; records, per update, whether layer 1's rows came with it."""

    def __init__(self) -> None:
        self.saw_states: list[bool] = []

    def needs(self) -> Needs:
        return Needs(layers=frozenset({1}))

    def update(self, state: Any, features: Features) -> Sequence[Score]:
        rows = features.hidden.get(1) if features.hidden else None
        self.saw_states.append(rows is not None and len(rows) == len(features.tokens))
        return [Score(i, 1.0 if i == HALT_AT else 0.0) for i in features.indices]


@pytest.fixture(scope="module")
def generator(tmp_path_factory: pytest.TempPathFactory) -> Any:
    path: Path = build_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", arch="llama")
    return guardrail_transformers.LocalGenerator(path)


def _guard(generator: Any, action: str) -> tuple[Guard, StateMonitor]:
    monitor = StateMonitor()
    policy = {"release": {"hold_back_tokens": 1}, "monitors": [
        {"id": "states", "use": "state-monitor", "action": action, "message": "stopped"}]}
    with plugin_monitors(state_monitor=lambda: monitor) as host:
        return Guard.from_policy(policy, host=host, observer=generator.observer), monitor


def test_stream_halts_on_generator_states(generator: Any) -> None:
    guard, monitor = _guard(generator, "halt")
    reports: list[Report] = []
    with running(create_app(guard, local=generator, on_report=reports.extend)) as proxy:
        client = openai.OpenAI(base_url=proxy.base_url, api_key="-", max_retries=0, timeout=60)
        chunks = list(client.chat.completions.create(model=generator.name, messages=MESSAGES,
                                                     stream=True, max_tokens=40))
    last = chunks[-1].choices[0]
    assert last.delta.content == "stopped" and last.finish_reason == "content_filter"
    assert monitor.saw_states and all(monitor.saw_states)
    (report,) = reports
    assert report.halted and report.aborted is None
    assert report.tokens == HALT_AT + 1  # generation stopped at the halt, not at max_tokens
    assert report.observer_seconds == 0.0  # the generator's own states, no observer pass


def test_flag_only_stream_equals_unguarded_generation(generator: Any) -> None:
    guard, _ = _guard(generator, "flag")
    expected = generator.generate(MESSAGES, max_tokens=12)
    with running(create_app(guard, local=generator)) as proxy:
        client = openai.OpenAI(base_url=proxy.base_url, api_key="-", max_retries=0, timeout=60)
        chunks = list(client.chat.completions.create(model="m", messages=MESSAGES, stream=True,
                                                     max_tokens=12))
        whole = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=12)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected == whole.choices[0].message.content
    flags = [e for c in chunks for e in (getattr(c, "guardrail", None) or {}).get("events", [])]
    assert [(f["kind"], f["monitor"]) for f in flags] == [("flag", "states")]
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_async_whole_answer_halts(generator: Any) -> None:
    guard, _ = _guard(generator, "halt")
    with running(create_app(guard, local=generator)) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="-", max_retries=0,
                                    timeout=60)
        completion = await client.chat.completions.create(model="m", messages=MESSAGES,
                                                          max_tokens=40)
        await client.close()
    choice = completion.choices[0]
    assert choice.finish_reason == "content_filter"
    assert (choice.message.content or "").endswith("stopped")


def test_cli_loads_a_local_model_dir_and_shares_its_observer(tmp_path: Path) -> None:
    from guardrail_server._serve import _shared_observer, load_local_model

    from guardrail import load_policy

    path = build_tiny_model(tmp_path / "llama", arch="llama")
    loaded = load_local_model(str(path))
    assert isinstance(loaded, guardrail_transformers.LocalGenerator)
    assert _shared_observer(load_policy({"monitors": []}), loaded) is loaded.observer
    other = load_policy({"observer": {"model": "some-other-model"}, "monitors": []})
    assert _shared_observer(other, loaded) is None
