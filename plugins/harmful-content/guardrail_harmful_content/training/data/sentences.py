"""Sentence splitting, sentence labels and FineHarm-style content-word spans.

How a harmful response is labelled (docs/harmful-content.md says the same):

1. The response is cut into sentences: every non-empty line is a unit, and a line is cut again
   after ``.``, ``!`` or ``?`` followed by whitespace.
2. Leading sentences that are a preamble or a disclaimer ("Sure, here is ...", "I must stress
   this is illegal.", "For educational purposes only.") are labelled 0, and so are trailing
   disclaimers ("Remember, this is illegal.", "Stay safe."). Every other sentence is labelled 1.
   A harmful response whose sentences all look like preamble keeps all of them at 1 (the human
   or judge said the response is harmful; we cannot say where).
3. In each harmful sentence the content words (see ``stopwords.py``) become spans with label 1;
   runs of content words separated by single spaces are merged into one span.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .stopwords import STOPWORDS

__all__ = [
    "Sentence",
    "content_word_spans",
    "harmful_sentence_labels",
    "is_disclaimer",
    "is_preamble",
    "split_sentences",
]

_CUT = re.compile(r"(?<=[.!?])[\"')\]]*\s+")
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9'_\-]*")
_LIST_MARKER = re.compile(r"\s*(?:[-*•]\s*)?\(?(?:\d{1,3}|[A-Za-z])[.)]")  # "1." "a)" "- 2."

_PREAMBLE = re.compile(
    r"^\W*(sure|certainly|of course|absolutely|okay|ok|alright|yes|here(?:'s| is| are)|"
    r"below is|the following|as an ai|i (?:can(?:'t|not)|won't|am unable|'m unable|must|should|"
    r"understand|apologi[sz]e)|i'm (?:sorry|not able)|sorry|disclaimer|note:|please note|warning|"
    r"for (?:educational|informational|research) purposes|in this (?:fictional|hypothetical)|"
    r"this is (?:a |purely )?(?:fictional|hypothetical)|(?:imagine|in a world)|"
    r"let'?s (?:begin|start|dive)|great question|happy to help|output of|\$ \./cmd|```)",
    re.IGNORECASE)

_DISCLAIMER = re.compile(
    r"(remember,|please note|disclaimer|i do not condone|i don't condone|this is illegal|"
    r"is (?:highly )?illegal|always consult|use responsibly|stay safe|be careful|"
    r"for (?:educational|informational) purposes|it is important to note|"
    r"seek (?:professional )?help|"
    r"consult (?:a|an|your)|not (?:endorse|encourage)|at your own risk|i hope this helps|"
    r"let me know if|```$)",
    re.IGNORECASE)


@dataclass(frozen=True)
class Sentence:
    """A sentence as char offsets into its response."""

    start: int
    end: int

    def text(self, response: str) -> str:
        return response[self.start:self.end]


def split_sentences(text: str) -> list[Sentence]:
    """Sentences of ``text``, whitespace trimmed, in order, never overlapping."""
    out: list[Sentence] = []
    pos = 0
    for line in text.splitlines(keepends=True):
        line_start = pos
        pos += len(line)
        piece_start = line_start
        for cut in _CUT.finditer(line.rstrip("\r\n")):
            if _LIST_MARKER.fullmatch(text, piece_start, line_start + cut.start()):
                continue  # "1. Do this." is one sentence, not "1." and "Do this."
            _add(out, text, piece_start, line_start + cut.start())
            piece_start = line_start + cut.end()
        _add(out, text, piece_start, line_start + len(line.rstrip("\r\n")))
    return out


def _add(out: list[Sentence], text: str, start: int, end: int) -> None:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    if end > start and re.search("[A-Za-z]", text[start:end]):
        out.append(Sentence(start, end))


def is_preamble(sentence: str) -> bool:
    """A compliance opener, refusal or framing sentence that carries no harmful content."""
    return bool(_PREAMBLE.search(sentence))


def is_disclaimer(sentence: str) -> bool:
    """A closing warning, caveat or pleasantry."""
    return bool(_DISCLAIMER.search(sentence))


def harmful_sentence_labels(response: str, sentences: list[Sentence]) -> list[int]:
    """Sentence labels of a harmful response (rules in the module docstring)."""
    n = len(sentences)
    head = 0
    while head < n and is_preamble(sentences[head].text(response)):
        head += 1
    tail = n
    while tail > head and is_disclaimer(sentences[tail - 1].text(response)):
        tail -= 1
    if head >= tail:
        return [1] * n
    return [1 if head <= i < tail else 0 for i in range(n)]


def content_word_spans(response: str, start: int, end: int) -> list[tuple[int, int]]:
    """Char spans of the content words in ``response[start:end]``, adjacent words merged."""
    spans: list[tuple[int, int]] = []
    for match in _WORD.finditer(response, start, end):
        word = match.group().lower().strip("'-_")
        if not word or word in STOPWORDS or not any(c.isalpha() for c in word):
            continue
        a, b = match.span()
        if spans and response[spans[-1][1]:a] == " ":
            spans[-1] = (spans[-1][0], b)
        else:
            spans.append((a, b))
    return spans
