"""The label pipeline on a tiny random model pair: mismatch positions, continuations, judges."""

from __future__ import annotations

from pathlib import Path

import torch
from guardrail_router.lm import ChatLM, load_chat_lm
from guardrail_router.training.judges import KeyTermJudge, every_mismatch
from guardrail_router.training.labels import LabelItem, label_responses

QUESTIONS = ["The capital of France is", "How do I bake bread?", "Marie Curie was born in",
             "Numbers: 3.14159"]


def _items() -> list[LabelItem]:
    facts = {"role": "system", "content": "Facts first."}
    return [LabelItem([{"role": "user", "content": q}], [facts, {"role": "user", "content": q}])
            for q in QUESTIONS]


def _reference_greedy(lm: ChatLM, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by full forwards without cache or padding (an independent path)."""
    ids = list(prompt)
    out = []
    for _ in range(n):
        with torch.no_grad():
            token = int(lm.model(torch.tensor([ids])).logits[0, -1].argmax())
        if token in lm.eos_ids:
            break
        out.append(token)
        ids.append(token)
    return out


def test_mismatch_positions_are_where_the_small_models_greedy_token_differs(
        tiny_pair: tuple[Path, Path]) -> None:
    small, large = (load_chat_lm(p) for p in tiny_pair)
    items = _items()
    labelled = label_responses(small, large, items, every_mismatch, max_new_tokens=10,
                               batch_size=3, progress=False)
    assert len(labelled) == len(items)
    total_mismatches = 0
    for item, result in zip(items, labelled, strict=True):
        large_prompt = large.prompt_ids(item.large_messages)
        assert result.response_ids == _reference_greedy(large, large_prompt, 10)
        small_prompt = small.prompt_ids(item.small_messages)
        with torch.no_grad():
            logits = small.model(torch.tensor([small_prompt + result.response_ids])).logits[0]
        predicted = logits[len(small_prompt) - 1 : -1].argmax(-1).tolist()
        pairs = zip(predicted, result.response_ids, strict=True)
        expected = [i for i, (p, t) in enumerate(pairs) if p != t]
        assert result.mismatch_positions == expected
        # every mismatch is positive: labels mark exactly the mismatches
        assert result.labels == [int(i in expected) for i in range(len(result.response_ids))]
        total_mismatches += len(expected)
        for m in result.mismatches:
            assert m.small_token == predicted[m.position] and m.small_token != m.large_token
            # the large model's continuation is its own response from the mismatch on
            ids = result.response_ids
            assert any(m.large_continuation == large.decode(ids[m.position : m.position + k])
                       for k in range(1, 13))
    assert total_mismatches > 0  # random models disagree somewhere


def test_router_features_come_from_the_state_that_predicts_each_token(
        tiny_pair: tuple[Path, Path]) -> None:
    small, large = (load_chat_lm(p) for p in tiny_pair)
    labelled = label_responses(small, large, _items()[:2], every_mismatch, max_new_tokens=6,
                               top_k=5, progress=False)
    for result in labelled:
        f = result.features
        assert f is not None
        n = len(result.response_ids)
        assert f.hidden.shape == (n, small.model.config.hidden_size)
        assert f.top_logits.shape == (n, 5)
        assert torch.all(f.top_logits[:, :-1] >= f.top_logits[:, 1:])
        assert torch.all((f.max_prob > 0) & (f.max_prob <= 1)) and torch.all(f.entropy >= 0)


def test_key_term_judge_separates_meaning_from_wording() -> None:
    judge = KeyTermJudge()
    assert judge("The capital of France is", " Paris.", " the city of Paris.") == 0
    assert judge("The capital of Chad is", " Kouilé.", " N'Djamena.") == 1
    assert judge("It has", " 5,000 people.", " 5000 people.") == 0
    assert judge("It has", " 5,000 people.", " 7,000 people.") == 1
    assert judge("It is", " a large country.", " a big country.") == 1  # only one word shared
    assert judge("It is", " a large and old country.", " an old and large country.") == 0
