"""Built-in text monitors: regular expressions and word lists.

They need no model, and they double as the worked example of a monitor plugin (docs/plugins.md):
stateless monitor objects, per-stream state from ``start()``, one score per new token.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..hookspecs import RegisterMonitor, hookimpl
from ..monitor import Features, Monitor, MonitorContext, Score

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
        True, description="match through NFKC, dropped zero-width characters and Latin "
        "look-alikes (Cyrillic/Greek homoglyphs), so 'b\u200bomb' and 'bоmb' still match",
    )

    @field_validator("patterns")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        for i, p in enumerate(patterns):
            try:
                re.compile(p)
            except re.error as exc:
                raise ValueError(f"pattern {i} ({p!r}) does not compile: {exc}") from None
        return patterns


@dataclass
class _ScanState:
    scanned_to: int = 0  # matches ending at or before this offset were already reported
    reported: set[tuple[int, int]] = field(default_factory=set)


class RegexMonitor(Monitor):
    """Scores 1.0 on every token that a new match of any pattern ends in, 0.0 elsewhere.

    Matches are searched in the text that is final so far (tokens only become final once the text
    after them cannot change them), looking back ``lookback_chars`` so a match may span tokens.
    """

    Options = RegexOptions
    default_threshold = 0.5
    score_range = (0.0, 1.0)

    def __init__(self, options: RegexOptions) -> None:
        flags = re.IGNORECASE if options.ignore_case else 0
        self.pattern = re.compile("|".join(f"(?:{p})" for p in options.patterns), flags)
        self.label = options.label
        self.lookback = options.lookback_chars
        self.normalize = options.normalize

    def start(self, context: MonitorContext) -> _ScanState:
        return _ScanState()

    def update(self, state: _ScanState, features: Features) -> Sequence[Score]:
        if not features.tokens:
            return []
        end = features.tokens[-1].end
        begin = max(0, min(state.scanned_to, features.tokens[0].start) - self.lookback)
        hits: list[tuple[int, int]] = []
        for span in self._matches(features.text, begin, end):
            if span[1] > span[0] and span[1] > state.scanned_to and span not in state.reported:
                state.reported.add(span)
                hits.append(span)
        state.scanned_to = end
        scores = []
        for i, tok in zip(features.indices, features.tokens, strict=False):
            hit = next((s for s in hits if tok.start < s[1] <= tok.end), None)
            scores.append(Score(i, 1.0 if hit else 0.0, span=hit, label=self.label))
        return scores

    def _matches(self, text: str, begin: int, end: int) -> list[tuple[int, int]]:
        """Match spans in ``text[begin:end]``, as offsets into ``text``."""
        if not self.normalize:
            return [(m.start(), m.end()) for m in self.pattern.finditer(text, begin, end)]
        norm, index = normalized(text, begin, end)
        return [(index[m.start()], index[m.end() - 1] + 1)
                for m in self.pattern.finditer(norm) if m.end() > m.start()]


# Characters that render as nothing: a filter must not let them split a word.
_INVISIBLE = dict.fromkeys(map(ord, "\u00ad\u180e\u200b\u200c\u200d\u2060\u2061\u2062\u2063"
                                "\u2064\ufeff"))
# Cyrillic and Greek letters that look like Latin ones (the common confusables).
_LOOKALIKES = str.maketrans(
    "аеорсухАВЕКМНОРСТХіјѕԁɡΑΒΕΖΗΙΚΜΝΟΡΤΥΧονаеі",
    "aeopcyxABEKMHOPCTXijsdgABEZHIKMNOPTYXovaei",
)


def normalized(text: str, begin: int, end: int) -> tuple[str, list[int]]:
    """``text[begin:end]`` folded for matching, with the original offset of every folded char."""
    out: list[str] = []
    index: list[int] = []
    for pos in range(begin, end):
        ch = text[pos]
        if ord(ch) in _INVISIBLE:
            continue
        folded = unicodedata.normalize("NFKC", ch).translate(_LOOKALIKES)
        out.append(folded)
        index.extend([pos] * len(folded))
    return "".join(out), index


class KeywordOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    words: list[str] = Field(min_length=1, max_length=MAX_WORDS,
                             description="words or phrases, matched whole")
    ignore_case: bool = True
    label: str | None = None
    normalize: bool = True


class KeywordMonitor(RegexMonitor):
    """A word list: each word or phrase matches whole (word boundaries on both sides)."""

    Options = KeywordOptions  # type: ignore[assignment]

    def __init__(self, options: KeywordOptions) -> None:
        patterns = [r"\b" + r"\s+".join(map(re.escape, w.split())) + r"\b" for w in options.words]
        super().__init__(
            RegexOptions(patterns=patterns, ignore_case=options.ignore_case, label=options.label,
                         normalize=options.normalize)
        )


@hookimpl
def guardrail_register_monitors(register: RegisterMonitor) -> None:
    register("regex", RegexMonitor, description="regular expressions over the streamed text")
    register("keywords", KeywordMonitor, description="a list of words or phrases, matched whole")
