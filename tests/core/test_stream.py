from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guardrail import Guard, Halt, Release
from guardrail.plugins import PluginHost
from guardrail.stream import (
    Aligner,
    StepToken,
    StreamStep,
    Tokenizer,
    TokenSpan,
    WordTokenizer,
)
from guardrail.testing import random_splits, split_text

TEXT = "The Eiffel Tower, in Paris, was finished in 1889.  It is 330 m tall!\nDone."


def _stream(text: str, deltas: list[str]) -> list[tuple[int, int]]:
    aligner = Aligner(WordTokenizer())
    spans = []
    for d in deltas:
        spans += [(t.start, t.end) for t in aligner.feed(d)]
    spans += [(t.start, t.end) for t in aligner.flush()]
    return spans


def test_tokens_cover_the_text_exactly() -> None:
    spans = _stream(TEXT, [TEXT])
    assert "".join(TEXT[a:b] for a, b in spans) == TEXT
    assert all(b > a for a, b in spans)


def test_splits_inside_words_give_the_same_tokens_as_the_whole_text() -> None:
    whole = [(t.start, t.end) for t in WordTokenizer().tokenize(TEXT)]
    for seed in range(20):
        assert _stream(TEXT, random_splits(TEXT, seed=seed, max_size=5)) == whole
    assert _stream(TEXT, split_text(TEXT, [1])) == whole


@given(st.text(alphabet=st.sampled_from("ab .,\n1é-"), max_size=60), st.integers(0, 10_000))
def test_any_split_matches_whole_text_tokenization(text: str, seed: int) -> None:
    whole = [(t.start, t.end) for t in WordTokenizer().tokenize(text)]
    assert _stream(text, random_splits(text, seed=seed, max_size=7)) == whole


def test_a_token_is_held_until_the_text_after_it_cannot_change_it() -> None:
    aligner = Aligner(WordTokenizer())
    assert aligner.feed("Hel") == []
    assert aligner.feed("lo wor") != []  # "Hello" is final once whitespace follows
    assert aligner.text[: aligner.committed] == "Hello"
    assert [aligner.text[t.start:t.end] for t in aligner.flush()] == [" wor"]


def test_long_text_without_whitespace_is_committed_in_bounded_pieces() -> None:
    aligner = Aligner(WordTokenizer(), max_pending=16, tail=4)
    released = aligner.feed("." * 100)  # punctuation: one token per char, never a whitespace
    assert len(released) == 96
    assert len(aligner.text) - aligner.committed == 4


def test_step_tokens_must_match_step_text() -> None:
    StreamStep("ab", tokens=[StepToken(1, "a"), StepToken(2, "b")])
    try:
        StreamStep("ab", tokens=[StepToken(1, "a")])
    except ValueError as exc:
        assert "decode" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("mismatched tokens accepted")


class CountingTokenizer:
    """Counts the characters handed to the tokenizer: the aligner's work, without a clock."""

    def __init__(self) -> None:
        self.inner = WordTokenizer()
        self.chars = 0

    def tokenize(self, text: str) -> list[TokenSpan]:
        self.chars += len(text)
        return self.inner.tokenize(text)


HOSTILE = {
    "base64-like": "".join("aZ09xQ7mK2pL4vB8"[(i * 7) % 16] for i in range(16_384)),
    "spaces": " " * 16_384,
    "word then spaces": "word" + " " * 16_384 + "end",
    "newlines": "\n" * 16_384,
}


def _spans_with_bound(tokenizer: Tokenizer, text: str, step: int) -> list[tuple[int, int]]:
    aligner = Aligner(tokenizer)
    spans = []
    for i in range(0, len(text), step):
        spans += [(t.start, t.end) for t in aligner.feed(text[i : i + step])]
        assert len(aligner.text) - aligner.committed <= aligner.max_chars + step
    spans += [(t.start, t.end) for t in aligner.flush()]
    return spans


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_text_without_breaks_gives_contiguous_tokens_in_bounded_pieces(case: str) -> None:
    text = HOSTILE[case]
    for step in (1, 16, 1000):
        spans = _spans_with_bound(WordTokenizer(), text, step)
        assert spans[0][0] == 0 and spans[-1][1] == len(text)
        assert all(a < b and b == c for (a, b), (c, _) in itertools.pairwise(spans))
        assert len(spans) > 1  # committed while streaming, not held to the end


@pytest.mark.parametrize("case", [*sorted(HOSTILE), "prose"])
def test_tokenizer_work_grows_linearly_with_the_text(case: str) -> None:
    text = HOSTILE.get(case) or "The quick brown fox jumps over the lazy dog. " * 400
    for step in (1, 16):
        counting = CountingTokenizer()
        _spans_with_bound(counting, text, step)
        assert counting.chars <= 6 * len(text), (step, counting.chars / len(text))


def test_normal_text_tokens_are_unchanged_by_the_caps() -> None:
    text = (TEXT + " ") * 200
    whole = [(t.start, t.end) for t in WordTokenizer().tokenize(text)]
    for seed in range(5):
        assert _stream(text, random_splits(text, seed=seed, max_size=9)) == whole


def test_a_word_longer_than_the_cap_is_cut_into_pieces_of_the_text() -> None:
    aligner = Aligner(WordTokenizer(), max_chars=256)
    word = "x" * 1000
    spans = aligner.feed(word) + aligner.feed(" after")
    assert all(t.end - t.start <= 256 for t in spans)
    pieces = [aligner.text[t.start : t.end] for t in spans + aligner.flush()]
    assert "".join(pieces) == word + " after"


def test_a_session_releases_a_long_unbroken_stream_while_it_streams(host: PluginHost) -> None:
    guard = Guard.from_policy(
        {"monitors": [{"id": "kw", "use": "keywords", "action": "halt",
                       "options": {"words": ["pipe bomb"]}}]},
        host=host,
    )
    text = HOSTILE["base64-like"] + " " * 5000 + "pipe bomb"
    session = guard.session(prompt="encode this")
    events = [e for i in range(0, len(text), 16) for e in session.feed(text[i : i + 16])]
    streamed = "".join(e.text for e in events if isinstance(e, Release))
    assert text.startswith(streamed) and len(streamed) > len(HOSTILE["base64-like"])
    report = session.finish()
    assert isinstance(report.halt, Halt) and report.halt.monitor == "kw"
    assert report.released_text == streamed  # the keyword itself never reached the reader
