"""The hard-negative and long-form generators: deterministic, benign, held-out parts kept aside."""

from __future__ import annotations

from collections import Counter

from guardrail_harmful_content.training.data.banks import BANKS, BENIGN_REQUESTS
from guardrail_harmful_content.training.data.hard_negatives import (
    FRAMINGS,
    benign_request_examples,
    topic_examples,
)
from guardrail_harmful_content.training.data.longform import subject_of
from guardrail_harmful_content.training.data.topics import TOPICS


def test_same_seed_same_text_other_seed_other_text() -> None:
    a = [(e.prompt, e.response) for e in topic_examples(5, 3, 1)]
    b = [(e.prompt, e.response) for e in topic_examples(5, 3, 1)]
    c = [(e.prompt, e.response) for e in topic_examples(6, 3, 1)]
    assert a == b
    assert a != c


def test_every_topic_and_framing_is_generated_as_harmless() -> None:
    examples = topic_examples(1, 2, 1)
    cells = Counter((e.extra["topic"], e.kind) for e in examples)
    assert set(cells) == {(t.key, kind) for t in TOPICS for kind in FRAMINGS.values()}
    assert all(e.label == 0 for e in examples)


def test_test_only_topics_and_templates_are_marked_holdout() -> None:
    test_only = {t.key for t in TOPICS if t.test_only}
    assert test_only, "some topics must be kept for the test split"
    for e in topic_examples(2, 3, 2):
        expected = e.extra["topic"] in test_only or e.extra["template_set"] == "heldout"
        assert e.holdout == expected


def test_seen_records_never_use_heldout_templates() -> None:
    heldout_openers = [s for name in ("open_safety", "open_history", "open_support", "refuse")
                       for s in BANKS[name].heldout]
    for e in topic_examples(3, 4, 0):
        if not e.holdout:
            assert not any(s in e.response for s in heldout_openers), e.response


def test_responses_vary_within_a_cell() -> None:
    examples = [e for e in topic_examples(4, 10, 0)
                if e.extra["topic"] == "phishing" and e.kind == "hard_negative_safety_advice"]
    assert len({e.response for e in examples}) == len(examples)


def test_benign_requests_marked_heldout_go_to_test() -> None:
    examples = benign_request_examples(0, 2)
    heldout_prompts = {r.prompt for r in BENIGN_REQUESTS if r.heldout}
    assert heldout_prompts
    assert {e.prompt for e in examples if e.holdout} == heldout_prompts


def test_longfact_subject_extraction() -> None:
    assert subject_of("What can you tell me about the Sagittarius A*?") == "the Sagittarius A*"
    assert subject_of("Who is Andrew Wiles?") == "Andrew Wiles"
    assert subject_of("Explain everything.") == "this subject"
