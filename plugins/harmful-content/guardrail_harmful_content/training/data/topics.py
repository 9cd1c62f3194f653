"""Sensitive topics for the hard negatives: the same ground the harmful rows cover, written safely.

Every sentence in ``topics.json`` is benign: prevention, warning signs, history, high-level
explanation for recognising a threat, support, fiction without instructions. ``harmful_asks`` are
*prompts* only (answered with refusals that offer an alternative). Topics with ``test_only`` never
appear in train or validation, so the test split measures whether a probe learned harm rather
than topic.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, fields
from importlib.resources import files
from typing import Any

__all__ = ["TOPICS", "Topic", "read_topics"]


@dataclass(frozen=True)
class Topic:
    key: str
    subjects: tuple[str, ...]
    harmful_asks: tuple[str, ...]
    safety: tuple[str, ...]
    signs: tuple[str, ...]
    history: tuple[str, ...]
    explainer: tuple[str, ...]
    fiction: tuple[str, ...]
    resources: tuple[str, ...]
    support: tuple[str, ...] = ()
    test_only: bool = False


def _topic(row: Any, where: str) -> Topic:
    if not isinstance(row, dict) or not isinstance(row.get("key"), str):
        raise ValueError(f"{where}: expected an object with a 'key' string")
    where = f"{where} ({row['key']!r})"
    known = {f.name: f for f in fields(Topic)}
    unknown = sorted(set(row) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}")
    missing = [n for n, f in known.items()
               if n not in row and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}")
    values: dict[str, Any] = {}
    for name, value in row.items():
        if name == "test_only":
            if not isinstance(value, bool):
                raise ValueError(f"{where}: 'test_only' must be true or false")
            values[name] = value
        elif name != "key":
            if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
                raise ValueError(f"{where}: {name!r} must be a list of strings")
            values[name] = tuple(value)
    return Topic(key=row["key"], **values)


def read_topics(text: str, source: str = "topics.json") -> tuple[Topic, ...]:
    """The topics of a ``topics.json`` text; a bad entry is named by its index and key."""
    rows = json.loads(text)
    if not isinstance(rows, list):
        raise ValueError(f"{source}: expected a list of topics")
    return tuple(_topic(row, f"{source}: topic {i}") for i, row in enumerate(rows))


TOPICS: tuple[Topic, ...] = read_topics(
    files(__package__).joinpath("topics.json").read_text(encoding="utf-8"))
