"""The trainer's pieces: country-disjoint splits, seeded training that learns, checkable answers."""

from __future__ import annotations

import torch
from guardrail_router.training.facts import is_correct, load_facts, make_questions
from guardrail_router.training.train import fit_router, score_tokens, split_by_group

from guardrail.toolkit.metrics import roc_auc


def _planted(n: int, seed: int, vocab: int = 50, hidden: int = 16) -> dict[str, torch.Tensor]:
    """Tokens whose label is set by one hidden dimension (the router must find it)."""
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(n, hidden, generator=g)
    labels = (states[:, 0] > 0.8).long()
    return {"hidden": states, "predicted": torch.randint(0, vocab, (n,), generator=g),
            "top_logits": torch.randn(n, 10, generator=g), "labels": labels}


def test_splits_keep_each_country_in_one_split() -> None:
    questions = make_questions(load_facts(), 120, seed=3)
    splits = split_by_group(questions, seed=3)
    assert sorted(i for idx in splits.values() for i in idx) == list(range(len(questions)))
    groups = {name: {questions[i].group for i in idx} for name, idx in splits.items()}
    assert not groups["train"] & groups["val"] and not groups["train"] & groups["test"]
    assert not groups["val"] & groups["test"] and all(groups.values())


def test_training_is_seeded_and_learns_a_planted_signal() -> None:
    torch.set_num_threads(1)
    train, val = _planted(600, 0), _planted(200, 1)
    embedding = torch.randn(50, 8, generator=torch.Generator().manual_seed(2))
    a, history = fit_router(train, val, embedding, width=16, epochs=15, lr=3e-3, progress=False)
    b, _ = fit_router(train, val, embedding, width=16, epochs=15, lr=3e-3, progress=False)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert roc_auc(val["labels"].tolist(), score_tokens(a, val).tolist()) > 0.9
    assert len(history) == 15


def test_questions_are_reproducible_and_answers_checked_loosely() -> None:
    facts = load_facts()
    assert len(facts) > 150 and all(c["capital"] and c["currency"] for c in facts)
    assert make_questions(facts, 30, seed=1) == make_questions(facts, 30, seed=1)
    question = next(q for q in make_questions(facts, 400) if q.answer == "Asuncion")
    assert is_correct(question, "The capital of Paraguay is Asunción.")
    assert not is_correct(question, "The capital of Paraguay is Cartagena.")
    assert "Asuncion" in question.messages(with_facts=True)[0]["content"]
    assert "Asuncion" not in question.messages(with_facts=False)[0]["content"]
