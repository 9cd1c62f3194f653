"""A Guard whose policy names a local model as observer, with a monitor that reads a layer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from guardrail import Features, Guard, Halt, Monitor, Needs, Score
from guardrail.testing import plugin_monitors, split_text


class StateNormMonitor(Monitor):
    """Scores each token by the norm of its layer-1 state (larger than 0 for any real state)."""

    def __init__(self, options: Any = None) -> None:
        pass

    def needs(self) -> Needs:
        return Needs(layers=frozenset({1}))

    def start(self, context: Any) -> list[Any]:
        return []

    def update(self, state: list[Any], features: Features) -> list[Score]:
        rows = features.hidden[1]
        assert isinstance(rows, torch.Tensor) and rows.shape[0] == len(features.tokens)
        state.append(rows)
        return [Score(i, float(r.norm() > 0)) for i, r in zip(features.indices, rows, strict=True)]


def test_guard_with_a_local_model_observer_runs_end_to_end(tiny_llama: Path) -> None:
    policy = {
        "observer": {"model": str(tiny_llama), "window": 128},
        "monitors": [{"id": "norm", "use": "state-norm", "threshold": 0.5,
                      "rule": {"kind": "count", "k": 3}, "action": "halt"}],
    }
    with plugin_monitors(state_norm=StateNormMonitor) as host:
        guard = Guard.from_policy(policy, host=host)
        assert guard.observer.name == "llama" and guard.observer.num_layers == 4
        session = guard.session(prompt="Tell me about Paris.")
        events = []
        for delta in split_text("The capital of France is Paris. It is a large city.", [4]):
            events += session.feed(delta)
        report = session.finish()
    halts = [e for e in [*events, *report.final_events] if isinstance(e, Halt)]
    assert len(halts) == 1 and halts[0].monitor == "norm"
    assert session.tokens >= 3
