from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from guardrail.stream import Aligner, StepToken, StreamStep, WordTokenizer
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
