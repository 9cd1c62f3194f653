"""The feature cache: what it stores, reuse without the observer, token labels from spans."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from guardrail.monitor import Needs
from guardrail.toolkit.fake import PlantedObserver, planted_records, write_jsonl
from guardrail.toolkit.features import (
    extract_features,
    load_features,
    split_by_prompt,
    token_labels,
    token_span_ids,
    token_weights,
)
from guardrail.toolkit.records import SpanLabel


class CountingObserver(PlantedObserver):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.starts = 0

    def start(self, messages: Any, needs: Needs) -> Any:
        self.starts += 1
        return super().start(messages, needs)


def test_cache_stores_what_was_asked(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", planted_records(6))
    obs = PlantedObserver(hidden_size=8, num_layers=3)
    fs = extract_features(obs, data, tmp_path / "cache", layers=[1, -1], dtype="float16",
                          progress=False)
    assert len(fs) == 6 and fs.layers == [-1, 1] and fs.hidden_size == 8
    r = fs[3]
    tokens = obs.tokenizer.tokenize(r.response)
    assert r.offsets.tolist() == [[t.start, t.end] for t in tokens]
    assert r.ids.tolist() == [t.id for t in tokens]
    assert r.hidden[1].shape == (len(tokens), 8) and r.hidden[1].dtype == torch.float16
    assert r.label == 1 and r.spans and r.prompt == "question 1"
    assert r.top_logits is None and r.surprisal is None


def test_states_match_a_direct_observer_run(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", planted_records(2))
    obs = PlantedObserver(hidden_size=8, num_layers=3)
    fs = extract_features(obs, data, tmp_path / "c", layers=[2], dtype="float32", chunk_size=5,
                          progress=False)
    r = fs[1]
    needs = Needs(layers=frozenset({2}))
    state = obs.start([{"role": "user", "content": r.prompt}], needs)
    direct = obs.extend(state, obs.tokenizer.tokenize(r.response), needs).hidden[2]
    assert torch.equal(r.hidden[2], direct)


def test_second_run_reuses_the_cache_and_reloads_without_observer(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", planted_records(5))
    obs = CountingObserver(hidden_size=8, num_layers=3)
    first = extract_features(obs, data, tmp_path / "cache", layers=[2], progress=False)
    assert obs.starts == 5
    again = extract_features(obs, data, tmp_path / "cache", layers=[2], progress=False)
    assert obs.starts == 5  # nothing recomputed
    assert first.path is not None
    reloaded = load_features(first.path)
    for a, b, c in zip(first.records, again.records, reloaded.records, strict=True):
        assert torch.equal(a.hidden[2], b.hidden[2]) and torch.equal(a.hidden[2], c.hidden[2])
        assert a.spans == c.spans and a.response == c.response
    # Other data or other layers get their own cache entry.
    write_jsonl(data, planted_records(5, seed=1))
    extract_features(obs, data, tmp_path / "cache", layers=[2], progress=False)
    assert obs.starts == 10
    extract_features(obs, data, tmp_path / "cache", layers=[1], progress=False)
    assert obs.starts == 15


def test_many_shards_and_partial_layer_loading(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", planted_records(7))
    obs = PlantedObserver(hidden_size=8, num_layers=3)
    fs = extract_features(obs, data, tmp_path / "c", layers=[0, 2], shard_size=3,
                          progress=False)
    assert fs.path is not None and len(list(fs.path.glob("shard-*.safetensors"))) == 3
    only = load_features(fs.path, layers=[2])
    assert [r.index for r in only] == list(range(7)) and set(only[6].hidden) == {2}
    with pytest.raises(KeyError, match=r"layers \[1\] are not cached"):
        load_features(fs.path, layers=[1])


def test_top_k_and_surprisal_follow_the_logits(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", planted_records(1))
    obs = PlantedObserver(hidden_size=8, num_layers=3, vocab_size=50)
    fs = extract_features(obs, data, tmp_path / "c", layers=[2], top_k=5, stats=True,
                          chunk_size=3, progress=False)
    r = fs[0]
    needs = Needs(layers=frozenset({2}), logits=True)
    state = obs.start([{"role": "user", "content": r.prompt}], needs)
    logits = obs.extend(state, obs.tokenizer.tokenize(r.response), needs).logits
    assert r.top_logits is not None and r.top_ids is not None
    assert r.top_logits.shape == (len(r), 5)
    assert torch.equal(r.top_ids[:, 0], logits.argmax(-1))
    assert r.surprisal is not None and r.entropy is not None
    assert math.isnan(r.surprisal[0].item())
    logp = torch.log_softmax(logits, -1)
    for i in range(1, len(r)):  # across chunk boundaries too (chunk_size=3)
        assert r.surprisal[i].item() == pytest.approx(-logp[i - 1, r.ids[i]].item(), rel=1e-5)
        expected_entropy = -(logp[i - 1].exp() * logp[i - 1]).sum().item()
        assert r.entropy[i].item() == pytest.approx(expected_entropy, rel=1e-5)


def test_empty_response_is_cached(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "response": ""}])
    fs = extract_features(PlantedObserver(hidden_size=8), data, tmp_path / "c", layers=[1],
                          progress=False)
    assert len(fs[0]) == 0 and fs[0].hidden[1].shape == (0, 8) and fs[0].label is None


def test_token_labels_from_char_spans() -> None:
    # "Paris is big": tokens "Paris" (0,5), " is" (5,8), " big" (8,12).
    offsets = [(0, 5), (5, 8), (8, 12)]
    spans = (SpanLabel(0, 5, 1), SpanLabel(9, 12, 0))
    assert token_labels(offsets, spans) == [1, 0, 0]
    assert token_labels(offsets, spans, default=-100) == [1, -100, 0]
    assert token_span_ids(offsets, spans) == [0, -1, 1]
    assert token_weights(offsets, spans) == [10.0, 1.0, 10.0]
    # Zero-width pieces of a multi-byte character belong to that character.
    assert token_labels([(0, 0), (0, 1), (1, 2)], (SpanLabel(0, 1, 1),)) == [1, 1, 0]
    # A token overlapping a positive and a negative span takes the positive label.
    assert token_labels([(0, 6)], (SpanLabel(0, 3, 0), SpanLabel(3, 6, 1))) == [1]


def test_split_by_prompt_keeps_prompts_together(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", planted_records(40))
    fs = extract_features(PlantedObserver(hidden_size=4), data, tmp_path / "c", layers=[1],
                          progress=False)
    train, val, test = split_by_prompt(fs.records, (0.6, 0.2, 0.2), seed=3)
    assert len(train) + len(val) + len(test) == 40
    prompts = [{r.prompt for r in part} for part in (train, val, test)]
    assert not (prompts[0] & prompts[1]) and not (prompts[0] & prompts[2])
    assert not (prompts[1] & prompts[2])
    assert [len(p) for p in prompts] == [12, 4, 4]
