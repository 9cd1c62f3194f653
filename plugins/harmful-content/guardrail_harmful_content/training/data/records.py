"""Training records: the labelled-record format (docs/quickstart.md) plus the builder's fields.

``{"prompt", "response", "label", "spans", "source", "source_tag", "group", "kind", "sentences"}``:
``source_tag`` is the record's source for leave-one-source-out validation (``tags.py``); ``spans``
are content-word spans (label 1) of the harmful sentences; ``sentences`` lists every sentence with
its 0/1 label so a trainer can use sentence-level labels too. A record answering a conversation
also has ``messages`` (the conversation up to and including the final user turn, whose content is
``prompt``), which ``guardrail eval`` and the trainer's observer read as the runtime does.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

from .sentences import content_word_spans, harmful_sentence_labels, split_sentences
from .tags import source_tag

__all__ = ["Example", "dedupe_context", "group_id", "make_record", "normalise", "opening"]

_SPACES = re.compile(r"\s+")


def normalise(text: str) -> str:
    """Lower-cased, whitespace-collapsed text: the key for grouping and deduplication."""
    return _SPACES.sub(" ", text).strip().lower()


def group_id(namespace: str, key: str) -> str:
    """A short stable id for a prompt/objective (``namespace:hash``)."""
    digest = hashlib.sha1(normalise(key).encode("utf-8")).hexdigest()[:12]
    return f"{namespace}:{digest}"


@dataclass(frozen=True)
class Example:
    """A response before labelling: what the sources and generators produce."""

    prompt: str
    response: str
    label: int
    source: str
    group: str
    kind: str
    benign_prefix_chars: int = 0  # harmful records: the first chars are a known-benign preamble
    holdout: bool = False  # generated from a test-only topic or template: forced into test
    # harmful records whose writer marked where the harm begins (char offset): every sentence
    # that ends after it is harmful, every one before it benign; the regexes are not asked
    harm_start: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # the conversation up to and including the final user turn (its content is ``prompt``),
    # normalised; None: the prompt alone, read as one user message
    messages: tuple[dict[str, str], ...] | None = None


def opening(example: Example) -> str:
    """The request an example's group and split follow: its prompt, or for a conversation its
    first user message's content (a short follow-up is read with the turns before it, so every
    conversation that opens with one request stays with that request's other answers)."""
    if example.messages is None:
        return example.prompt
    return next(m["content"] for m in example.messages if m["role"] == "user")


def dedupe_context(example: Example) -> str | tuple[tuple[str, str], ...]:
    """What the observer reads before the answer, normalised (deduplication's key beside the
    response): the prompt, or every turn of the conversation."""
    if example.messages is None:
        return normalise(example.prompt)
    return tuple((m["role"], normalise(m["content"])) for m in example.messages)


def make_record(example: Example) -> dict[str, Any]:
    """The JSON object for one example, with sentence labels and content-word spans."""
    response = example.response
    sentences = split_sentences(response)
    if example.label == 1 and example.harm_start is not None:
        labels = [int(s.end > example.harm_start) for s in sentences]
    elif example.label == 1:
        labels = harmful_sentence_labels(response, sentences)
        if example.benign_prefix_chars:
            labels = [0 if s.start < example.benign_prefix_chars else lab
                      for s, lab in zip(sentences, labels, strict=True)]
            if not any(labels):
                labels = [0 if s.start < example.benign_prefix_chars else 1 for s in sentences]
    else:
        labels = [0] * len(sentences)
    spans = [{"start": a, "end": b, "label": 1}
             for s, lab in zip(sentences, labels, strict=True) if lab
             for a, b in content_word_spans(response, s.start, s.end)]
    record: dict[str, Any] = {
        "prompt": example.prompt,
        **({} if example.messages is None else {"messages": [dict(m) for m in example.messages]}),
        "response": response,
        "label": example.label,
        "spans": spans,
        "source": example.source,
        "source_tag": source_tag(example.source, example.kind, example.extra),
        "group": example.group,
        "kind": example.kind,
        "sentences": [{"start": s.start, "end": s.end, "label": lab}
                      for s, lab in zip(sentences, labels, strict=True)],
    }
    record.update(example.extra)
    return record
