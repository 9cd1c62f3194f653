"""Built-in text monitors: regular expressions and word lists.

They need no model, and they double as the worked example of a monitor plugin (docs/plugins.md):
stateless monitor objects, per-stream state from ``start()``, one score per new token.
"""

from __future__ import annotations

import bisect
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..hookspecs import RegisterMonitor, hookimpl
from ..monitor import Features, Monitor, MonitorContext, Score

try:  # scans with a timeout and partial matches; plain ``re`` (neither) when it is missing
    import regex as _regex
except ImportError:  # pragma: no cover - regex is a dependency
    _regex = None

__all__ = ["KeywordMonitor", "RegexMonitor"]

MAX_WORDS = 10_000  # words (or patterns) in one monitor: one regex holds them all


class RegexOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    patterns: list[str] = Field(min_length=1, max_length=MAX_WORDS,
                                description="regular expressions (Python syntax)")
    ignore_case: bool = True
    label: str | None = Field(None, description="label shown on flags")
    lookback_chars: int = Field(
        256, ge=1, description="how far back a match may start before the newest token"
    )
    normalize: bool = Field(
        True, description="match through NFKC, dropped invisible characters (zero-width and "
        "direction marks, variation selectors, tag characters, Hangul fillers, control "
        "characters) and Latin look-alikes (Cyrillic/Greek homoglyphs), so 'b\u200bomb' and "
        "'bоmb' still match",
    )
    hold_chars: int = Field(
        128, ge=0, description="with action redact: hold text back while it could still grow "
        "into a match (a card number half streamed), up to this many characters",
    )
    scan_timeout_ms: float = Field(
        1000, gt=0, description="longest one scan may run (the monitor's timeout_ms, when "
        "smaller, wins); a pattern that backtracks past it fails the monitor, which then "
        "follows on_error",
    )

    @field_validator("patterns")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        for i, p in enumerate(patterns):
            try:
                _compile(p, 0)
            except (re.error, ValueError) as exc:
                raise ValueError(f"pattern {i} ({p!r}) does not compile: {exc}") from None
        return patterns


def _compile(pattern: str, flags: int) -> Any:
    """The ``regex`` engine when installed (scans with a timeout, partial matches), else ``re``."""
    re.compile(pattern, flags)  # the documented syntax is Python's
    if _regex is not None:
        try:
            return _regex.compile(pattern, flags | _regex.VERSION0)
        except _regex.error:  # a corner of re's syntax regex reads otherwise: no timeout then
            pass
    return re.compile(pattern, flags)


@dataclass
class _ScanState:
    scanned_to: int = 0  # matches ending at or before this offset were already reported
    reported: set[tuple[int, int]] = field(default_factory=set)
    timeout: float = 0.1  # seconds one scan may take
    # The views of the last scan, kept until ``hold_from`` asks where a possible match starts.
    views: list[tuple[str, Sequence[int]]] | None = None
    hold: int | None = None  # its answer for the last scan


class RegexMonitor(Monitor):
    """Scores 1.0 on every token that a new match of any pattern ends in, 0.0 elsewhere.

    Matches are searched in the text that is final so far (tokens only become final once the text
    after them cannot change them), looking back ``lookback_chars`` so a match may span tokens.
    With the ``regex`` package (a dependency) each scan runs under a timeout, and a redact
    monitor holds back text that is the start of a possible match (``hold_from``).
    """

    Options = RegexOptions
    default_threshold = 0.5
    score_range = (0.0, 1.0)

    def __init__(self, options: RegexOptions) -> None:
        flags = re.IGNORECASE if options.ignore_case else 0
        self.pattern = _compile("|".join(f"(?:{p})" for p in options.patterns), flags)
        self.label = options.label
        self.lookback = options.lookback_chars
        self.normalize = options.normalize
        self.hold_chars = options.hold_chars
        self.timeout = options.scan_timeout_ms / 1000

    def start(self, context: MonitorContext) -> _ScanState:
        timeout = self.timeout
        if context.timeout_ms is not None:
            timeout = min(timeout, context.timeout_ms / 1000)
        return _ScanState(timeout=timeout)

    def update(self, state: _ScanState, features: Features) -> Sequence[Score]:
        if not features.tokens:
            return []
        end = features.tokens[-1].end
        begin = max(0, min(state.scanned_to, features.tokens[0].start) - self.lookback)
        views: list[tuple[str, Sequence[int]]] = (
            normalized_views(features.text, begin, end) if self.normalize
            else [(features.text[begin:end], range(begin, end))]
        )
        hits: list[tuple[int, int]] = []
        for view, index in views:
            for m in self._finditer(view, state.timeout):
                if m.end() <= m.start():
                    continue
                span = (index[m.start()], index[m.end() - 1] + 1)
                if span[1] > state.scanned_to and span not in state.reported:
                    state.reported.add(span)
                    hits.append(span)
        state.scanned_to = end
        state.views = views
        hits.sort(key=lambda s: s[1])
        ends = [s[1] for s in hits]
        scores = []
        for i, tok in zip(features.indices, features.tokens, strict=False):
            k = bisect.bisect_right(ends, tok.start)  # the first match ending inside the token
            hit = hits[k] if k < len(hits) and hits[k][1] <= tok.end else None
            scores.append(Score(i, 1.0 if hit else 0.0, span=hit, label=self.label))
        return scores

    def hold_from(self, state: _ScanState) -> int | None:
        """Where a match that the text after the last scan could complete or extend starts, when
        that is at most ``hold_chars`` back (``regex`` partial matching; ``None`` without it)."""
        if _regex is None or not self.hold_chars:
            return None
        if state.views is not None:  # first call since the last scan
            hold: int | None = None
            for view, index in state.views:
                for m in self._finditer(view, state.timeout, partial=True):
                    if m.end() == len(view) and m.end() > m.start():
                        hold = index[m.start()] if hold is None else min(hold, index[m.start()])
            state.views = None
            if hold is not None and state.scanned_to - hold > self.hold_chars:
                hold = None  # held long enough: a match this long is not what we wait for
            state.hold = hold
        return state.hold

    def _finditer(self, view: str, timeout: float, partial: bool = False) -> list[Any]:
        if _regex is None:
            return list(self.pattern.finditer(view))
        try:
            return list(self.pattern.finditer(view, partial=partial, timeout=timeout))
        except TimeoutError:
            raise TimeoutError(
                f"a pattern scan ran past {timeout * 1000:g} ms (catastrophic backtracking?); "
                "simplify the pattern or raise scan_timeout_ms"
            ) from None


# Hangul fillers render as a blank: a reader sees a space.
_BLANKS = frozenset("\u115f\u1160\u3164\uffa0")
# Default-ignorable code points outside the Cc/Cf categories (Unicode DerivedCoreProperties).
_IGNORABLE_RANGES = ((0x034F, 0x034F), (0x17B4, 0x17B5), (0x180B, 0x180F), (0xFE00, 0xFE0F),
                     (0xFFF0, 0xFFF8), (0x1D173, 0x1D17A), (0xE0000, 0xE0FFF))
# Cyrillic and Greek letters that look like Latin ones (the common confusables).
_LOOKALIKES = str.maketrans(
    "аеорсухАВЕКМНОРСТХіјѕԁɡΑΒΕΖΗΙΚΜΝΟΡΤΥΧονаеі",
    "aeopcyxABEKMHOPCTXijsdgABEZHIKMNOPTYXovaei",
)


def _invisible(ch: str) -> bool:
    """True for a character that renders as nothing (or as a blank, see ``_BLANKS``)."""
    if ch in _BLANKS:
        return True
    if unicodedata.category(ch) in ("Cc", "Cf"):
        return not ch.isspace()
    code = ord(ch)
    return any(lo <= code <= hi for lo, hi in _IGNORABLE_RANGES)


# Characters the view must look at one by one: all but printable ASCII and ASCII whitespace.
_SPECIAL = re.compile(r"[^\t-\r\x1c-\x1f -~]+")


def normalized_views(text: str, begin: int, end: int) -> list[tuple[str, Sequence[int]]]:
    """``text[begin:end]`` folded for matching, with the original offset of every folded char.

    Invisible characters are dropped, so 'pi\u200dpe' reads 'pipe'. When there were any, a second
    view reads each run of them as a space, so 'pipe\u200bbomb' also reads 'pipe bomb' (what a
    reader sees) without making 'pipebomb' match. Linear in ``end - begin``; runs of plain ASCII
    are copied whole."""
    window = text[begin:end]
    specials = list(_SPECIAL.finditer(window))
    if not specials:
        return [(window, range(begin, end))]
    dropped: list[str] = []
    spaced: list[str] = []
    d_index: list[int] = []
    s_index: list[int] = []
    last_invisible = -2  # offset of the last invisible character seen
    done = 0
    for m in [*specials, None]:
        plain_end = m.start() if m is not None else len(window)
        if plain_end > done:
            run = window[done:plain_end]
            dropped.append(run)
            spaced.append(run)
            d_index.extend(range(begin + done, begin + plain_end))
            s_index.extend(range(begin + done, begin + plain_end))
        if m is None:
            break
        done = m.end()
        for pos in range(begin + m.start(), begin + m.end()):
            ch = text[pos]
            if _invisible(ch):
                if last_invisible != pos - 1:  # a run of them reads as one space
                    spaced.append(" ")
                    s_index.append(pos)
                last_invisible = pos
                continue
            folded = unicodedata.normalize("NFKC", ch).translate(_LOOKALIKES)
            dropped.append(folded)
            d_index.extend([pos] * len(folded))
            spaced.append(folded)
            s_index.extend([pos] * len(folded))
    views: list[tuple[str, Sequence[int]]] = [("".join(dropped), d_index)]
    if last_invisible >= 0:
        views.append(("".join(spaced), s_index))
    return views


def normalized(text: str, begin: int, end: int) -> tuple[str, Sequence[int]]:
    """``text[begin:end]`` folded for matching (invisible characters dropped), with the original
    offset of every folded char."""
    return normalized_views(text, begin, end)[0]


# Separators a phrase's words may be written with: spaces, hyphens and dashes, underscores.
_SEP = r"[\s_\-\u2010-\u2015\u2212]+"


def _word_pattern(word: str, *, plural: bool) -> str:
    """``word`` escaped; the last word of a phrase also matches its simple plural."""
    if not plural or not word.isalpha():
        return re.escape(word)
    if len(word) > 2 and word[-1] in "yY" and word[-2].lower() not in "aeiou":
        return re.escape(word[:-1]) + "(?:y|ies)"
    return re.escape(word) + "(?:e?s)?"


class KeywordOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    words: list[str] = Field(
        min_length=1, max_length=MAX_WORDS,
        description="words or phrases, matched whole; a phrase's words may be joined by "
        "spaces, hyphens or underscores, and the last word also matches its simple plural "
        "('pipe bomb' matches 'pipe-bombs')",
    )
    ignore_case: bool = True
    label: str | None = None
    normalize: bool = True
    hold_chars: int = Field(128, ge=0, description="see the regex monitor")


class KeywordMonitor(RegexMonitor):
    """A word list: each word or phrase matches whole (word boundaries on both sides)."""

    Options = KeywordOptions  # type: ignore[assignment]

    def __init__(self, options: KeywordOptions) -> None:
        patterns = []
        for phrase in options.words:
            words = [w for w in re.split(_SEP, phrase.strip()) if w]
            if not words:
                raise ValueError(f"keyword {phrase!r} has no word in it")
            parts = [_word_pattern(w, plural=i == len(words) - 1) for i, w in enumerate(words)]
            patterns.append(r"\b" + _SEP.join(parts) + r"\b")
        super().__init__(
            RegexOptions(patterns=patterns, ignore_case=options.ignore_case, label=options.label,
                         normalize=options.normalize, hold_chars=options.hold_chars)
        )


@hookimpl
def guardrail_register_monitors(register: RegisterMonitor) -> None:
    register("regex", RegexMonitor, description="regular expressions over the streamed text")
    register("keywords", KeywordMonitor, description="a list of words or phrases, matched whole")
