"""Offline scores of a head with a prompt term (``scoring.prompt_terms`` into ``prefix_scores``,
what ``bench/harm_eval.py`` reports) equal the monitor's streamed scores: each record's prompt
term read through the observer's cached context states and clipped, the neutral term for an
empty prompt. Without the term the offline scores are the response half alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from guardrail_harmful_content.head import DualHead
from guardrail_harmful_content.training.scoring import (
    prefix_scores,
    prompt_terms,
    stack_layers,
)

from guardrail import Guard
from guardrail.observer.hf import load_model_dir
from guardrail.probes.io import load_probe, save_probe
from guardrail.testing.tiny_models import build_tiny_model
from guardrail.toolkit.features import extract_features

from .tiny_heads import HALFLIFE, HIDDEN, LAYERS, random_head

# float32 products (observer.options.matmul), so reads compare with the HF forward tightly
EXACT = {"matmul": "float32"}

pytest.importorskip("transformers")

RECORDS = [
    {"prompt": "How do I bake bread?",
     "response": "Mix flour, water, salt and yeast; knead it for ten minutes, then let it rise."},
    {"prompt": "Tell me about the river that runs north through the valley.",
     "response": "It flows past the old mill and the church, then into the lake by the town."},
    {"prompt": "Which metals conduct heat best?",
     "response": "Silver conducts heat best, then copper, gold and aluminium."},
    {"prompt": "",
     "response": "The weather stays mild all week, with rain on Thursday and sun at the end."},
]


def _save(folder: Path, head: DualHead, prompt_term: dict[str, float]) -> Path:
    return save_probe(folder, head, {
        "base_model": "tiny", "layer": LAYERS[0], "layers": list(LAYERS),
        "pooling": "prefix_ema", "halflife": HALFLIFE, "dims": {"hidden_size": HIDDEN},
        "threshold": 1.0, "rule": {"kind": "count", "k": 3},  # never halts: every score streams
        "prompt_feature": "context_mean", "prompt_term": prompt_term}, name="harm")


def _streamed(obs: Any, weights: Path, record: dict[str, str]) -> list[float]:
    """The monitor's scores of one record, streamed as ``guardrail eval`` streams it."""
    guard = Guard.from_policy({"monitors": [{
        "id": "harm", "use": "harmful-content", "action": "halt", "threshold": 1.0,
        "rule": {"kind": "count", "k": 3}, "options": {"weights": str(weights)}}]}, observer=obs)
    session = guard.session(prompt=record["prompt"], record_scores=True)
    text = record["response"]
    for i in range(0, len(text), 7):
        session.feed(text[i:i + 7])
    report = session.finish()
    assert not report.halted
    return [s for _, s in report.scores["harm"]]


def test_offline_scores_with_the_prompt_term_equal_the_monitors_streamed_scores(
        tmp_path: Path) -> None:
    model = build_tiny_model(tmp_path / "tiny", arch="llama", num_layers=4, hidden_size=HIDDEN,
                             max_positions=512)
    obs = load_model_dir(model, name="tiny", window=2048, options=EXACT)
    data = tmp_path / "records.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    records = extract_features(obs, data, tmp_path / "features", list(LAYERS),
                               progress=False).records
    stacked = stack_layers(records, LAYERS, "prefix_ema", HALFLIFE)
    cache = tmp_path / "prompt-states" / "tiny.npz"

    # A prompt weight whose raw terms are a few logits apart; the clamp's top cuts the highest
    raw = np.random.default_rng(3).standard_normal((len(LAYERS), HIDDEN))
    wide = _save(tmp_path / "wide", random_head("mlp", raw),
                 {"neutral": 0.0, "low": -1e6, "high": 1e6})
    probe = load_probe(wide)
    assert isinstance(probe.head, DualHead)
    unclipped = prompt_terms(probe.head, probe.config, [r.prompt for r in records], obs, cache)
    assert unclipped is not None
    prompted = sorted(unclipped[:3])
    scale = 3.0 / (prompted[-1] - prompted[0])  # the prompted terms span 3 logits
    spread = [t * scale for t in prompted]
    clamp = {"low": spread[0] - 1.0, "high": (spread[1] + spread[2]) / 2}
    clamp["neutral"] = clamp["low"] + 0.5 * (clamp["high"] - clamp["low"]) + 0.25
    weights = _save(tmp_path / "clamped", random_head("mlp", raw * scale), clamp)
    probe = load_probe(weights)
    assert isinstance(probe.head, DualHead)

    terms = prompt_terms(probe.head, probe.config, [r.prompt for r in records], obs, cache)
    assert terms is not None
    assert terms[3] == clamp["neutral"]  # the empty prompt
    assert sum(t == pytest.approx(clamp["high"], abs=1e-9) for t in terms[:3]) == 1
    offline = prefix_scores(probe.head, stacked, terms)
    alone = prefix_scores(probe.head, stacked)
    for i, record in enumerate(RECORDS):
        streamed = _streamed(obs, weights, record)
        assert len(streamed) == len(offline[i]) > 5
        np.testing.assert_allclose(streamed, offline[i], atol=1e-4)
        # the response half alone is not what the monitor streams
        assert np.max(np.abs(np.asarray(streamed) - np.asarray(alone[i]))) > 1e-2


def test_a_head_without_a_prompt_term_gets_no_terms() -> None:
    head = DualHead(8, dropout=0.0, seed=0)
    assert prompt_terms(head, {"layers": [1]}, ["How do I bake bread?"], None,
                        Path("unused.npz")) is None
