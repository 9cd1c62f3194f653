"""True and fabricated entity values for the slots of one country or city text.

``SlotMaker`` knows the true facts of one subject and the pool of other countries a wrong value
may be drawn from (the pool is the subject's own side of the split, so held-out countries never
lend values to training texts). ``entity(slot)`` returns the true value, or with ``fake=True`` a
plausible wrong value of the same type (label 1); ``None`` when the slot has no value.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .facts import City, Country
from .text import Entity
from .values import fake_count, format_count, pick_other

__all__ = ["SlotMaker"]

NUMBER_SLOTS = {"population", "area", "city_population"}


@dataclass
class SlotMaker:
    country: Country
    pool: Sequence[Country]
    names: Mapping[str, str]  # ISO3 -> name of every country (neighbours may be outside the pool)
    rng: random.Random
    number_style: str
    city: City | None = None  # set for city texts
    neighbours: tuple[str, ...] = ()  # ISO3 of the neighbours this text names, in order
    provinces: tuple[str, ...] = ()
    languages: tuple[str, ...] = ()
    used: set[str] = field(default_factory=set)  # values already in the text: never repeat a fake

    def _region_pool(self) -> list[Country]:
        same = [c for c in self.pool if c.region == self.country.region and c is not self.country]
        return same

    def _others(self, attr: str) -> tuple[list[str], list[str]]:
        """Values of ``attr`` in the same region, then anywhere in the pool (never this country)."""
        region = [str(getattr(c, attr)) for c in self._region_pool()]
        anywhere = [str(getattr(c, attr)) for c in self.pool if c.iso3 != self.country.iso3]
        return region, anywhere

    def true_value(self, slot: str) -> str | None:
        c, city = self.country, self.city
        if slot.startswith("neighbour"):
            i = int(slot[-1]) - 1
            return self._name(self.neighbours[i]) if i < len(self.neighbours) else None
        if slot.startswith("province"):
            i = int(slot[-1]) - 1
            return self.provinces[i] if i < len(self.provinces) else None
        if slot.startswith("language"):
            i = int(slot[-1]) - 1
            return self.languages[i] if i < len(self.languages) else None
        if city is not None and slot == "population":
            return format_count(city.population, self.number_style)
        if city is not None and slot == "timezone":
            return city.timezone or None
        if city is not None and slot == "other_city":
            others = [x.name for x in c.cities if x.name != city.name]
            return others[0] if others else None
        values: dict[str, str | None] = {
            "capital": c.capital, "region": c.region, "continent": c.continent or None,
            "population": format_count(c.population, self.number_style),
            "area": format_count(c.area, self.number_style) if c.area > 0 else None,
            "currency": c.currency or None, "demonym": c.demonym or None,
            "calling_code": c.calling_code or None, "country": c.name,
            "city": c.cities[0].name if c.cities else None,
            "city_population": (format_count(c.cities[0].population, self.number_style)
                                if c.cities else None),
        }
        return values.get(slot)

    def _name(self, iso3: str) -> str:
        return self.names[iso3]

    def _fake(self, slot: str, truth: str) -> str | None:
        c, rng = self.country, self.rng
        if slot in NUMBER_SLOTS:
            n = {"population": self.city.population if self.city else c.population,
                 "area": c.area,
                 "city_population": c.cities[0].population if c.cities else 0}[slot]
            return fake_count(n, self.number_style, rng)
        if slot.startswith("neighbour") or slot == "country":
            exclude = {self._name(b) for b in c.borders}
            region, anywhere = self._others("name")
            return pick_other(rng, region, anywhere, exclude | {c.name, truth})
        if slot.startswith("province"):
            region = [p for x in self._region_pool() for p in x.provinces if p != x.name]
            anywhere = [p for x in self.pool for p in x.provinces if x.iso3 != c.iso3]
            return pick_other(rng, region, anywhere, set(c.provinces) | {truth})
        if slot.startswith("language"):
            region = [lang for x in self._region_pool() for lang in x.languages]
            anywhere = [lang for x in self.pool for lang in x.languages]
            return pick_other(rng, region, anywhere, set(c.languages) | {truth})
        if slot in ("city", "other_city"):
            region = [x.cities[0].name for x in self._region_pool() if x.cities]
            anywhere = [x.cities[0].name for x in self.pool if x.cities and x.iso3 != c.iso3]
            own = {x.name for x in c.cities}
            return pick_other(rng, region, anywhere, own | {truth})
        if slot == "timezone":
            region = [x.timezone for o in self._region_pool() for x in o.cities]
            anywhere = [x.timezone for o in self.pool for x in o.cities]
            own = {x.timezone for x in c.cities}
            return pick_other(rng, region, anywhere, own | {truth})
        if slot == "region":
            same_continent = [x.region for x in self.pool if x.continent == c.continent]
            return pick_other(rng, same_continent, [x.region for x in self.pool], {truth})
        if slot == "continent":
            return pick_other(rng, [], [x.continent for x in self.pool], {truth})
        attr = {"capital": "capital", "currency": "currency", "demonym": "demonym",
                "calling_code": "calling_code"}[slot]
        region, anywhere = self._others(attr)
        return pick_other(rng, region, anywhere, {truth})

    def entity(self, slot: str, *, fake: bool) -> Entity | None:
        truth = self.true_value(slot)
        if truth is None:
            return None
        kind = slot.rstrip("123")
        wrong = self._fake(slot, truth) if fake else None
        for _ in range(5):  # a fake that already stands in this text is drawn again
            if wrong is None or wrong not in self.used:
                break
            wrong = self._fake(slot, truth)
        ok = wrong is not None and wrong not in self.used
        entity = Entity(wrong, 1, kind) if ok and wrong else Entity(truth, 0, kind)
        self.used.add(entity.text)
        return entity
