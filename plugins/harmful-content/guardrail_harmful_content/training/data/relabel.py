"""Checked-in label corrections, applied by the build: one record, its new label, a reason.

pyrit's harm files carry one rater's score per response and the many-shot labels are a
model's verdicts, so some "harmless" responses are compliant harmful answers. A correction is
made by reading the record, never from a model's score, and written to ``relabels.jsonl`` (one
JSON object a line)::

    {"id": "r:3f2a9c1b7d04", "source_tag": "pyrit:harm/violence", "label": 1,
     "reason": "step-by-step plan to hurt the neighbour's dog, rated 0.25"}

``id`` is ``record_id`` of the record's prompt and response as the build writes them (after
cutting and added openings); ``label`` is the new label, 0 or 1, or null to drop the record
(not an answer at all). The build applies the file after splitting, so every record keeps its
split and line and only the named records change; a relabelled record carries ``relabel``
(``from``, ``reason``). A copy of a record behind an added opening is a record of its own
(its own id). An id that matches no record is an error in a full build (the file went
stale), and is listed in the manifest of a ``--limit`` build.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from .jsonl import jsonl_objects
from .records import Example, normalise

__all__ = ["DEFAULT_RELABELS", "Relabel", "RelabelError", "apply_relabels", "read_relabels",
           "record_id"]

DEFAULT_RELABELS = Path(__file__).parent / "relabels.jsonl"


class RelabelError(ValueError):
    """A relabel line that does not follow the format, or an id no record carries."""


@dataclass(frozen=True)
class Relabel:
    id: str
    source_tag: str
    label: int | None  # None: drop the record
    reason: str


def record_id(prompt: str, response: str) -> str:
    """A short stable id of a record: its normalised prompt and response, hashed."""
    digest = hashlib.sha1(f"{normalise(prompt)}\x00{normalise(response)}".encode()).hexdigest()
    return f"r:{digest[:12]}"


def read_relabels(path: Path) -> dict[str, Relabel]:
    """The corrections of ``path`` by id; raises ``RelabelError`` naming the line and field."""
    out: dict[str, Relabel] = {}
    for n, row in jsonl_objects(path, RelabelError):
        where = f"{path}:{n}"
        for key in ("id", "source_tag", "reason"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise RelabelError(f"{where}: field {key!r} must be a non-empty string")
        label = row.get("label", "missing")
        if label not in (0, 1, None) or isinstance(label, bool):
            raise RelabelError(f"{where}: field 'label' must be 0, 1 or null, got {label!r}")
        if row["id"] in out:
            raise RelabelError(f"{where}: field 'id' {row['id']!r} appears twice")
        out[row["id"]] = Relabel(row["id"], row["source_tag"], label, row["reason"])
    return out


def apply_relabels(examples: Sequence[Example], relabels: Mapping[str, Relabel]
                   ) -> tuple[list[Example], set[str]]:
    """``examples`` with the corrections applied (dropped ones left out), and the ids used. A
    record relabelled harmful gets its sentences labelled by the preamble rules (no
    ``harm_start``); one relabelled benign gets none harmful."""
    out: list[Example] = []
    used: set[str] = set()
    for ex in examples:
        fix = relabels.get(record_id(ex.prompt, ex.response))
        if fix is None:
            out.append(ex)
            continue
        used.add(fix.id)
        if fix.label is None:
            continue
        out.append(replace(ex, label=fix.label, harm_start=None,
                           extra={**ex.extra,
                                  "relabel": {"from": ex.label, "reason": fix.reason}}))
    return out, used
