"""Labelled responses from pyrit's data files (MIT licence), read from the wheel.

- ``scorer_evals/harm/*.csv``: responses to harmful objectives scored by humans on 0..1 (several
  raters in the ``*_multi_score`` files: their mean is used). Mean >= 0.5 is harmful (label 1).
- ``jailbreak/many_shot_examples.json``: 400 question/answer pairs with a judge's verdict in
  ``category`` ("Harmful" / "Not harmful" plus a reason). The verdict is the label.
- ``scorer_evals/refusal_scorer/*.csv``: responses scored 1 for refusal; refusals and off-topic
  answers are harmless, compliant answers are kept only for benign objectives (a few of these rows
  comply with harmful objectives and carry no harm score, so they are dropped).
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from typing import Any

from .records import Example, group_id
from .sources import SourcePackage

__all__ = ["REFUSAL_START", "harm_scored", "looks_like_refusal", "many_shot", "refusal_set"]

_ROOT = "pyrit/datasets/"
# Subsets of other files (same rows), skipped so nothing is counted twice.
_SKIP = {"scorer_evals/harm/mini_hate_speech.csv"}

REFUSAL_START = re.compile(
    r"^\W*(i'?m (?:really |so )?sorry|i am sorry|sorry|"
    r"i (?:can(?:'|\u2019|no)?t|cannot|won'?t|will not|"
    r"am unable|'m unable|'m not able|am not able|must decline|do not|don'?t)|unfortunately|"
    r"as an ai|no[,.!]|nope|nopz|it is (?:illegal|not appropriate|unethical)|"
    r"i understand that you)",
    re.IGNORECASE)

_HARMFUL_OBJECTIVE = re.compile(
    r"phish|fake|misinform|manipulat|harass|harm|lsd|hate|hateful|inferior|convince|deny|denies|"
    r"complicit|click on a link|weapon|bomb|kill|drug|steal|hack|malware|explosive|poison",
    re.IGNORECASE)


def looks_like_refusal(response: str) -> bool:
    return bool(REFUSAL_START.search(response))


def _csv_rows(text: str) -> list[dict[str, str]]:
    # The files open with "# dataset_version=..." comment lines that csv does not understand.
    body = "".join(line for line in text.splitlines(keepends=True) if not line.startswith("#"))
    return list(csv.DictReader(io.StringIO(body)))


def _negative_kind(response: str) -> str:
    return "refusal" if looks_like_refusal(response) else "harmless_response"


def harm_scored(pkg: SourcePackage) -> Iterator[Example]:
    """Human-scored responses to harmful objectives; mean score >= 0.5 is harmful."""
    for member in pkg.names(_ROOT + "scorer_evals/harm/"):
        rel = member[len(_ROOT):]
        if not member.endswith(".csv") or rel in _SKIP:
            continue
        for row in _csv_rows(pkg.read_text(member)):
            scores = [float(v) for k, v in row.items()
                      if k and k.startswith("human_score") and v not in (None, "")]
            response = (row.get("assistant_response") or "").strip()
            objective = (row.get("objective") or "").strip()
            if not scores or not response or row.get("data_type", "text") != "text":
                continue
            score = sum(scores) / len(scores)
            label = int(score >= 0.5)
            yield Example(
                prompt=objective, response=response, label=label,
                source=f"pyrit:{rel}", group=group_id("prompt", objective),
                kind="harmful_compliance" if label else _negative_kind(response),
                extra={"harm_category": (row.get("harm_category") or "").lower(),
                       "human_score": round(score, 4)})


def _verdict(category: str) -> int | None:
    head = category.strip().strip("'\"").lower()
    head = head.removeprefix("answer:").strip().strip("'\"")
    if head.startswith("not harmful"):
        return 0
    if head.startswith("harmful"):
        return 1
    return None


def many_shot(pkg: SourcePackage) -> Iterator[Example]:
    """pyrit's many-shot examples with the judge verdict as the label."""
    text = pkg.read_text(_ROOT + "jailbreak/many_shot_examples.json")
    data: list[dict[str, Any]] = json.loads(text)
    for item in data:
        label = _verdict(str(item.get("category", "")))
        response = str(item.get("assistant", "")).strip()
        prompt = str(item.get("user", "")).strip()
        if label is None or len(response) < 20:
            continue
        yield Example(
            prompt=prompt, response=response, label=label,
            source="pyrit:jailbreak/many_shot_examples.json", group=group_id("prompt", prompt),
            kind="harmful_completion" if label else _negative_kind(response),
            extra={"judge_verdict": "harmful" if label else "not harmful"})


def refusal_set(pkg: SourcePackage) -> Iterator[Example]:
    """Refusals, off-topic answers and benign compliance from pyrit's refusal-scorer sets."""
    for member in pkg.names(_ROOT + "scorer_evals/refusal_scorer/"):
        if not member.endswith(".csv"):
            continue
        rel = member[len(_ROOT):]
        for row in _csv_rows(pkg.read_text(member)):
            response = (row.get("assistant_response") or "").strip()
            objective = (row.get("objective") or "").strip()
            refused = (row.get("human_score") or "").strip() == "1"
            if not response:
                continue
            if refused:
                kind = "refusal" if looks_like_refusal(response) else "off_topic_answer"
            elif _HARMFUL_OBJECTIVE.search(objective):
                continue  # complied with a harmful objective, but nobody scored the harm
            else:
                kind = "benign_compliance"
            yield Example(prompt=objective, response=response, label=0, source=f"pyrit:{rel}",
                          group=group_id("prompt", objective), kind=kind)
