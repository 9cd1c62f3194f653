"""Entity spans in streamed text, found cheaply: runs of capitalised words (names, places,
languages, joined by "of", "de", ...), numbers (``66,987,244``, ``+253``, ``3.5``, ``67 million``)
and dates (``12 March 1990``, ``March 12, 1990``, years).

A span is *final* once no later text can change it; until then the monitor holds its tokens back.
A span ending at ``e`` is final when the stream has ended or when the text after ``e`` holds a
complete word that cannot continue it (a word followed by whitespace, skipping connectors).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["EntitySpan", "find_entities"]

_WORD = re.compile(r"[^\W_](?:[\w'\u2019-]|\.(?=\w))*", re.UNICODE)
_NUMBER = re.compile(
    r"[+\u2212-]?\d(?:[\d,.]*\d)?%?(?:\s+(?:million|billion|thousand|trillion|hundred))?"
)
# Lower-case words that may sit inside a name ("Republic of the Congo", "Rio de Janeiro").
_CONNECTORS = frozenset({"of", "the", "de", "du", "del", "da", "do", "dos", "la", "le", "les",
                         "von", "van", "der", "al", "el", "y", "and"})
# Capitalised words that start sentences but name nothing.
_NOT_NAMES = frozenset("""
the a an it its this that these those there their they he she his her we our you your i in on
at by for from with as of to and or but if when while after before during since about over
under between among also however moreover furthermore meanwhile although though today here yes
no not most many some several each every both all other another such one its own
""".split())
_MONTHS = frozenset("""january february march april may june july august september october
november december""".split())
# After the run: a complete word (or a mark then whitespace) that is not a connector.
_CONNECTOR_RE = "(?:" + "|".join(sorted(_CONNECTORS)) + ")"
_CLOSED_AFTER = re.compile(r"\s*(?:" + _CONNECTOR_RE + r"\s+)*"
                           r"(?:[^\w\s]|(?!" + _CONNECTOR_RE + r"\s)[\w'\u2019.-]+\s)", re.UNICODE)


@dataclass(frozen=True)
class EntitySpan:
    """Char offsets into the text, a coarse kind (``NAME``, ``NUMBER``) and whether later text
    can still change the span."""

    start: int
    end: int
    kind: str
    final: bool


def _names(text: str, start: int) -> list[tuple[int, int]]:
    """Runs of capitalised words, connectors allowed between two capitalised words."""
    words = [(m.start(), m.end(), m.group()) for m in _WORD.finditer(text, start)]
    runs: list[tuple[int, int]] = []
    i = 0
    while i < len(words):
        s, e, w = words[i]
        if not w[:1].isupper() or not w[:1].isalpha():
            i += 1
            continue
        run_start, run_end, last = s, e, i
        cursor, j = e, i + 1
        while j < len(words):
            gap = text[cursor : words[j][0]]
            if gap.strip() or "\n" in gap or len(gap) > 2:
                break
            word = words[j][2]
            cursor = words[j][1]
            if word[:1].isupper() and word[:1].isalpha():
                run_end, last = words[j][1], j
                j += 1
            elif word.lower() in _CONNECTORS and word.lower() != "and":
                j += 1  # keep only if a capitalised word follows
            else:
                break
        first_word = text[run_start:words[i][1]].strip(".")
        if last == i and first_word.lower() in _NOT_NAMES:
            pass  # a lone sentence-start word
        elif first_word.lower() in _NOT_NAMES and last > i:
            nxt = words[i + 1]  # "The Hague" stays, "In France" loses "In"
            if first_word.lower() != "the":
                run_start = nxt[0]
            runs.append((run_start, run_end))
        else:
            runs.append((run_start, run_end))
        i = last + 1
    return [(s, e - (1 if text[e - 1] in "'\u2019-" else 0)) for s, e in runs]


def _numbers(text: str, start: int) -> list[tuple[int, int]]:
    out = []
    for m in _NUMBER.finditer(text, start):
        s, e = m.start(), m.end()
        if s > 0 and (text[s - 1].isalnum() or text[s - 1] == "_"):
            continue  # a digit inside a word ("COVID-19" keeps its name run)
        if text[s] in "+\u2212-" and s > 0 and not text[s - 1].isspace() and text[s - 1] != "(":
            s += 1
        out.append((s, e))
    return out


def _merge_dates(text: str, names: list[tuple[int, int]], numbers: list[tuple[int, int]]
                 ) -> list[tuple[int, int, str]]:
    """Join a month name with an adjacent day or year ("12 March 1990", "March 12, 1990")."""
    spans = [(s, e, "NAME") for s, e in names] + [(s, e, "NUMBER") for s, e in numbers]
    spans.sort()
    merged: list[tuple[int, int, str]] = []
    for s, e, kind in spans:
        if merged:
            ps, pe, pkind = merged[-1]
            gap = text[pe:s]
            month_involved = (pkind == "DATE" or text[ps:pe].lower() in _MONTHS
                              or text[s:e].lower() in _MONTHS)
            if month_involved and len(gap) <= 2 and gap.strip() in ("", ",") and s >= pe:
                merged[-1] = (ps, e, "DATE")
                continue
        merged.append((s, e, kind))
    return merged


def find_entities(text: str, start: int = 0, final: bool = False) -> list[EntitySpan]:
    """Entity spans in ``text[start:]`` (``start`` must not cut a word), in order; with
    ``final``, the text is complete and every span is final."""
    spans = _merge_dates(text, _names(text, start), _numbers(text, start))
    out: list[EntitySpan] = []
    for s, e, kind in spans:
        if out and s < out[-1].end:  # overlapping kinds: keep the first
            continue
        closed = final or _CLOSED_AFTER.match(text, e) is not None
        if closed and not final:
            # A trailing mark may still continue a number ("66," -> "66,987").
            after = text[e:e + 2]
            if kind != "NAME" and after[:1] in ",." and not after[1:2].isspace():
                closed = False
        out.append(EntitySpan(s, e, kind, closed))
    return out
