"""SmolLM2's own answers (``data own``): the builder lets a model fill each entity slot, checks the
value against the fact base and writes spans where the value sits, labelled 1 when it is wrong.

The model here is the conftest's tiny Llama that always writes " Rome." (``writer``): every
checkable slot then holds "Rome", which is right as Italy's capital and wrong as France's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from guardrail_entity_hallucination.training.data.facts import FactBase
from guardrail_entity_hallucination.training.data.own_answers import (
    Checker,
    GreedyWriter,
    OwnConfig,
    build_own_answers,
    own_city_text,
    own_country_text,
    parse_number,
)
from guardrail_entity_hallucination.training.data.split import (
    SPLITS,
    allowed_templates,
    choose_holdout,
)

from guardrail.toolkit.records import read_records

PLANTED = " Rome."  # what the conftest's planted model writes


def _country(facts: FactBase, name: str):  # type: ignore[no-untyped-def]
    return next(c for c in facts.countries.values() if c.name == name)


def test_the_planted_model_writes_rome(writer: GreedyWriter) -> None:
    assert writer("Tell me about Italy.", "The capital of Italy is", 8) == PLANTED
    # the KV cache of the shared prefix is reused and cropped; the answer does not change
    assert writer("Tell me about Italy.", "The capital of Italy is Rome. It borders", 8) == PLANTED
    assert writer("Tell me about Italy.", "The capital of Italy is", 8) == PLANTED


def test_spans_cover_the_generated_values_and_labels_follow_the_facts(
        writer: GreedyWriter, facts: FactBase) -> None:
    checker = Checker(facts)
    holdout = choose_holdout(facts.countries.values(), 1234)
    allowed = allowed_templates(holdout, "train") | allowed_templates(holdout, "test")
    italy = own_country_text(_country(facts, "Italy"), writer, checker, allowed, "s:ITA")
    france = own_country_text(_country(facts, "France"), writer, checker, allowed, "s:FRA")
    assert italy is not None and france is not None
    for ex in (italy, france):
        assert ex.extra["kind"] == "own"
        assert ex.spans and all(ex.response[s.start:s.end] == "Rome" for s in ex.spans)
        # "Rome" is no country, language, currency, demonym or number: those slots are not
        # spans, and a sentence with no span is left out of the answer
        assert {s.type for s in ex.spans} <= {"capital", "city", "province"}
        assert "Its population" not in ex.response and "language" not in ex.response
    by_type = {ex.extra["subject"]: {s.type: s.label for s in ex.spans} for ex in (italy, france)}
    assert by_type["Italy"]["capital"] == 0 and by_type["Italy"]["city"] == 0  # Rome is both
    assert by_type["France"]["capital"] == 1 and by_type["France"]["city"] == 1  # Paris is
    record = italy.as_dict()
    assert record["label"] == 0 and record["topic"] == "country:ITA"
    paris = _country(facts, "France").cities[0]
    city = own_city_text(paris, _country(facts, "France"), writer, checker, allowed, "s:PAR")
    assert city is not None and city.extra["subject_kind"] == "city"
    assert {(s.type, s.label) for s in city.spans} <= {("capital", 1), ("other_city", 1)}


def test_values_are_checked_with_tolerance_and_aliases(facts: FactBase) -> None:
    checker = Checker(facts)
    france = _country(facts, "France")
    assert parse_number("67 million") == 67e6 and parse_number("1,234") == 1234
    assert parse_number("Paris") is None
    truth = checker.truths("population", france, None)
    near, far = f"{int(france.population) * 1.4:,.0f}", f"{int(france.population) * 1.6:,.0f}"
    assert checker.check("population", f"{near} people.", truth, france).label == 0
    assert checker.check("population", f"about {far} people.", truth, france).label == 1
    capital = checker.truths("capital", france, None)
    assert checker.check("capital", "PARIS, the", capital, france).label == 0
    value = checker.check("neighbour", "the Democratic Republic of the Congo.",
                          checker.truths("neighbour", france, None), france)
    assert value.label == 1 and value.end == len("the Democratic Republic of the Congo")
    assert checker.check("capital", "a big city.", capital, france).label is None


def test_build_writes_own_splits_next_to_the_build(writer: GreedyWriter, facts: FactBase,
                                                   tiny_build: Path, tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_bytes((tiny_build / "manifest.json").read_bytes())
    manifest = build_own_answers(tmp_path, writer, OwnConfig(limit=1), facts=facts,
                                 progress=False)
    build = json.loads((tmp_path / "manifest.json").read_text(encoding="utf-8"))
    for split in SPLITS:
        records = list(read_records(tmp_path / f"own-{split}.jsonl"))
        assert len(records) == manifest["counts"][split]["records"]
        topics = {r.extra["topic"] for r in records}
        if split == "test":  # held-out topics stay held out
            assert topics <= set(build["holdout"]["test_topics"])
        else:
            assert not topics & set(build["holdout"]["test_topics"])
    again = tmp_path / "again"
    again.mkdir()
    (again / "manifest.json").write_bytes((tiny_build / "manifest.json").read_bytes())
    build_own_answers(again, writer, OwnConfig(limit=1), facts=facts, progress=False)
    for split in SPLITS:  # deterministic
        name = f"own-{split}.jsonl"
        assert (again / name).read_bytes() == (tmp_path / name).read_bytes()


def test_cli_names_the_missing_build(tmp_path: Path) -> None:
    missing = tmp_path / "no-build-here"
    done = subprocess.run(
        [sys.executable, "-m", "guardrail_entity_hallucination.training.data", "own", "--data",
         str(missing)], capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 2
    assert str(missing / "manifest.json") in done.stderr and "build" in done.stderr
