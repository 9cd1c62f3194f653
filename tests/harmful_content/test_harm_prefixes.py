"""Partial outputs for training: a prefix keeps the first rows of the states and is harmful only
once it reaches a harmful span (a disclaimer opening stays benign)."""

from __future__ import annotations

import pytest
import torch
from guardrail_harmful_content.training.prefixes import prefix_view, prefix_views

from guardrail.toolkit.features import CachedRecord
from guardrail.toolkit.records import SpanLabel

OPENING = "I shouldn't, but here it is."
HARM = " Step one: hurt them."


def _record(label: int) -> CachedRecord:
    text = OPENING + HARM
    words = [(i, i + 1) for i in range(len(text))]  # one token per character
    spans = (SpanLabel(len(OPENING) + 1, len(text), 1),) if label else ()
    n = len(words)
    return CachedRecord(index=0, prompt="p", response=text, label=label, spans=spans,
                        offsets=torch.tensor(words), ids=torch.arange(n),
                        hidden={15: torch.arange(n * 2, dtype=torch.float32).reshape(n, 2)})


def test_a_prefix_is_harmful_only_once_it_reaches_harmful_tokens() -> None:
    record = _record(1)
    before = prefix_view(record, len(OPENING) + 1)
    after = prefix_view(record, len(OPENING) + 3)
    assert before.label == 0 and before.response == OPENING + " "
    assert after.label == 1 and after.token_labels()[-1] == 1
    assert torch.equal(after.hidden[15], record.hidden[15][: len(OPENING) + 3])
    assert prefix_view(_record(0), len(record) - 1).label == 0


def test_prefix_views_are_seeded_shorter_copies() -> None:
    records = [_record(1), _record(0)]
    views = prefix_views(records, per_record=3, seed=5)
    assert len(views) == 6 and all(1 <= len(v) < len(records[0]) for v in views)
    assert [len(v) for v in views] == [len(v) for v in prefix_views(records, 3, seed=5)]
    with pytest.raises(ValueError, match="outside"):
        prefix_view(records[0], 0)
