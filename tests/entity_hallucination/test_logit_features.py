"""The logit features of issue 23 (``logit_stats``: the margin to the model's first choice, the
token's rank, the text's own surprisal level before an entity): computed as defined, cached
beside the features, and a span head that reads them scores a stream through the monitor as the
cached evaluation does (observer mode, random stream splits)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import guardrail_entity_hallucination.plugin as entity_plugin
import numpy as np
import pytest
from guardrail_entity_hallucination.logit_stats import token_stats
from guardrail_entity_hallucination.probe import load_entity_probe
from guardrail_entity_hallucination.span_probe import (
    EntitySpanProbe,
    prefix_surprisal,
    save_span_probe,
    span_features,
)
from guardrail_entity_hallucination.training.combine import Candidate, fit_candidate
from guardrail_entity_hallucination.training.evaluation import probe_scorer
from guardrail_entity_hallucination.training.logit_stats import attach, cache_logit_stats
from guardrail_entity_hallucination.training.loso import owned_rows
from guardrail_entity_hallucination.training.train_span import SpanRows

from guardrail import Guard
from guardrail.observer.hf import load_model_dir
from guardrail.plugins import PluginHost
from guardrail.testing import random_splits
from guardrail.testing.tiny_models import build_tiny_model
from guardrail.toolkit.fake import write_jsonl
from guardrail.toolkit.features import CachedRecord, extract_features

from .place_texts import place_records


def test_margin_and_rank_are_read_off_the_distribution() -> None:
    logits = np.log(np.array([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2]], dtype=np.float32))
    out = token_stats(logits, [0, 2])
    assert out["rank"] == [0.0, 2.0]
    assert out["margin"][0] == pytest.approx(0.0)
    assert out["margin"][1] == pytest.approx(math.log(0.5 / 0.2), abs=1e-5)
    assert out["surprisal"][1] == pytest.approx(-math.log(0.2), abs=1e-5)
    assert math.isnan(out["top_entity"][0])  # no vocabulary given: unknown


def test_span_features_read_the_extras_and_the_texts_own_level() -> None:
    raw = span_features([4.0, 2.0], [1.0, 1.5], "NAME", {"margin": [3.0, 0.0],
                                                        "rank": [9.0, 0.0]},
                        prefix_surprisal([math.nan, 1.0, 3.0, 9.0], 3))
    assert raw["excess_max"] == 3.0 and raw["surprisal_rest"] == 2.0
    assert raw["margin_mean"] == 1.5 and raw["log_rank_first"] == pytest.approx(math.log(10))
    assert raw["surprisal_rel_max"] == 2.0  # 4 against the mean 2 of the known tokens before
    assert math.isnan(span_features([1.0], [1.0], "NAME")["margin_max"])


def test_a_head_reading_logit_features_streams_as_cached(tmp_path: Path) -> None:
    model = build_tiny_model(tmp_path / "tiny", num_layers=16, hidden_size=16, seed=5,
                             spread=0.5)
    observer = load_model_dir(model, name="tiny-16", window=512)
    data = write_jsonl(tmp_path / "d.jsonl", place_records(40, 1))
    records = extract_features(observer, data, tmp_path / "cache", [15], stats=True,
                               chunk_size=64, progress=False).records
    stats = cache_logit_stats(observer, data, tmp_path / "cache", progress=False)
    again = cache_logit_stats(observer, data, tmp_path / "cache", progress=False)
    assert np.array_equal(again[3], stats[3], equal_nan=True)  # reloaded from the cache
    surprisal = records[0].surprisal
    assert surprisal is not None
    assert np.allclose(stats[0][1:, 0], surprisal.numpy()[1:], atol=1e-4)
    attach(records, stats)
    rows, _ = owned_rows_15(records)
    features = ("surprisal_max", "margin_mean", "log_rank_max", "surprisal_rel_mean")
    probe, _, _ = fit_candidate(rows, Candidate("t", features, wd_features=0.01), 16)
    assert {"margin", "rank", "prefix"} == set(probe.token_needs)
    weights = save_span_probe(probe, tmp_path / "span.safetensors", {"base_model": "tiny"})
    loaded = load_entity_probe(weights)
    assert isinstance(loaded, EntitySpanProbe) and loaded.features[-3:] == features[1:]
    host = PluginHost(autoload=False)
    host.register(entity_plugin, name="entity-test")
    guard = Guard.from_policy(
        {"observer": {"model": str(model), "window": 512},
         "monitors": [{"id": "facts", "use": "entity-hallucination",
                       "options": {"weights": str(weights)}, "threshold": 0.5,
                       "rule": {"kind": "span_max"}, "action": "flag"}]}, host=host)
    cached = probe_scorer(loaded)
    compared = 0
    for n, record in enumerate(records[:12]):
        session = guard.session(prompt=record.prompt, record_scores=True, dry_run=True)
        for piece in random_splits(record.response, seed=n):
            session.feed(piece)
        streamed = dict(session.finish().scores["facts"])
        expected = {i: v for i, v in enumerate(cached(record)) if i > 0 and v == v}
        assert set(streamed) - {0} == set(expected)
        for i, value in expected.items():
            assert streamed[i] == pytest.approx(value, abs=2e-3)
            compared += 1
    assert compared > 12


def owned_rows_15(records: Sequence[CachedRecord]) -> tuple[SpanRows, np.ndarray]:
    """``loso.owned_rows`` reads layers 15 and 18; a 16-block model has 15 only, so its
    records carry layer 15 under both keys (the feature-only head reads no states)."""
    for record in records:
        record.hidden[18] = record.hidden[15]
    rows, owners = owned_rows(records)
    return rows, owners


def test_a_head_reading_the_first_choice_is_refused_by_name(tmp_path: Path) -> None:
    """``top_entity_first`` needs the tokenizer's vocabulary, which generator streams lack."""
    import torch
    from guardrail_entity_hallucination.monitor import EntityHallucinationMonitor
    from guardrail_entity_hallucination.span_probe import SPAN_FEATURES

    from guardrail.probes.heads import LinearProbe

    names = (*SPAN_FEATURES, "top_entity_first")
    probe = EntitySpanProbe(LinearProbe(8 + len(names), seed=0), 3, 0.5, names,
                            torch.zeros(len(names)), torch.ones(len(names)))
    weights = save_span_probe(probe, tmp_path / "top.safetensors", {"base_model": "tiny"})
    assert load_entity_probe(weights).token_needs == {"top_entity"}  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="top_entity_first"):
        EntityHallucinationMonitor(EntityHallucinationMonitor.Options(weights=str(weights)))


def test_generator_rows_give_the_observers_logit_feature_scores(tmp_path: Path) -> None:
    """An adapter that owns the model sends the generator's rows (row i: the step that produced
    token i); a head reading margin, rank and the text's level scores every entity as on the
    observer."""
    import torch

    from guardrail import StepToken, StreamStep
    from guardrail.probes.heads import LinearProbe

    model = build_tiny_model(tmp_path / "tiny", num_layers=3, hidden_size=16, seed=2,
                             spread=0.5)
    names = ("surprisal_max", "entropy_mean", "margin_mean", "log_rank_max",
             "surprisal_rel_mean", "kind_NUMBER")
    head = LinearProbe(16 + len(names), seed=7)
    probe = EntitySpanProbe(head, 2, 0.5, names, torch.zeros(len(names)),
                            torch.ones(len(names)))
    weights = save_span_probe(probe, tmp_path / "span.safetensors", {"base_model": "tiny"})
    host = PluginHost(autoload=False)
    host.register(entity_plugin, name="entity-test")
    guard = Guard.from_policy(
        {"observer": {"model": str(model), "window": 512},
         "monitors": [{"id": "facts", "use": "entity-hallucination",
                       "options": {"weights": str(weights)}, "threshold": 0.5,
                       "rule": {"kind": "span_max"}, "action": "flag"}]}, host=host)
    text = "Paris had 2,100,000 people in 1990, and Rome is near Lima and Oslo."
    session = guard.session(prompt="Tell me.", record_scores=True)
    session.feed(text)
    observed = dict(session.finish().scores["facts"])
    observer, needs = guard.observer, guard.needs
    state = observer.start([{"role": "user", "content": "Tell me."}], needs)
    tokens = observer.tokenizer.tokenize(text)
    batch = observer.extend(state, tokens, needs)
    hidden = torch.as_tensor(batch.hidden[2])
    logits = torch.as_tensor(batch.logits)
    gen_hidden = torch.cat([torch.zeros_like(hidden[:1]), hidden[:-1]])
    gen_logits = torch.cat([torch.zeros_like(logits[:1]), logits[:-1]])
    session = guard.session(prompt="Tell me.", record_scores=True)
    for i in range(0, len(tokens), 3):
        steps = [StepToken(int(t.id), text[t.start:t.end]) for t in tokens[i:i + 3]
                 if t.id is not None]
        session.feed(StreamStep("".join(t.text for t in steps), tokens=steps,
                                hidden={2: gen_hidden[i:i + 3]}, logits=gen_logits[i:i + 3]))
    generated = dict(session.finish().scores["facts"])
    assert len(generated) > 5
    assert generated.keys() == observed.keys()
    # token 0 has a distribution in generator mode only, so "Paris" differs; the rest agree
    later = {i: v for i, v in generated.items() if tokens[i].start >= len("Paris")}
    assert len(later) > 5
    for index, value in later.items():
        assert value == pytest.approx(observed[index], abs=1e-4)
