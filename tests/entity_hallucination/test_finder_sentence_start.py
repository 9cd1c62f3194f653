"""The entity finder and a capitalised word at a sentence, line or list start: an ordinary word
there ("Keep", "Stir", "Once") is not an entity, a name there still is, a word mid-sentence is
treated as before, and a stream read prefix by prefix settles on the whole text's entities."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from guardrail_entity_hallucination.spans import find_entities, ordinary_words, sentence_start
from guardrail_entity_hallucination.training.ordinary_words import build, tokenizer_words

# Instructions as a user's assistant writes them (none of the project's data): imperatives and
# other ordinary words open sentences, lines and list items.
INSTRUCTIONS = (
    "Keep the jar in a cool place. Stir the mixture every few minutes! Never leave it alone.\n"
    "Ingredients:\n"
    "- Add two cups of flour\n"
    "* Mix in the butter\n"
    "3) Wash the tray\n"
    "## Store it dry\n"
    "Once it cools, slice it. Because it crumbles, use a sharp knife. Call a friend: "
    "Open the window and wait. \"Rinse the bowl,\" she said.")


def _names(text: str, ordinary: frozenset[str] | None = None) -> list[str]:
    return [text[s.start:s.end] for s in find_entities(text, final=True, ordinary=ordinary)
            if s.kind == "NAME"]


def test_ordinary_words_opening_sentences_lines_and_list_items_are_not_entities() -> None:
    assert _names(INSTRUCTIONS) == []
    # the finder before this rule took each of them for a name
    assert _names(INSTRUCTIONS, ordinary=frozenset()) == [
        "Keep", "Stir", "Never", "Ingredients", "Add", "Mix", "Wash", "Store", "Once",
        "Because", "Call", "Open", "Rinse"]


@pytest.mark.parametrize(("text", "names"), [
    ("Paris is the capital of France.", ["Paris", "France"]),
    ("Krakow was a royal city. Turkey borders Greece.", ["Krakow", "Turkey", "Greece"]),
    ("Marie Curie won twice. New York is large.", ["Marie Curie", "New York"]),
    ("- Lisbon\n- Porto\n1. Geneva", ["Lisbon", "Porto", "Geneva"]),
    ("Keep Calm was a poster. The Hague hosts courts.", ["Keep Calm", "The Hague"]),
    ("Dr. Young met Mr. Little. May 5, 2001 was a Saturday.",
     ["Dr", "Young", "Mr", "Little", "Saturday"]),
])
def test_names_at_a_sentence_start_are_still_entities(text: str, names: list[str]) -> None:
    assert _names(text) == names


@pytest.mark.parametrize("text", [
    "The label says Keep away, and the brand Stir sells pans in Paris.",
    "They said Never again to Bath and Reading, in Rome.",
    "It was called Once by its author; the sequel, Because, came later.",
])
def test_a_capitalised_word_mid_sentence_is_treated_as_before(text: str) -> None:
    assert _names(text) == _names(text, ordinary=frozenset())
    assert len(_names(text)) >= 2


def test_sentence_start_reads_marks_lines_and_list_markers() -> None:
    text = 'Go. "Run," he said: Stop!\n- Wait\n(b) Look\nThen e.g. Rome or Dr. Who, then Bath.'
    starts = [m for m in ("Go", "Run", "Stop", "Wait", "Look", "Then") if
              sentence_start(text, text.index(m))]
    assert starts == ["Go", "Run", "Stop", "Wait", "Look", "Then"]
    assert not any(sentence_start(text, text.index(m)) for m in ("Rome", "Who", "Bath", "said"))


STREAMED = (
    "Keep it dry. In the US the dial code is +1. The Hague sits near the coast.\n"
    "- Stir gently\nI'm told Carl Rogers' Person-Centred Therapy began on January 7, 1944. "
    "Once done, Krakow waits. A.I. tools help U.S. firms.")


@pytest.mark.parametrize("text", [STREAMED, INSTRUCTIONS])
def test_every_prefix_of_a_stream_agrees_with_the_whole_text(text: str) -> None:
    """A span final in a prefix is a span of the whole text, and every entity of the whole text
    already has a (maybe unfinished) span in each prefix that reaches it, so the monitor never
    hands out part of an entity's tokens as outside every entity."""
    whole = {(s.start, s.end, s.kind) for s in find_entities(text, final=True)}
    for cut in range(1, len(text) + 1):
        spans = find_entities(text[:cut])
        for s in spans:
            if s.final:
                assert (s.start, s.end, s.kind) in whole, (text[:cut], s)
        for start, end, _ in whole:
            if start < cut:
                assert any(s.start < min(end, cut) and s.end > start for s in spans), \
                    (text[:cut], text[start:end])


def test_the_word_list_rule_on_a_small_corpus_and_vocabulary(tmp_path: Path) -> None:
    texts = ["We keep it here and keep it there, and they keep going.",
             "We stir and stir and stir.", "They flew to Paris, then paris, then Paris.",
             "The orange cat and an orange and another orange met Orange and Orange."]
    vocab = {"\u0120keep": 10, "\u0120Keep": 30, "\u0120Paris": 5, "\u0120paris": 40,
             "\u0120orange": 7, "\u0120Orange": 9, "\u0120mark": 11, "\u0120Mark": 20}
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({"model": {"vocab": vocab}}), encoding="utf-8")
    words = tokenizer_words(path)
    assert words == {"keep", "orange", "mark"}  # "paris" comes after "Paris"
    built = build(texts, words)
    # the corpus adds "stir"; it vetoes "orange" (capitalised mid-sentence too often)
    assert "stir" in built and "keep" in built and "mark" in built
    assert "orange" not in built and "paris" not in built


def test_the_shipped_list_holds_everyday_words_and_no_common_place_names() -> None:
    words = ordinary_words()
    assert {"keep", "stir", "add", "never", "mix", "call", "open", "wash", "store", "once",
            "because"} <= words
    assert not {"paris", "krakow", "china", "turkey", "india", "london", "celsius",
                "curie"} & words
