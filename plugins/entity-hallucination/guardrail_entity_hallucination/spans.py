"""Entity spans in streamed text, found cheaply: runs of capitalised words (names, places,
languages, joined by "of", "de", ...), numbers (``66,987,244``, ``+253``, ``3.5``, ``67 million``)
and dates (``12 March 1990``, ``March 12, 1990``, years).

A lone capitalised word where a sentence, line or list item starts ("Keep", "Stir", "Once") is
capitalised by position, not because it names something: it is a name only if it is not an
ordinary lower-case word (``ordinary_words.txt``, built by ``training/ordinary_words.py`` from
the project's own texts). A run of two or more capitalised words, and any word mid-sentence,
is a name as before.

A span is *final* once no later text can change it; until then the monitor holds its tokens back.
A span ending at ``e`` is final when the stream has ended or when the text after ``e`` holds a
complete word that cannot continue it (a word followed by whitespace, skipping connectors).
"""

from __future__ import annotations

import re
from collections.abc import Set
from dataclasses import dataclass
from functools import cache
from importlib import resources

__all__ = ["EntitySpan", "find_entities", "ordinary_words", "sentence_start"]

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
i'm i'll i've i'd
""".split())
_MONTHS = frozenset("""january february march april may june july august september october
november december""".split())
# What may stand between a sentence's end (or a list marker) and its first word: spaces, quotes,
# brackets and markdown emphasis.
_LEADING = frozenset(" \t\"'\u201c\u201d\u2018\u2019()[]*_")
# A line's start that is a list marker or a heading: "- ", "* ", "1) ", "(a) ", "## ", "> ".
_LIST_MARKER = re.compile("[ \t]*(?:[-*+\u2022\u2023\u25e6\u2013\u2014>]|#{1,6}"
                          "|\\(?(?:\\d{1,3}|[A-Za-z])[.)])[ \t\"'\u201c\u2018(\\[*_]*")
_MARKER_WIDTH = 12  # the longest line start read as a list marker
_GAP_WIDTH = 64  # the most spaces, quotes and brackets read back from a word: no re-reading a
# long gap on every chunk of a stream
# A full stop that ends a title or an abbreviation, not a sentence ("Dr. Young", "e.g. Rose").
_ABBREVIATION = re.compile(r"(?<![\w.])(?:Mr|Mrs|Ms|Mx|Dr|Prof|St|Mt|Ft|Sr|Jr|Rev|Fr|Gen|Col|Capt"
                           r"|Lt|Sgt|Gov|Sen|Rep|Hon|e\.g|i\.e|vs|cf|approx)\Z")
ORDINARY_FILE = "ordinary_words.txt"  # package data, one lower-case word a line
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


@cache
def ordinary_words() -> frozenset[str]:
    """The shipped list of ordinary lower-case words (``ORDINARY_FILE``; ``#`` lines are its
    header)."""
    text = resources.files(__package__).joinpath(ORDINARY_FILE).read_text(encoding="utf-8")
    return frozenset(line.strip() for line in text.splitlines()
                     if line.strip() and not line.startswith("#"))


def sentence_start(text: str, at: int) -> bool:
    """Whether the word at ``at`` opens the text, a sentence (after ``. ! ? :`` and a space, not
    after "Dr." or "e.g."), a line or a list item ("- ", "1) ", "## "). Reads only the text
    before ``at`` (at most ``_GAP_WIDTH`` characters of gap back to the previous mark, and a few
    before it), so the finder stays linear and a stream decides as the whole text does."""
    i, lowest = at, max(0, at - _GAP_WIDTH)
    while i > lowest and text[i - 1] in _LEADING:
        i -= 1
    if i == 0 or text[i - 1] in "\n\r":
        return True
    if text[i - 1] in ".!?:\u2026" and i < at:
        return not (text[i - 1] == "." and _ABBREVIATION.search(text, max(0, i - 8), i - 1))
    line = text.rfind("\n", max(0, at - _MARKER_WIDTH), at) + 1
    if line == 0 and at > _MARKER_WIDTH:
        return False
    return _LIST_MARKER.fullmatch(text, line, at) is not None


def _ordinary_opener(text: str, start: int, word: str, ordinary: Set[str]) -> bool:
    """A title-case word at a sentence start that is an ordinary lower-case word ("Keep",
    "Once"); a month ("May", "March") stays, for dates."""
    word = word.rstrip("'\u2019-").replace("\u2019", "'")
    if len(word) > 1 and not word[1:].islower():
        return False  # "US", "WHO": an acronym, not a capitalised word
    lower = word.lower()
    return lower in ordinary and lower not in _MONTHS and sentence_start(text, start)


def _names(text: str, start: int, final: bool, ordinary: Set[str]) -> list[tuple[int, int]]:
    """Runs of capitalised words, connectors allowed between two capitalised words; a lone
    sentence-start word that names nothing is left out once no later text can extend it."""
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
        if last == i and (first_word.lower() in _NOT_NAMES
                          or _ordinary_opener(text, s, w, ordinary)):
            # A lone sentence-start word; held (kept, not final) while a capitalised word may
            # still join it ("The" -> "The Hague"), so a stream decides as the whole text does.
            if not final and not _closed(text, run_start, _trim(text, run_end), "NAME"):
                runs.append((run_start, run_end))
        elif first_word.lower() in _NOT_NAMES and last > i:
            # "The Hague" stays; "In France" and "In the US" start at the capitalised word.
            if first_word.lower() != "the":
                run_start = next(ws for ws, _, word in words[i + 1:last + 1]
                                 if word[:1].isupper())
            runs.append((run_start, run_end))
        else:
            runs.append((run_start, run_end))
        i = last + 1
    return [(s, _trim(text, e)) for s, e in runs]


def _trim(text: str, end: int) -> int:
    """A run's end without a trailing apostrophe or hyphen ("Rogers'" -> "Rogers")."""
    return end - (1 if text[end - 1] in "'\u2019-" else 0)


def _closed(text: str, start: int, end: int, kind: str) -> bool:
    """Whether no later text can change a span ``text[start:end]`` of a stream that goes on."""
    after = text[end:end + 2]
    # A name's trailing apostrophe or hyphen is part of its run ("Rogers' Theory", "I'm").
    mark = kind == "NAME" and after[:1] in "'\u2019-"
    if _CLOSED_AFTER.match(text, end + mark) is None:
        return False
    # A trailing mark may still continue a number ("66," -> "66,987").
    if kind != "NAME" and after[:1] in ",." and not after[1:2].isspace():
        return False
    # A full stop that ends the text may still continue a name ("U." -> "U.S").
    if kind == "NAME" and after == ".":
        return False
    # A date or month may still take a day or year ("January 7, " -> "January 7, 1944").
    month = kind == "DATE" or text[start:end].lower() in _MONTHS
    return not (month and len(text) - end <= 2 and after.strip() in ("", ","))


def _numbers(text: str, start: int, final: bool) -> list[tuple[int, int]]:
    out = []
    for m in _NUMBER.finditer(text, start):
        s, e = m.start(), m.end()
        if s > 0 and (text[s - 1].isalnum() or text[s - 1] == "_"):
            continue  # a digit inside a word ("COVID-19" keeps its name run)
        if text[s] in "+\u2212-" and s > 0 and not text[s - 1].isspace() and text[s - 1] != "(":
            s += 1
        out.append((s, e))
    n = len(text)
    if (not final and n > start and text[-1] in "+\u2212-"
            and (n == 1 or text[-2].isspace() or text[-2] == "(")):
        out.append((n - 1, n))  # a sign the next digit would join ("+" -> "+253"): held
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


def find_entities(text: str, start: int = 0, final: bool = False, *,
                  ordinary: Set[str] | None = None) -> list[EntitySpan]:
    """Entity spans in ``text[start:]`` (``start`` must not cut a word), in order; with
    ``final``, the text is complete and every span is final. ``ordinary``: the lower-case words
    a lone sentence-start word is not a name as (default: ``ordinary_words()``; empty: every
    capitalised word but ``_NOT_NAMES`` is one, the finder before session 29)."""
    if ordinary is None:
        ordinary = ordinary_words()
    spans = _merge_dates(text, _names(text, start, final, ordinary), _numbers(text, start, final))
    out: list[EntitySpan] = []
    for s, e, kind in spans:
        if out and s < out[-1].end:  # overlapping kinds: keep the first
            continue
        out.append(EntitySpan(s, e, kind, final or _closed(text, s, e, kind)))
    return out
