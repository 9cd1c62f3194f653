"""Loading a guard from a warm cache prints no progress bars (issue 27, item 9)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from guardrail import Features, Guard, Monitor, Needs, Score
from guardrail.plugins import PluginHost
from guardrail.testing import plugin_monitors


class Reader(Monitor):
    def needs(self) -> Needs:
        return Needs(layers=frozenset({-1}))

    def update(self, state: Any, features: Features) -> Sequence[Score]:
        return [Score(i, 0.0) for i in features.indices]


def test_a_guard_load_prints_no_loading_bars(tiny_llama: Path,
                                             capfd: pytest.CaptureFixture[str]) -> None:
    from transformers.utils import logging as hf_logging

    with plugin_monitors(PluginHost(autoload=False), reader=lambda: Reader()) as host:
        guard = Guard.from_policy({"observer": {"model": str(tiny_llama)},
                                   "monitors": [{"id": "r", "use": "reader"}]}, host=host)
    assert guard.check("Paris is big.", prompt="Tell me about Paris.").tokens > 0
    captured = capfd.readouterr()
    assert "Loading weights" not in captured.err and "Loading weights" not in captured.out
    assert hf_logging.is_progress_bar_enabled()  # other users of transformers keep their bars
