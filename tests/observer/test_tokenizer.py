"""The observer's tokenizer: exact offsets, and streamed text gives the tokens of the whole text."""

from __future__ import annotations

import itertools
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from guardrail.observer.tokenization import HFTokenizer
from guardrail.stream import Aligner
from guardrail.testing.tiny_models import train_tokenizer

TOKENIZER = HFTokenizer(train_tokenizer())

# Words, digits, punctuation, runs of spaces and newlines, accents, CJK and emoji.
PIECES = st.sampled_from(["the", "capital", "Paris", "café", "naïve", "東京", "🙂", "42", "3.14",
                          " ", "  ", "\n", "\n\n", "\t", ",", ".", "?", "'s", "don't", "x",
                          "(", ")", "$", "%", "ß", "–"])
TEXTS = st.lists(PIECES, min_size=1, max_size=25).map("".join)


def stream_ids(tokenizer: HFTokenizer, text: str, cuts: list[int]) -> list[int | None]:
    aligner = Aligner(tokenizer)
    tokens = []
    last = 0
    for cut in [*sorted(set(cuts)), len(text)]:
        tokens += aligner.feed(text[last:cut])
        last = cut
    tokens += aligner.flush()
    return [t.id for t in tokens]


def check_spans(tokenizer: HFTokenizer, text: str) -> None:
    spans = tokenizer.tokenize(text)
    assert spans[0].start == 0 and spans[-1].end == len(text)
    for a, b in itertools.pairwise(spans):
        assert a.end == b.start and a.start <= a.end
    assert [s.id for s in spans] == tokenizer.encode(text)


@settings(max_examples=150, deadline=None)
@given(text=TEXTS, data=st.data())
def test_any_split_into_deltas_gives_the_tokens_of_the_whole_text(text: str,
                                                                   data: st.DataObject) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=12))
    assert stream_ids(TOKENIZER, text, cuts) == TOKENIZER.encode(text)


@settings(max_examples=100, deadline=None)
@given(text=TEXTS)
def test_offsets_cover_the_text_contiguously(text: str) -> None:
    check_spans(TOKENIZER, text)


def test_chunk_boundary_inside_a_word_gives_the_same_tokens() -> None:
    text = "The capital of France is Paris, naïve café 🙂."
    for size in (1, 2, 3, 5, 7):
        cuts = list(range(size, len(text), size))
        assert stream_ids(TOKENIZER, text, cuts) == TOKENIZER.encode(text)


def test_multibyte_pieces_are_zero_width_and_text_round_trips() -> None:
    text = "a 🙂 b"
    spans = TOKENIZER.tokenize(text)
    assert "".join(text[s.start:s.end] for s in spans) == text
    emoji = [s for s in spans if s.end > s.start and "🙂" in text[s.start:s.end]]
    assert len(emoji) == 1
    # every byte piece of the emoji but the last is zero-width
    assert any(s.start == s.end for s in spans)
    assert TOKENIZER.hf.decode([s.id for s in spans]) == text


def test_no_special_tokens_and_no_prefix_space(tiny_llama: Path) -> None:
    from transformers import AutoTokenizer

    tok = HFTokenizer(AutoTokenizer.from_pretrained(tiny_llama))
    spans = tok.tokenize("hello")
    assert tok.hf.decode([s.id for s in spans]) == "hello"
    assert tok.hf.bos_token_id not in [s.id for s in spans]


def test_long_text_without_spaces_keeps_multibyte_characters_whole() -> None:
    # Committed in pieces (no whitespace for thousands of chars): a character split over byte
    # tokens must not be committed in part and then tokenized again from its start.
    text = "🙂東ж" * 700 + " done"
    for step in (1, 16):
        ids = stream_ids(TOKENIZER, text, list(range(step, len(text), step)))
        assert TOKENIZER.hf.decode(ids) == text
