"""What the observer knows (``data knowledge``): each labelled span is grouped by what the model
writes where the span stands. The model is the conftest's tiny Llama that writes " Rome." after
any text, so Rome is the truth it "knows" for Italy's capital and a wrong value for France's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from guardrail_entity_hallucination.training.data.facts import FactBase
from guardrail_entity_hallucination.training.data.knowledge import (
    KnowledgeError,
    knowledge_file,
    knowledge_groups,
    observer_knowledge,
)
from guardrail_entity_hallucination.training.data.own_answers import GreedyWriter


def _record(kind: str, topic: str, subject: str, response: str,
            spans: list[tuple[str, str, int]]) -> dict[str, Any]:
    out = []
    for text, kind_of_span, label in spans:
        start = response.index(text)
        out.append({"start": start, "end": start + len(text), "label": label,
                    "type": kind_of_span})
    return {"prompt": f"Tell me about {subject}.", "response": response, "kind": kind,
            "topic": topic, "subject": subject, "label": int(any(s[2] for s in spans)),
            "spans": out}


@pytest.fixture
def data_file(tmp_path: Path, facts: FactBase) -> Path:
    italy = next(c for c in facts.countries.values() if c.name == "Italy")
    records = [
        _record("country", "country:ITA", "Italy",
                "The capital is Rome. About 60 million people live there.",
                [("Rome", "capital", 0), ("60 million", "population", 0)]),
        _record("country", "country:FRA", "France", "The capital is Rome, a lovely city.",
                [("Rome", "capital", 1)]),
        _record("city", "country:ITA", italy.cities[0].name,
                f"{italy.cities[0].name} keeps the time of Europe/Rome.",
                [("Europe/Rome", "timezone", 0)]),
        _record("garak", "company:x", "Acme", "Acme has headquarters in Lyon.",
                [("Lyon", "country", 1)]),
    ]
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_spans_are_grouped_by_what_the_model_writes_there(
        data_file: Path, writer: GreedyWriter, facts: FactBase) -> None:
    rows = observer_knowledge(data_file, writer, facts, progress=False)
    got = [(r["record"], r["written"], r["group"]) for r in rows]
    assert got == [
        (0, "Rome", "right"),         # it writes Italy's true capital
        (0, "60 million", "unchecked"),  # it writes "Rome" where a number stands
        (1, "Rome", "wrong"),         # "Rome" is a known city, not France's capital
        (2, "Europe/Rome", "no_check"),  # time zones are not checked
        (3, "Lyon", "no_check"),      # garak's claims are not long-form texts
    ]
    assert rows[0]["generated"] == "Rome." and rows[0]["truth"] == "Rome"
    assert knowledge_groups(rows, 4) == [["right", "unchecked"], ["wrong"], ["no_check"],
                                         ["no_check"]]


def test_a_cut_run_resumes_and_a_foreign_file_is_refused(
        data_file: Path, writer: GreedyWriter, facts: FactBase) -> None:
    observer_knowledge(data_file, writer, facts, progress=False)
    path = knowledge_file(data_file)
    whole = path.read_text(encoding="utf-8")
    path.write_text("".join(whole.splitlines(keepends=True)[:2]), encoding="utf-8")  # cut
    observer_knowledge(data_file, writer, facts, progress=False)
    assert path.read_text(encoding="utf-8") == whole
    lines = whole.splitlines(keepends=True)
    path.write_text(lines[1] + lines[0], encoding="utf-8")  # rows of another order
    with pytest.raises(KnowledgeError, match=r"test\.knowledge\.jsonl, line 1"):
        observer_knowledge(data_file, writer, facts, progress=False)


def test_cli_names_the_missing_split(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "guardrail_entity_hallucination.training.data", "knowledge",
         "--data", str(tmp_path), "--split", "test"], capture_output=True, text=True, check=False,
        timeout=120)
    assert done.returncode == 2
    assert str(tmp_path / "test.jsonl") in done.stderr and "build" in done.stderr
