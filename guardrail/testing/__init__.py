"""Helpers for testing guardrail and the plugins built on it.

- this module: scripted monitors, an in-code plugin registration context manager, and ways to cut
  a text into stream deltas;
- ``guardrail.testing.upstream``: a loopback OpenAI-compatible SSE server;
- ``guardrail.testing.tiny_models``: tiny random causal LMs with a freshly trained BPE tokenizer.

Example::

    from guardrail import Guard
    from guardrail.testing import ScriptedMonitor, plugin_monitors, split_text

    with plugin_monitors(scripted=ScriptedMonitor.factory({"bomb": 1.0})) as host:
        guard = Guard.from_policy({"monitors": [
            {"id": "s", "use": "scripted", "action": "halt"}]}, host=host)
        session = guard.session()
        for delta in split_text("how to build a bomb", [3, 5, 7]):
            session.feed(delta)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from ..hookspecs import RegisterMonitor, hookimpl
from ..monitor import Features, Monitor, MonitorContext, Needs, Score
from ..plugins import PluginHost
from ..toolkit.records import random_splits

__all__ = [
    "CountingMonitor",
    "FailingMonitor",
    "ScriptedMonitor",
    "SlowMonitor",
    "WordEndMonitor",
    "plugin_monitors",
    "random_splits",
    "split_text",
]


class ScriptedMonitor(Monitor):
    """Scores each token by a rule you give: a mapping of substrings to scores (a token scores the
    highest value among the substrings it contains, stripped and case-folded, else ``default``), or
    any function of the token's text."""

    def __init__(self, score_of: Callable[[str], float], needs: Needs | None = None) -> None:
        self.score_of = score_of
        self._needs = needs or Needs()

    @classmethod
    def factory(cls, table: Mapping[str, float] | Callable[[str], float], *,
                default: float = 0.0, needs: Needs | None = None) -> Callable[..., Monitor]:
        """A monitor factory for ``plugin_monitors`` / ``register``."""
        if callable(table):
            fn = table
        else:
            lowered = {k.lower(): v for k, v in table.items()}

            def fn(token: str) -> float:
                word = token.strip().lower()
                hits = [v for k, v in lowered.items() if k in word and word]
                return max(hits, default=default)

        def make(**options: Any) -> Monitor:
            if options:
                raise TypeError(f"unexpected options {sorted(options)}")
            return cls(fn, needs)

        return make

    def needs(self) -> Needs:
        return self._needs

    def update(self, state: Any, features: Features) -> Sequence[Score]:
        return [Score(i, self.score_of(features.token_text(k)))
                for k, i in enumerate(features.indices)]


class WordEndMonitor(Monitor):
    """Scores 1.0 on each token that holds the last character of one of ``words`` (case-folded,
    every occurrence in the response so far), else 0.0. It reads from ``Features.text``, so it
    sees words split across tokens; its default ``needs`` ask for observer layer 1, so each
    decision waits for an observer read, as a hidden-state monitor's would."""

    def __init__(self, words: Sequence[str], needs: Needs | None = None) -> None:
        self.words = [w.lower() for w in words]
        self._needs = needs if needs is not None else Needs(layers=frozenset({1}))

    @classmethod
    def factory(cls, *words: str, needs: Needs | None = None) -> Callable[..., Monitor]:
        """A monitor factory for ``plugin_monitors`` / ``register``."""
        return lambda options=None: cls(words, needs)

    def needs(self) -> Needs:
        return self._needs

    def update(self, state: Any, features: Features) -> list[Score]:
        text = features.text.lower()
        ends = set()
        for word in self.words:
            at = text.find(word)
            while at >= 0:
                ends.add(at + len(word) - 1)
                at = text.find(word, at + 1)
        return [Score(i, 1.0 if any(t.start <= e < t.end for e in ends) else 0.0)
                for i, t in zip(features.indices, features.tokens, strict=True)]


class CountingMonitor(Monitor):
    """Scores 1.0 on every ``every``-th token of its own stream (per-stream state: a counter)."""

    def __init__(self, every: int = 3) -> None:
        self.every = every

    def start(self, context: MonitorContext) -> dict[str, int]:
        return {"seen": 0}

    def update(self, state: dict[str, int], features: Features) -> Sequence[Score]:
        out = []
        for i in features.indices:
            state["seen"] += 1
            out.append(Score(i, 1.0 if state["seen"] % self.every == 0 else 0.0))
        return out


class FailingMonitor(Monitor):
    """Raises ``RuntimeError`` once it has seen ``after`` tokens (0: on the first update)."""

    def __init__(self, after: int = 0, message: str = "monitor exploded") -> None:
        self.after, self.message = after, message

    def update(self, state: Any, features: Features) -> Sequence[Score]:
        if features.first_index + len(features.tokens) > self.after:
            raise RuntimeError(self.message)
        return [Score(i, 0.0) for i in features.indices]


class SlowMonitor(Monitor):
    """Sleeps ``seconds`` per update: trips a policy's ``timeout_ms``."""

    def __init__(self, seconds: float = 0.05) -> None:
        self.seconds = seconds

    def update(self, state: Any, features: Features) -> Sequence[Score]:
        time.sleep(self.seconds)
        return [Score(i, 0.0) for i in features.indices]


@contextmanager
def plugin_monitors(host: PluginHost | None = None,
                    **factories: Callable[..., Monitor]) -> Iterator[PluginHost]:
    """Register monitor factories by name for the duration of a ``with`` block.

    Yields the host (a fresh one without entry-point plugins unless you pass one); pass it to
    ``Guard(..., host=host)``. The registration is removed afterwards, even on error.
    """
    host = host or PluginHost(autoload=False)

    class _InlinePlugin:
        @hookimpl
        def guardrail_register_monitors(self, register: RegisterMonitor) -> None:
            for name, factory in factories.items():
                register(name.replace("_", "-"), factory)

    name = host.register(_InlinePlugin(), name=f"inline-test-plugin-{id(factories)}")
    try:
        yield host
    finally:
        host.unregister(name)


def split_text(text: str, sizes: Sequence[int]) -> list[str]:
    """Cut ``text`` into deltas of the given sizes, cycling through them; nothing is lost."""
    if not sizes or any(s <= 0 for s in sizes):
        raise ValueError("sizes must be positive")
    out, pos, k = [], 0, 0
    while pos < len(text):
        size = sizes[k % len(sizes)]
        out.append(text[pos:pos + size])
        pos += size
        k += 1
    return out

