"""Paired descriptions: the same text in a faithful and a fabricated version.

For the surprisal-baseline comparison (issue 5): each pair shares every character except the
swapped entities, so a score difference between the versions can only come from those entities.
Pairs are drawn from test topics with test-only templates, never seen in training.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .facts import Country
from .longform import TextPair, city_text, country_text
from .records import Example

__all__ = ["PAIR_RATE", "paired_examples"]

PAIR_RATE = 0.3  # share of entity slots swapped in the fabricated version
ATTEMPTS = 8  # seeds tried until a text has at least one swap


def _tag(pair: TextPair, pair_id: str) -> list[Example]:
    mixed, faithful = pair
    return [Example(ex.prompt, ex.response, ex.spans, ex.topic, ex.template, ex.group,
                    ex.source, ex.templates, {**ex.extra, "pair": pair_id, "version": version})
            for ex, version in ((faithful, "true"), (mixed, "fabricated"))]


def paired_examples(countries: Sequence[Country], pool: Sequence[Country],
                    names: Mapping[str, str], allowed: frozenset[str], seed: int,
                    ) -> list[Example]:
    out: list[Example] = []
    for country in countries:
        subjects = [("country", country.name)] + [("city", c.name) for c in country.cities[:1]]
        for kind, subject in subjects:
            for attempt in range(ATTEMPTS):
                key = f"{seed}:paired:{kind}:{country.iso3}:{subject}:{attempt}"
                pair = (country_text(country, pool, names, allowed, key, PAIR_RATE)
                        if kind == "country" else
                        city_text(country.cities[0], country, pool, names, allowed, key,
                                  PAIR_RATE))
                if pair is not None and any(s.label for s in pair[0].spans):
                    out.extend(_tag(pair, f"{kind}:{country.iso3}:{subject}"))
                    break
    return out
