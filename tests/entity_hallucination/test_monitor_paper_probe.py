"""A probe in the paper's release format (probe_config.json + probe_head.*) used as the monitor on
a tiny model's generator states."""

from __future__ import annotations

import json
from pathlib import Path

import guardrail_entity_hallucination.plugin as entity_plugin
import pytest
import torch
from safetensors.torch import save_file

from guardrail import Flag, Guard, StepToken, StreamStep
from guardrail.plugins import PluginHost

HIDDEN = 32
LAYER = 1


def _release(folder: Path, weight: torch.Tensor, bias: float, pickled: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "probe_config.json").write_text(json.dumps(
        {"layer_idx": LAYER, "hidden_size": HIDDEN, "target_layer_name": "model.layers.1"}))
    state = {"weight": weight.reshape(1, HIDDEN), "bias": torch.tensor([bias])}
    if pickled:
        torch.save(state, folder / "probe_head.bin")
    else:
        save_file(state, str(folder / "probe_head.safetensors"))
    return folder


def _guard(probe_dir: Path) -> Guard:
    host = PluginHost(autoload=False)
    host.register(entity_plugin, name="entity-test")
    policy = {"monitors": [{"id": "facts", "use": "entity-hallucination",
                            "options": {"probe_dir": str(probe_dir), "mode": "generator"},
                            "rule": {"kind": "span_max"}, "threshold": 0.5,
                            "action": "flag"}]}
    return Guard.from_policy(policy, host=host)


def _generate(guard: Guard, words: list[str], states: torch.Tensor) -> list[Flag]:
    """Feed words as generator steps; ``states[i]`` is the step that produced word ``i`` (the
    state after word ``i - 1``)."""
    session = guard.session(prompt="Where is Paris?")
    events = []
    for i, word in enumerate(words):
        step = StreamStep(text=word, tokens=[StepToken(i + 10, word)],
                          hidden={LAYER: states[i:i + 1]})
        events.extend(session.feed(step))
    report = session.finish()
    return [e for e in events + list(report.final_events) if isinstance(e, Flag)]


@pytest.mark.real_model
@pytest.mark.parametrize("pickled", [False, True])
def test_paper_probe_scores_generator_states(tmp_path: Path, pickled: bool) -> None:
    direction = torch.zeros(HIDDEN)
    direction[0] = 1.0
    probe_dir = _release(tmp_path / "probe", direction * 4.0, -2.0, pickled)
    guard = _guard(probe_dir)
    assert guard.monitors[0][1].probe.threshold == 0.5  # type: ignore[attr-defined]
    words = ["It", " is", " in", " Spain", " and", " Berlin", " is", " far", "."]
    states = torch.zeros(len(words), HIDDEN)
    # The state after " Berlin" (word 5) arrives with word 6 and carries the direction.
    states[6, 0] = 2.0
    flags = _generate(guard, words, states)
    text = "".join(words)
    assert [text[f.span[0]:f.span[1]] for f in flags] == ["Berlin"]
    assert flags[0].score == pytest.approx(float(torch.sigmoid(torch.tensor(6.0))), abs=1e-5)


def test_paper_probe_with_wrong_size_names_the_file(tmp_path: Path) -> None:
    from guardrail.errors import PolicyError

    folder = _release(tmp_path / "probe", torch.zeros(HIDDEN), 0.0)
    save_file({"weight": torch.zeros(1, HIDDEN + 1), "bias": torch.zeros(1)},
              str(folder / "probe_head.safetensors"))
    with pytest.raises(PolicyError, match="probe_head.safetensors"):
        _guard(folder)
