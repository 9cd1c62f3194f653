"""One labelled text, as written to the split files: the labelled-record format plus provenance
(docs/entity-hallucination.md, "Record format")."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .origins import ORIGIN_KEY, origin_of
from .text import Span

__all__ = ["Example"]


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str
    spans: tuple[Span, ...]
    topic: str  # what the text is about; whole topics are held out (e.g. "country:FRA")
    template: str  # the prompt/frame template id; whole ids are held out
    group: str  # records that must share a split (a text's variants, a claim and its counterpart)
    source: str
    templates: tuple[str, ...] = ()  # sentence-template ids used in the response
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        # Response-level label: 1 when any entity in it is fabricated.
        out = {"prompt": self.prompt, "response": self.response,
               "label": int(any(s.label for s in self.spans)),
               "spans": [s.as_dict() for s in self.spans], "topic": self.topic,
               "template": self.template, "templates": list(self.templates),
               "group": self.group, "source": self.source, **self.extra}
        # The source tag for leave-one-source-out validation (data/origins.py).
        out[ORIGIN_KEY] = origin_of(out)
        return out

    @property
    def all_templates(self) -> set[str]:
        return {self.template, *self.templates}
