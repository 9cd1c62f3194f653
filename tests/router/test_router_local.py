"""Token-level routed generation on a tiny random model pair."""

from __future__ import annotations

from pathlib import Path

import pytest
from guardrail_router.head import RouterHead
from guardrail_router.lm import ChatLM, load_chat_lm
from guardrail_router.local import RoutedGenerator, routed_generate_batch, router_scorer

SMALL_MESSAGES = [{"role": "user", "content": "The capital of France is"}]
Pair = tuple[ChatLM, ChatLM, RouterHead]
LARGE_MESSAGES = [{"role": "system", "content": "Paris."}, *SMALL_MESSAGES]


@pytest.fixture(scope="module")
def pair(tiny_pair: tuple[Path, Path]) -> Pair:
    small, large = (load_chat_lm(p) for p in tiny_pair)
    head = RouterHead(small.model.config.hidden_size, small.embedding, top_k=5, width=16,
                      blocks=1, seed=3)
    return small, large, head.eval()  # as loaded heads are: dropout off, scores reproducible


def test_threshold_zero_gives_the_large_models_greedy_output(pair: Pair) -> None:
    small, large, head = pair
    out = RoutedGenerator(small, large, router_scorer(head), 0.0).generate(
        SMALL_MESSAGES, LARGE_MESSAGES, max_new_tokens=12)
    assert out.token_ids == large.greedy([large.prompt_ids(LARGE_MESSAGES)], 12)[0]
    assert all(out.routed)


def test_threshold_one_gives_the_small_models_greedy_output(pair: Pair) -> None:
    small, large, head = pair
    out = RoutedGenerator(small, large, router_scorer(head), 1.0).generate(
        SMALL_MESSAGES, LARGE_MESSAGES, max_new_tokens=12)
    assert out.token_ids == small.greedy([small.prompt_ids(SMALL_MESSAGES)], 12)[0]
    assert not any(out.routed)
    assert small.greedy([small.prompt_ids(SMALL_MESSAGES)], 12)[0] != \
        large.greedy([large.prompt_ids(LARGE_MESSAGES)], 12)[0]  # the two really differ


def _routing_threshold(scores: list[float]) -> float:
    """A threshold that routes about half the tokens, in the widest gap between the middle
    scores: batched forwards differ from single ones in the last float bits, and a threshold
    equal to a score would let that flip a routing decision."""
    ranked = sorted(scores)
    middle = range(len(ranked) // 4, max(len(ranked) // 4 + 1, 3 * len(ranked) // 4))
    i = max(middle, key=lambda j: ranked[j + 1] - ranked[j])
    return (ranked[i] + ranked[i + 1]) / 2


def test_partial_routing_keeps_caches_in_sync(pair: Pair) -> None:
    """Routing some tokens: the catch-up generator, the lockstep batch and a from-scratch replay
    (each model re-reading the whole answer before every token) agree token for token."""
    small, large, head = pair
    scorer = router_scorer(head)
    probe = RoutedGenerator(small, large, scorer, 1.0).generate(SMALL_MESSAGES, LARGE_MESSAGES, 12)
    threshold = _routing_threshold(probe.scores)
    single = RoutedGenerator(small, large, scorer, threshold).generate(
        SMALL_MESSAGES, LARGE_MESSAGES, max_new_tokens=12)
    assert 0 < sum(single.routed) < len(single.routed)
    batch = routed_generate_batch(
        small, large, [small.prompt_ids(SMALL_MESSAGES)] * 2,
        [large.prompt_ids(LARGE_MESSAGES), large.prompt_ids(LARGE_MESSAGES)], scorer, threshold,
        max_new_tokens=12)
    assert batch[0].token_ids == batch[1].token_ids == single.token_ids
    assert batch[0].routed == single.routed
    # replay: each chosen token is what the chosen model's greedy step gives on the full prefix
    small_prompt, large_prompt = small.prompt_ids(SMALL_MESSAGES), large.prompt_ids(LARGE_MESSAGES)
    for i, (token, routed) in enumerate(zip(single.token_ids, single.routed, strict=False)):
        model, prompt = (large, large_prompt) if routed else (small, small_prompt)
        assert model.greedy([prompt + single.token_ids[:i]], 1)[0] == [token]


def test_one_model_with_two_prompts_runs_as_one_batch(pair: Pair) -> None:
    """The offline pair (one model, with and without facts) batches both sides together and
    still gives what the one-at-a-time generator gives."""
    small, _, head = pair
    scorer = router_scorer(head)
    probe = RoutedGenerator(small, small, scorer, 1.0).generate(SMALL_MESSAGES, LARGE_MESSAGES, 12)
    threshold = _routing_threshold(probe.scores)
    single = RoutedGenerator(small, small, scorer, threshold).generate(
        SMALL_MESSAGES, LARGE_MESSAGES, max_new_tokens=12)
    batch = routed_generate_batch(small, small, [small.prompt_ids(SMALL_MESSAGES)],
                                  [small.prompt_ids(LARGE_MESSAGES)], scorer, threshold, 12)
    assert batch[0].token_ids == single.token_ids and batch[0].routed == single.routed
    assert any(single.routed)
