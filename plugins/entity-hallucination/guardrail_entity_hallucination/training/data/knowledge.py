"""What the observer itself writes where each labelled span of a build's texts stands.

A probe on the observer's states can only tell a fabricated entity from a true one if the
observer knows the fact. This module measures that per span: the observer continues the text
written before the span (greedy, the record's prompt as the user message, the writer of the own
answers), and the continuation is checked against the fact base like an own answer:

- ``right``: it writes one of the subject's true values (a number within the own answers'
  tolerance);
- ``wrong``: it writes another known value of the span's type;
- ``unchecked``: it writes nothing checkable (an unknown name, a phrase, no number);
- ``no_check``: the span cannot be checked (garak's claims, time zones, a city the fact base
  does not hold).

``bench/entity_eval`` reports span AUC per group. The result is a file beside the data file
(``<name>.knowledge.jsonl``, one row per span in record order), written as it goes so a cut run
resumes; rows that do not match the data file are refused with the line named.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .checks import NUMBER_TYPES, Checker
from .facts import City, Country, FactBase
from .writer import TextWriter

__all__ = ["GROUPS", "KnowledgeError", "knowledge_file", "knowledge_groups", "observer_knowledge"]

GROUPS = ("right", "wrong", "unchecked", "no_check")
LONG_FORM = ("country", "city")
MAX_NAME_TOKENS = 8
MAX_NUMBER_TOKENS = 14  # the own answers' budgets


class KnowledgeError(ValueError):
    """A knowledge file that does not belong to its data file."""


def knowledge_file(data_file: Path) -> Path:
    return data_file.with_name(f"{data_file.stem}.knowledge.jsonl")


def _subject(record: dict[str, Any], facts: FactBase) -> tuple[Country, City | None] | None:
    topic = str(record.get("topic", ""))
    country = facts.countries.get(topic.split(":", 1)[1]) if topic.startswith("country:") \
        else None
    if country is None:
        return None
    if record.get("kind") == "city":
        city = next((c for c in country.cities if c.name == record.get("subject")), None)
        return None if city is None else (country, city)
    return country, None


def _spans(records: Sequence[dict[str, Any]]) -> Iterator[tuple[int, int, dict[str, Any]]]:
    for n, record in enumerate(records):
        for k, span in enumerate(record.get("spans") or []):
            yield n, k, span


def _row(n: int, k: int, record: dict[str, Any], span: dict[str, Any], writer: TextWriter,
         checker: Checker, subject: tuple[Country, City | None] | None) -> dict[str, Any]:
    kind = str(span.get("type", ""))
    row: dict[str, Any] = {"record": n, "span": k, "type": kind, "label": int(span["label"]),
                           "written": record["response"][span["start"]:span["end"]],
                           "group": "no_check"}
    if record.get("kind") not in LONG_FORM or subject is None:
        return row
    country, city = subject
    truths = checker.truths(kind, country, city)  # () for types it cannot check
    if not truths:
        return row
    budget = MAX_NUMBER_TOKENS if kind in NUMBER_TYPES or kind == "calling_code" \
        else MAX_NAME_TOKENS
    generated = writer(record["prompt"], record["response"][:span["start"]].rstrip(),
                       budget).lstrip()
    value = checker.check(kind, generated, truths, country)
    group = "unchecked" if value.label is None else ("right" if value.label == 0 else "wrong")
    row.update(group=group, generated=generated, value=generated[value.start:value.end],
               truth=value.truth)
    return row


def _done(path: Path, records: Sequence[dict[str, Any]],
          expected: Sequence[tuple[int, int, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The rows already in ``path``, checked against the ``expected`` spans in order."""
    if not path.exists():
        return []
    rows: list[dict[str, Any]] = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            row = json.loads(line)
            n, k, span = expected[len(rows)]
            ok = (row["record"], row["span"]) == (n, k) and row["written"] == \
                records[n]["response"][span["start"]:span["end"]] and row["group"] in GROUPS
        except (ValueError, KeyError, IndexError, TypeError):
            ok = False
        if not ok:
            raise KnowledgeError(f"{path}, line {line_no}: does not match the spans of "
                                 "its data file (delete it to measure again)")
        rows.append(row)
    return rows


def observer_knowledge(data_file: Path, writer: TextWriter, facts: FactBase,
                       progress: bool = True) -> list[dict[str, Any]]:
    """One row per span of ``data_file`` (record order), measured with ``writer`` and kept in
    :func:`knowledge_file`; rows already there are reused."""
    records = [json.loads(line) for line in data_file.read_text(encoding="utf-8").splitlines()
               if line.strip()]
    path = knowledge_file(data_file)
    spans = list(_spans(records))
    rows = _done(path, records, spans)
    todo = spans[len(rows):]
    checker = Checker(facts)
    with path.open("a", encoding="utf-8") as fh:
        for n, k, span in tqdm(todo, desc="observer knowledge", unit="span",
                               disable=not progress):
            row = _row(n, k, records[n], span, writer, checker, _subject(records[n], facts))
            fh.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
            fh.flush()
            rows.append(row)
    return rows


def knowledge_groups(rows: Sequence[dict[str, Any]], records: int) -> list[list[str]]:
    """Each record's span groups, in the shape ``evaluation.evaluate_by_type`` takes."""
    out: list[list[str]] = [[] for _ in range(records)]
    for row in rows:
        out[row["record"]].append(row["group"])
    return out
