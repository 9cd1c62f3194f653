"""Text with labelled entity spans, built piece by piece so every offset is known exactly.

The builder writes the text itself, so it never has to search for an entity afterwards: each
entity is appended with its label and fact type, and its span is the characters it occupies.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["Entity", "Span", "TextBuilder", "template_slots"]


@dataclass(frozen=True)
class Entity:
    """One entity value to place in a text: ``label`` 1 when fabricated, 0 when supported."""

    text: str
    label: int
    type: str


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    label: int
    type: str

    def as_dict(self) -> dict[str, int | str]:
        return {"start": self.start, "end": self.end, "label": self.label, "type": self.type}


def template_slots(template: str) -> list[str]:
    """The ``{slot}`` names of a template, in order."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


@dataclass
class TextBuilder:
    parts: list[str] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)
    length: int = 0

    def add(self, text: str) -> None:
        self.parts.append(text)
        self.length += len(text)

    def add_entity(self, entity: Entity) -> None:
        if not entity.text:
            raise ValueError(f"empty entity of type {entity.type!r}")
        self.spans.append(Span(self.length, self.length + len(entity.text), entity.label,
                               entity.type))
        self.add(entity.text)

    def render(self, template: str, values: Mapping[str, Entity | str]) -> None:
        """Append ``template`` with its slots filled; Entity values become spans."""
        for literal, name, _, _ in string.Formatter().parse(template):
            self.add(literal)
            if name is None:
                continue
            if name not in values:
                raise KeyError(f"template {template!r} needs slot {name!r}")
            value = values[name]
            if isinstance(value, Entity):
                self.add_entity(value)
            else:
                self.add(value)

    @property
    def text(self) -> str:
        return "".join(self.parts)
