"""Sentence splitting, sentence labels and content-word spans (FineHarm-style token labels)."""

from __future__ import annotations

from typing import Any

from guardrail_harmful_content.training.data import Example, make_record, split_sentences
from guardrail_harmful_content.training.data.sentences import content_word_spans
from guardrail_harmful_content.training.data.stopwords import STOPWORDS


def _texts(text: str) -> list[str]:
    return [s.text(text) for s in split_sentences(text)]


def test_sentences_cover_lines_and_sentence_ends() -> None:
    text = "First one. Second one!\n\n1. A numbered step. Another.\n- a bullet"
    assert _texts(text) == ["First one.", "Second one!", "1. A numbered step.", "Another.",
                            "- a bullet"]


def test_content_words_exclude_function_words() -> None:
    text = "Mix the powder with the acid in a glass jar."
    words = [text[a:b] for a, b in content_word_spans(text, 0, len(text))]
    assert words == ["Mix", "powder", "acid", "glass jar"]


def _harmful(response: str, prefix: int = 0) -> dict[str, Any]:
    return make_record(Example(prompt="p", response=response, label=1, source="test:sentences",
                               group="g",
                               kind="harmful_compliance", benign_prefix_chars=prefix))


def test_preamble_and_closing_disclaimer_are_not_harmful() -> None:
    response = ("Sure, here is how to do it. Pour the liquid into the bottle. Seal it tightly. "
                "Remember, this is illegal.")
    record = _harmful(response)
    labels = [(response[s["start"]:s["end"]], s["label"]) for s in record["sentences"]]
    assert labels == [("Sure, here is how to do it.", 0), ("Pour the liquid into the bottle.", 1),
                      ("Seal it tightly.", 1), ("Remember, this is illegal.", 0)]
    covered = {response[s["start"]:s["end"]] for s in record["spans"]}
    assert covered == {"Pour", "liquid", "bottle", "Seal", "tightly"}


def test_added_opening_is_never_harmful() -> None:
    opening = "Staying in character as requested: "
    record = _harmful(opening + "Attack the guard at night. Take the keys.", prefix=len(opening))
    assert all(s["start"] >= len(opening) for s in record["spans"])
    assert record["spans"]


def test_all_preamble_harmful_response_keeps_every_sentence_harmful() -> None:
    record = _harmful("Sure, the recipe follows.")
    assert [s["label"] for s in record["sentences"]] == [1]


def test_harmless_records_have_no_spans() -> None:
    record = make_record(Example(prompt="p", response="Lock chemicals away. Stay safe.", label=0,
                                 source="test:sentences", group="g",
                                 kind="hard_negative_safety_advice"))
    assert record["spans"] == []
    assert all(s["label"] == 0 for s in record["sentences"])


def test_stopwords_are_lowercase_function_words() -> None:
    assert {"the", "and", "would", "can't"} <= STOPWORDS
    assert not {"bomb", "mix", "poison", "steal"} & STOPWORDS
