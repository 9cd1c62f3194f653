"""The hard negatives' topics load from ``data/topics.json``: the same banks the build used when
they were Python tuples, and a bad entry is named by its index, key and field."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
from guardrail_harmful_content.training.data.hard_negatives import topic_examples
from guardrail_harmful_content.training.data.topics import TOPICS, read_topics

# Digests of the topics and of the hard negatives generated from them (seed 0, 3 + 1 per cell),
# taken from the Python tables before they became topics.json. Editing a sentence changes them.
TOPICS_SHA256 = "3dcdf5473d710bbdffe46fd54f0081fd232fa082abc7b15ffb8c8abf018c931a"
HARD_NEGATIVES_SHA256 = "a2a0acf9d83ae40c2f1ccb1b35634a6eb91460999a0192c579bb86a41dd52bf7"


def test_the_loaded_topics_are_the_tables_the_build_used() -> None:
    assert len(TOPICS) == 18 and sum(t.test_only for t in TOPICS) == 4
    topics = json.dumps([dataclasses.asdict(t) for t in TOPICS])
    assert hashlib.sha256(topics.encode()).hexdigest() == TOPICS_SHA256
    examples = topic_examples(0, 3, 1)
    assert all(e.messages is None for e in examples)  # single turn: the digest leaves it out
    rows = [{k: v for k, v in dataclasses.asdict(e).items() if k != "messages"}
            for e in examples]
    generated = json.dumps(rows, sort_keys=True, default=str)
    assert hashlib.sha256(generated.encode()).hexdigest() == HARD_NEGATIVES_SHA256


@pytest.mark.parametrize(("row", "message"), [
    ({"key": "x", "subjects": []}, r"topic 0 \('x'\): missing key\(s\) \['harmful_asks'"),
    ({**dataclasses.asdict(TOPICS[0]), "colour": []}, r"unknown key\(s\) \['colour'\]"),
    ({**dataclasses.asdict(TOPICS[0]), "signs": "one sign"}, "'signs' must be a list of strings"),
    ({**dataclasses.asdict(TOPICS[0]), "test_only": "yes"}, "'test_only' must be true or false"),
    ({"subjects": []}, "topic 0: expected an object with a 'key' string"),
])
def test_a_bad_topic_is_named(row: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        read_topics(json.dumps([row]))
