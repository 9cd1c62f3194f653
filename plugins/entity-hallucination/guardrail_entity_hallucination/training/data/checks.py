"""Checks of a value the model wrote against the fact base: a known name of the slot's type, a
number within a factor of the truth, or a calling code digit for digit (see ``own_answers``)."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field

from .facts import City, Country, FactBase
from .languages import LANGUAGE_NAMES

__all__ = ["NUMBER_TOLERANCE", "NUMBER_TYPES", "STOP", "Checker", "Value", "fold",
           "parse_number"]

NUMBER_TOLERANCE = 1.5  # a number within this factor of the truth counts as supported
NUMBER_TYPES = ("population", "area", "city_population")
MAX_NAME_WORDS = 7
STOP = re.compile(r"[,;:!?()\n\"]|(?<!\d)\.|\.(?=\D)")
NUMBER = re.compile(
    r"(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)"
    r"(?:\s*(?P<unit>thousand|million|billion|trillion)\b)?", re.IGNORECASE)
CODE = re.compile(r"\d{1,4}(?:[- ]\d{1,4})?")
HEDGES = re.compile(r"(?:about|around|approximately|roughly|some|over|nearly|almost|just|more "
                    r"than|less than|under)\s+", re.IGNORECASE)
UNITS = {"thousand": 1e3, "million": 1e6, "billion": 1e9, "trillion": 1e12}


def fold(text: str) -> str:
    """Case-, diacritic- and article-insensitive form of a name."""
    decomposed = unicodedata.normalize("NFKD", text)
    plain = "".join(ch for ch in decomposed if not unicodedata.combining(ch)).lower()
    plain = re.sub("[\u2019`]", "'", plain)
    plain = re.sub(r"\s+", " ", plain).strip(" .")
    return plain[4:] if plain.startswith("the ") else plain


def parse_number(text: str) -> float | None:
    """``67 million`` -> 6.7e7, ``1,234`` -> 1234.0; None when ``text`` is not one number."""
    match = NUMBER.fullmatch(text.strip())
    if match is None:
        return None
    value = float(match["num"].replace(",", ""))
    unit = match["unit"]
    return value * UNITS[unit.lower()] if unit else value


@dataclass(frozen=True)
class Value:
    """Where a generated value sits in the continuation, and its check (``label`` None: plain
    text)."""

    start: int
    end: int
    label: int | None
    type: str
    truth: str


@dataclass
class Checker:
    """The fact base's vocabulary per entity type, and the check of one generated value."""

    facts: FactBase
    vocab: dict[str, set[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        cs = list(self.facts.countries.values())
        cities = {fold(n) for n in self.facts.city_country} | {fold(c.capital) for c in cs}
        names = {fold(c.name) for c in cs}
        self.vocab = {
            "capital": cities, "city": cities, "other_city": cities,
            "country": names, "neighbour": names,
            "language": {fold(x) for x in LANGUAGE_NAMES.values()}
            | {fold(x) for c in cs for x in c.languages},
            "currency": {fold(c.currency) for c in cs if c.currency},
            "demonym": {fold(c.demonym) for c in cs if c.demonym},
            "province": {fold(p) for c in cs for p in c.provinces},
            "region": {fold(c.region) for c in cs} | {fold(c.continent) for c in cs
                                                     if c.continent},
            "continent": {fold(c.continent) for c in cs if c.continent},
        }

    def truths(self, kind: str, country: Country, city: City | None) -> tuple[str, ...]:
        """The subject's true values of ``kind`` (several where any of them is right)."""
        c = country
        if kind == "capital":
            return (c.capital,)
        if kind == "city":
            return (c.cities[0].name,) if c.cities else ()
        if kind == "other_city":
            return tuple(x.name for x in c.cities if city is None or x.name != city.name)
        if kind == "country":
            return (c.name,)
        if kind == "neighbour":
            return tuple(self.facts.name(b) for b in c.borders)
        if kind == "language":
            return c.languages
        if kind == "province":
            return tuple(p for p in c.provinces if p != c.name)
        if kind == "region":
            return tuple(x for x in (c.region, c.continent) if x)
        if kind == "population":
            return (str(city.population if city is not None else c.population),)
        if kind == "city_population":
            return (str(c.cities[0].population),) if c.cities else ()
        single = {"continent": c.continent, "currency": c.currency, "demonym": c.demonym,
                  "area": str(c.area) if c.area > 0 else "", "calling_code": c.calling_code}
        value = single.get(kind, "")
        return (value,) if value else ()

    def check(self, kind: str, text: str, truths: Sequence[str], country: Country) -> Value:
        """The value at the start of ``text`` (a continuation, leading spaces stripped)."""
        truth = " | ".join(truths)
        if kind in NUMBER_TYPES:
            return _check_number(kind, text, truths, truth)
        if kind == "calling_code":
            m = CODE.match(text)
            if m is None or not truths:
                return Value(0, 0, None, kind, truth)
            digits = re.sub(r"\D", "", m.group())
            label = int(digits != re.sub(r"\D", "", truths[0]))
            return Value(m.start(), m.end(), label, kind, truth)
        words = list(re.finditer(r"\S+", text))[:MAX_NAME_WORDS]
        best: Value | None = None
        for k, word in enumerate(words):
            candidate = text[words[0].start():word.end()]
            # a trailing comma, full stop, etc. ends the value (inner hyphens and apostrophes
            # belong to it)
            clean = re.sub(r"[,;:!?()\".]+$", "", candidate)
            known = fold(clean)
            if kind == "demonym" and known not in self.vocab[kind] and known.endswith("s"):
                known = known[:-1]  # "Afghans" for "Afghan"
            if clean and known in self.vocab[kind]:
                true = {fold(t) for t in truths}
                best = Value(words[0].start(), words[0].start() + len(clean),
                             int(known not in true), kind, truth)
            if clean != candidate or k + 1 == len(words):
                break
        return best or Value(0, 0, None, kind, truth)


def _check_number(kind: str, text: str, truths: Sequence[str], truth: str) -> Value:
    hedge = HEDGES.match(text)
    skip = hedge.end() if hedge else 0
    m = NUMBER.match(text, skip)
    if m is None or not truths:
        return Value(0, 0, None, kind, truth)
    value = parse_number(m.group())
    real = float(truths[0])
    if value is None or value <= 0 or real <= 0:
        return Value(m.start(), m.end(), None, kind, truth)
    ratio = value / real
    label = int(not 1 / NUMBER_TOLERANCE <= ratio <= NUMBER_TOLERANCE)
    return Value(m.start(), m.end(), label, kind, truth)
