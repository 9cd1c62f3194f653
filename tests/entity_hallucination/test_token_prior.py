"""The token priors of the sixth entity pass (``token_prior``): each a prior surprisal per token
id, built from the model as defined, looked up by id, and read by the span features as
``surprisal - prior`` (a PMI-like score) over the same tokens as the surprisal."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from guardrail_entity_hallucination.span_probe import (
    FEATURE_NEEDS,
    EntitySpanProbe,
    save_span_probe,
    span_features,
)
from guardrail_entity_hallucination.token_prior import PRIORS
from guardrail_entity_hallucination.training.combine import PASS6_GRID, Candidate
from guardrail_entity_hallucination.training.loso import owned_rows
from guardrail_entity_hallucination.training.token_prior import (
    attach_priors,
    build_priors,
    load_token_priors,
    prior_values,
    sample_texts,
)
from guardrail_entity_hallucination.training.train_span import SpanRows
from safetensors.numpy import save_file

from guardrail.testing.tiny_models import build_tiny_model
from guardrail.toolkit.fake import write_jsonl
from guardrail.toolkit.features import CachedRecord

from .place_texts import place_records


def test_span_features_subtract_the_prior_over_the_known_tokens() -> None:
    # the first token has no surprisal (an observer stream's first token): it counts nowhere
    raw = span_features([math.nan, 5.0, 2.0], [1.0, 1.0, 1.0], "NAME",
                        {"prior_merge": [9.0, 1.0, 3.0]})
    assert raw["pmi_merge_max"] == 4.0
    assert raw["pmi_merge_mean"] == 1.5
    assert raw["pmi_merge_sum"] == 3.0
    assert math.isnan(raw["pmi_merge_first"])  # as surprisal_first
    assert raw["prior_merge_max"] == 3.0 and raw["prior_merge_mean"] == 2.0
    assert raw["surprisal_mean"] - raw["prior_merge_mean"] == raw["pmi_merge_mean"]
    assert math.isnan(raw["pmi_start_max"])  # no such prior given: unknown, not 0
    assert "prior_merge_first" not in raw


def test_every_prior_feature_names_the_prior_it_reads() -> None:
    for prior in PRIORS:
        assert FEATURE_NEEDS[f"pmi_{prior}_sum"] == f"prior_{prior}"
        assert FEATURE_NEEDS[f"prior_{prior}_mean"] == f"prior_{prior}"


def test_the_grid_keeps_surprisal_and_pmi_weights_non_negative_and_the_priors_free() -> None:
    names = [c.name for c in PASS6_GRID]
    assert names[0] == "surprisal, ensemble" and len(names) == len(set(names)) == 30
    fitted = next(c for c in PASS6_GRID if c.name == "surprisal+prior-marginal, ensemble")
    assert isinstance(fitted, Candidate) and fitted.monotone and fitted.ensemble
    from guardrail_entity_hallucination.training.combine import MONOTONE

    assert "pmi_marginal_max" in MONOTONE and "prior_marginal_max" not in MONOTONE


def test_lookup_by_id_and_the_file_is_checked(tmp_path: Path) -> None:
    vector = np.array([0.5, 1.5, 2.5], dtype=np.float32)
    values = prior_values(vector, [2, 0, -1, 7])
    assert values[:2] == [2.5, 0.5] and math.isnan(values[2]) and math.isnan(values[3])
    good = tmp_path / "p.safetensors"
    save_file({"merge": vector, "start": vector}, str(good))
    assert set(load_token_priors(good)) == {"merge", "start"}
    bad = tmp_path / "bad.safetensors"
    save_file({"unigram": vector}, str(bad))
    with pytest.raises(ValueError, match="unigram"):
        load_token_priors(bad)


def test_priors_are_built_from_the_model_as_defined(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from guardrail.observer.model import render_context

    model_dir = build_tiny_model(tmp_path / "tiny", num_layers=2, hidden_size=16, seed=3,
                                 spread=0.5)
    data = write_jsonl(tmp_path / "t.jsonl", [
        {"prompt": "Hi.", "response": "Paris is in France."},
        {"prompt": "Tell me.", "response": "Rome had 3 people."},
        {"prompt": "More.", "response": "Oslo."}])
    texts = sample_texts(data, 2)
    assert len(texts) == 2 and texts == sample_texts(data, 2)  # seeded
    priors, meta = build_priors(model_dir, texts, max_tokens=4, progress=False)
    assert tuple(priors) == PRIORS
    # recompute by hand: every response position's distribution, averaged
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    rows = []
    for prompt, response in texts:
        context = render_context(tokenizer, [{"role": "user", "content": prompt}])
        answer = tokenizer(response, add_special_tokens=False)["input_ids"][:4]
        with torch.inference_mode():
            logits = model(torch.tensor([context + answer[:-1]])).logits[0].double()
        rows.append(torch.log_softmax(logits, -1)[len(context) - 1:])
    every = torch.cat(rows)
    assert int(meta["positions"]) == every.shape[0]
    assert np.allclose(priors["marginal"], (-every.exp().mean(0).log()).numpy(), atol=1e-5)
    assert np.allclose(priors["meanlog"], (-every.mean(0)).numpy(), atol=1e-5)
    assert np.allclose(priors["merge"][:3], np.log1p([0, 1, 2]))
    # Jensen: the mean surprisal is never below the surprisal of the mean
    assert (priors["meanlog"] >= priors["marginal"] - 1e-5).all()
    probs = np.exp(-priors["start"].astype(np.float64))
    assert probs.sum() == pytest.approx(1.0, abs=1e-4)


def test_priors_are_attached_to_cached_records_by_token_id() -> None:
    class Record:
        def __init__(self, ids: list[int]) -> None:
            self.ids = torch.tensor(ids)
            self.extra: dict[str, object] = {"token_stats": {"margin": [0.0] * len(ids)}}

    record = Record([2, 0, 1])
    attach_priors([record], {"merge": np.array([0.5, 1.5, 2.5], dtype=np.float32)})
    stats = record.extra["token_stats"]
    assert isinstance(stats, dict)
    assert stats["prior_merge"] == [2.5, 0.5, 1.5] and "margin" in stats


def tiny_place_features(tmp_path: Path, places: int, per: int
                        ) -> tuple[Any, list[CachedRecord]]:
    """A 16-block tiny observer and the cached features (layer 15, logit stats) of
    ``place_records(places, per)`` read through it."""
    from guardrail.observer.hf import load_model_dir
    from guardrail.toolkit.features import extract_features

    model = build_tiny_model(tmp_path / "tiny", num_layers=16, hidden_size=16, seed=5,
                             spread=0.5)
    observer = load_model_dir(model, name="tiny-16", window=512)
    data = write_jsonl(tmp_path / "d.jsonl", place_records(places, per, years=True))
    records = extract_features(observer, data, tmp_path / "cache", [15], stats=True,
                               chunk_size=64, progress=False).records
    return observer, list(records)


def owned_rows_15(records: Sequence[CachedRecord]) -> tuple[SpanRows, np.ndarray]:
    """``loso.owned_rows`` reads layers 15 and 18; a 16-block model has 15 only (the
    feature-only head reads no states)."""
    for record in records:
        record.hidden[18] = record.hidden[15]
    return owned_rows(records)


def test_cached_records_give_each_entity_its_surprisal_over_the_prior(tmp_path: Path) -> None:
    """Offline, the span rows read the attached priors by token id: an entity's pmi feature is
    its tokens' cached surprisal minus their prior, and a candidate reading it is scored."""
    from guardrail_entity_hallucination.span_probe import ALL_FEATURES, span_members
    from guardrail_entity_hallucination.spans import find_entities
    from guardrail_entity_hallucination.training.combine import fit_candidate
    from guardrail_entity_hallucination.training.evaluation import span_probe_scorer

    observer, records = tiny_place_features(tmp_path, 30, 1)
    priors = {"merge": np.log1p(np.arange(observer.vocab, dtype=np.float32)),
              "start": np.linspace(1.0, 9.0, observer.vocab, dtype=np.float32)}
    attach_priors(records, priors)
    rows, _ = owned_rows_15(records)
    first = records[0]
    members = span_members(first.offsets.tolist(), find_entities(first.response, 0, final=True))
    entity = [i for i in members[0] if i > 0]
    assert entity  # the first entity is not the response's first token
    surprisal = first.surprisal.numpy()  # type: ignore[union-attr]
    expected = max(float(surprisal[i]) - float(priors["merge"][int(first.ids[i])])
                   for i in entity)
    assert rows.features[0, ALL_FEATURES.index("pmi_merge_max")] == pytest.approx(expected,
                                                                                  abs=1e-5)
    assert np.isnan(rows.features[:, ALL_FEATURES.index("pmi_marginal_max")]).all()
    probe, _, _ = fit_candidate(rows, Candidate("t", ("pmi_merge_max", "pmi_start_sum"),
                                                monotone=True), 16)
    assert probe.token_needs == {"prior_merge", "prior_start"}
    scores = [v for r in records for v in span_probe_scorer(probe)(r) if v == v]
    assert len(scores) > len(records) and len(set(scores)) > 10


def test_a_head_reading_a_token_prior_is_refused_by_name(tmp_path: Path) -> None:
    """The priors are training features in this pass: the monitor does not load them."""
    from guardrail_entity_hallucination.monitor import EntityHallucinationMonitor
    from guardrail_entity_hallucination.span_probe import SPAN_FEATURES

    from guardrail.probes.heads import LinearProbe

    names = (*SPAN_FEATURES, "pmi_merge_max")
    probe = EntitySpanProbe(LinearProbe(8 + len(names), seed=0), 3, 0.5, names,
                            torch.zeros(len(names)), torch.ones(len(names)))
    weights = save_span_probe(probe, tmp_path / "p.safetensors", {"base_model": "tiny"})
    with pytest.raises(ValueError, match="prior_merge"):
        EntityHallucinationMonitor(EntityHallucinationMonitor.Options(weights=str(weights)))
