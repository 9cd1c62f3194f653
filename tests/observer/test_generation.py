"""Batched greedy decoding (guardrail.observer.generation): a batch gives each prompt the answer
it gets alone, whatever its neighbours' lengths."""

from __future__ import annotations

from pathlib import Path

import pytest

from guardrail.observer.generation import end_of_turn_ids, greedy_batch
from guardrail.testing.tiny_models import build_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path: Path = build_tiny_model(tmp_path_factory.mktemp("gen") / "m", seed=3, spread=0.5)
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def test_a_batch_answers_each_prompt_as_it_would_alone(tiny: tuple[object, object]) -> None:
    model, tokenizer = tiny
    prompts = [tokenizer(text)["input_ids"] for text in  # type: ignore[operator]
               ("The capital of France", "Marie Curie was born in Warsaw in 1867 and won",
                "How do I bake bread?")]
    eos = end_of_turn_ids(tokenizer)
    batch = greedy_batch(model, prompts, 12, eos, pad_id=0)
    alone = [greedy_batch(model, [p], 12, eos, pad_id=0)[0] for p in prompts]
    assert batch == alone
    assert len({tuple(a) for a in alone}) > 1  # the prompts lead somewhere different
    assert all(len(a) <= 12 for a in batch)


def test_stop_and_end_of_turn_end_a_row(tiny: tuple[object, object]) -> None:
    model, tokenizer = tiny
    prompt = tokenizer("The river flows north")["input_ids"]  # type: ignore[operator]
    free = greedy_batch(model, [prompt], 10, set(), pad_id=0)[0]
    assert len(free) == 10
    # The first generated token as end of turn: nothing is generated.
    assert greedy_batch(model, [prompt], 10, {free[0]}, pad_id=0) == [[]]
    assert greedy_batch(model, [prompt], 10, set(), pad_id=0,
                        stop=lambda tokens: len(tokens) == 3) == [free[:3]]


def test_bad_arguments_are_clear(tiny: tuple[object, object]) -> None:
    model, _ = tiny
    assert greedy_batch(model, [], 5, set(), pad_id=0) == []
    with pytest.raises(ValueError, match="at least one token"):
        greedy_batch(model, [[1, 2], []], 5, set(), pad_id=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_batch(model, [[1, 2]], -1, set(), pad_id=0)
