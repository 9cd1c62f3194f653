"""The shipped probe on the real SmolLM2 observer: the default guard flags fabricated entities in
the bundled replays more often than true ones, each flag naming a whole entity."""

from __future__ import annotations

import json
from importlib.resources import files

import guardrail_entity_hallucination.plugin as entity_plugin
import pytest
from guardrail_entity_hallucination.probe import DEFAULT_WEIGHTS

from guardrail import Flag, Guard
from guardrail.guard import default_policy
from guardrail.plugins import PluginHost
from guardrail.testing import random_splits

pytestmark = [pytest.mark.real_model,
              pytest.mark.skipif(not DEFAULT_WEIGHTS.exists(), reason="no shipped weights")]


def _replays(name: str) -> list[dict[str, object]]:
    text = (files("guardrail_entity_hallucination") / "replays" / name).read_text("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_shipped_probe_flags_fabricated_entities_in_replays() -> None:
    host = PluginHost(autoload=False)
    host.register(entity_plugin, name="entity-test")
    guard = Guard(default_policy(host), host=host)
    flagged = {0: 0, 1: 0}
    total = {0: 0, 1: 0}
    for n, record in enumerate(_replays("fabricated.jsonl")[:8]):
        session = guard.session(prompt=str(record["prompt"]))
        events = []
        response = str(record["response"])
        for piece in random_splits(response, seed=n):
            events.extend(session.feed(piece))
        events.extend(session.finish().final_events)
        spans = {(f.span[0], f.span[1]) for f in events if isinstance(f, Flag)}
        for s in record["spans"]:  # type: ignore[attr-defined]
            total[s["label"]] += 1
            hit = any(a < s["end"] and b > s["start"] for a, b in spans)
            flagged[s["label"]] += int(hit)
        for a, b in spans:  # a flag covers an entity the finder saw, never half a word
            assert not response[a - 1 : a].isalnum() and not response[b : b + 1].isalnum()
    assert flagged[1] >= 3
    assert flagged[1] / total[1] > flagged[0] / total[0]


def _flags(guard: Guard, prompt: str, response: str) -> list[str]:
    """The entity texts the guard flags in ``response``, streamed in random pieces."""
    session = guard.session(prompt=prompt)
    events = []
    for piece in random_splits(response, seed=1):
        events.extend(session.feed(piece))
    events.extend(session.finish().final_events)
    return [response[f.span[0]:f.span[1]] for f in events if isinstance(f, Flag)]


# Typed for this test, in no training set: famous facts the observer knows, each once true and
# once with one entity swapped for a wrong value of the same kind.
NEW_TEXTS = [
    ("Where is the Eiffel Tower?",
     "The Eiffel Tower stands in Paris, on the banks of the Seine.",
     "The Eiffel Tower stands in Berlin, on the banks of the Seine.", "Berlin"),
    ("What is the capital of Japan?",
     "The capital of Japan is Tokyo, its largest city.",
     "The capital of Japan is Nairobi, its largest city.", "Nairobi"),
]


@pytest.mark.parametrize(("prompt", "true", "fabricated", "wrong"), NEW_TEXTS)
def test_shipped_head_flags_a_swapped_entity_in_new_text_and_passes_the_true_one(
        prompt: str, true: str, fabricated: str, wrong: str) -> None:
    host = PluginHost(autoload=False)
    host.register(entity_plugin, name="entity-test")
    guard = Guard(default_policy(host), host=host)
    assert wrong in _flags(guard, prompt, fabricated)
    assert _flags(guard, prompt, true) == []
