"""Fixtures shared by the adapter tests: the loopback upstream and small keyword guards."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import pytest
from guardrail_server import RunningServer, create_app, running

from guardrail import Features, Guard, Monitor, Report, Score
from guardrail.plugins import PluginHost
from guardrail.testing import plugin_monitors
from guardrail.testing.upstream import UpstreamServer, upstream_server  # noqa: F401  (a fixture)

HALT_MESSAGE = "Sorry, I can't continue with that."


def _make_guard(hold_back: int = 2, *, raise_on_halt: bool = False,
               extra: list[dict[str, Any]] | None = None, host: PluginHost | None = None) -> Guard:
    """A guard that halts on the word "bomb" and flags the word "build"."""
    policy = {
        "release": {"hold_back_tokens": hold_back},
        "raise_on_halt": raise_on_halt,
        "monitors": [
            {"id": "weapons", "use": "keywords", "options": {"words": ["bomb"]},
             "action": "halt", "message": HALT_MESSAGE},
            {"id": "verbs", "use": "keywords", "options": {"words": ["build"]},
             "action": "flag"},
            *(extra or []),
        ],
    }
    return Guard.from_policy(policy, host=host or PluginHost(autoload=False))


@pytest.fixture
def make_guard() -> Callable[..., Guard]:
    """``make_guard(hold_back=2, raise_on_halt=False, extra=[...], host=None)``: a guard that
    halts on the word "bomb" (message ``HALT_MESSAGE``) and flags the word "build"."""
    return _make_guard


@pytest.fixture
def halt_message() -> str:
    return HALT_MESSAGE


class SurpriseMonitor(Monitor):
    """Scores 1.0 on the newest token when the upstream sent a logprob below -5."""

    def update(self, state: Any, features: Features) -> Sequence[Score]:
        surprised = any(lp.logprob < -5 for lp in features.logprobs)
        return [Score(i, 1.0 if surprised and i == features.indices[-1] else 0.0)
                for i in features.indices]


@pytest.fixture
def logprob_guard() -> Guard:
    """Halts with "low confidence" once the upstream sends a token logprob below -5."""
    spec = {"id": "surprise", "use": "surprise", "action": "halt", "message": "low confidence"}
    with plugin_monitors(surprise=lambda: SurpriseMonitor()) as host:
        return _make_guard(2, extra=[spec], host=host)


class LoopTicker:
    """A task that counts its turns on the event loop while the ``async with`` block runs."""

    def __init__(self) -> None:
        self.ticks = 0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(0.001)
            self.ticks += 1

    async def __aenter__(self) -> LoopTicker:
        self._task = asyncio.create_task(self._tick())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


class TickWaitingMonitor(Monitor):
    """Holds its thread in each update until the ticker has had ``turns`` more turns or
    ``limit`` seconds passed, and records how many turns it saw: a monitor that blocks like a
    big observer on a CPU, and shows whether the event loop ran meanwhile."""

    def __init__(self, ticker: LoopTicker, limit: float, turns: int = 3) -> None:
        self.ticker, self.limit, self.turns = ticker, limit, turns
        self.seen: list[int] = []

    def update(self, state: Any, features: Features) -> Sequence[Score]:
        start = self.ticker.ticks
        deadline = time.monotonic() + self.limit
        while self.ticker.ticks < start + self.turns and time.monotonic() < deadline:
            time.sleep(0.001)
        self.seen.append(self.ticker.ticks - start)
        return [Score(i, 0.0) for i in features.indices]


@pytest.fixture
def blocking_guard() -> Callable[[bool], tuple[Guard, LoopTicker, TickWaitingMonitor]]:
    """``blocking_guard(offload)``: a guard whose only monitor blocks its thread per update, the
    ticker to run around the stream, and the monitor (its ``seen`` turns per update). Offloaded,
    an update returns once the loop has turned (10 s at most); inline it can't turn, so each
    update gives up after 0.05 s having seen none."""

    def make(offload: bool) -> tuple[Guard, LoopTicker, TickWaitingMonitor]:
        ticker = LoopTicker()
        monitor = TickWaitingMonitor(ticker, limit=10.0 if offload else 0.05)
        spec = {"id": "blocking", "use": "blocking", "action": "flag"}
        with plugin_monitors(blocking=lambda: monitor) as host:
            return _make_guard(0, extra=[spec], host=host), ticker, monitor

    return make


@pytest.fixture
def reports() -> list[Report]:
    """The reports of the proxy's sessions, collected by ``serve``."""
    return []


@pytest.fixture
def serve(upstream_server: UpstreamServer, reports: list[Report]  # noqa: F811
          ) -> Callable[..., AbstractContextManager[RunningServer]]:
    """``with serve(guard, upstream=None, **create_app_options) as proxy``: the proxy in front of
    the loopback upstream (or ``upstream``), its reports collected in ``reports``."""

    @contextmanager
    def start(guard: Guard, upstream: str | None = None, **kwargs: Any
              ) -> Iterator[RunningServer]:
        app = create_app(guard, upstream=upstream or upstream_server.base_url,
                         on_report=reports.extend, **kwargs)
        with running(app) as proxy:
            yield proxy

    return start


@pytest.fixture
def free_port() -> int:
    """A loopback port nobody listens on (for a ``guardrail serve`` subprocess)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
