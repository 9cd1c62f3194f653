"""Cross-fitted calibration (``crossfit.py``): folds keep prompt groups whole, the packed trainer
computes SCM's loss and the trainer's prefix cuts, the numpy count-k grid chooses what
``calibrate_count_k`` chooses, and ``--calibration crossfit`` writes a loadable head whose config
records the protocol."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from guardrail_harmful_content.head import DualHead
from guardrail_harmful_content.training.crossfit import (
    count_k_grid,
    fit_packed,
    grouped_folds,
    pack,
    packed_loss,
    prefix_items,
)
from guardrail_harmful_content.training.losses import scm_loss_fn
from guardrail_harmful_content.training.prefixes import prefix_views
from guardrail_harmful_content.training.scoring import STACKED, stack_layers

from guardrail.probes.io import load_probe
from guardrail.toolkit.calibrate import calibrate_count_k
from guardrail.toolkit.features import CachedRecord
from guardrail.toolkit.records import SpanLabel
from guardrail.toolkit.train import collate


def _cached(i: int, label: int, n: int, rng: torch.Generator) -> CachedRecord:
    text = "x" * n
    spans = (SpanLabel(n // 2, n, 1),) if label else ()
    return CachedRecord(index=i, prompt=f"p{i}", response=text, label=label, spans=spans,
                        offsets=torch.tensor([(j, j + 1) for j in range(n)]),
                        ids=torch.arange(n), hidden={3: torch.randn(n, 4, generator=rng)})


def test_folds_keep_every_group_in_one_fold_and_mix_labels() -> None:
    rng = random.Random(0)
    groups = [f"g{rng.randrange(40)}" for _ in range(300)]
    labels = [int(g[-1]) % 2 for g in groups]
    folds = grouped_folds(groups, labels, 5, seed=3)
    assert set(folds) == set(range(5))
    for g in set(groups):
        assert len({f for f, h in zip(folds, groups, strict=True) if h == g}) == 1
    for k in range(5):
        assert {y for y, f in zip(labels, folds, strict=True) if f == k} == {0, 1}
    assert folds == grouped_folds(groups, labels, 5, seed=3)
    with pytest.raises(ValueError, match="n_folds"):
        grouped_folds(groups, labels, 1, seed=3)


def test_packed_items_and_loss_match_the_trainer() -> None:
    gen = torch.Generator().manual_seed(0)
    records = [_cached(i, i % 2, 5 + i, gen) for i in range(6)]
    packed = pack(records, 3)
    items = prefix_items(packed, range(len(records)), 2, seed=4)
    views = [*records, *prefix_views(records, 2, 4)]
    assert [(n, y) for _, n, y in items] == [(len(v), int(v.label or 0)) for v in views]
    # SCM's loss on a padded batch equals the packed computation (no dropout: same rows).
    head = DualHead(8, dropout=0.0, seed=1)
    batch = collate(stack_layers(views[:4], [3], "prefix_mean"), STACKED)
    expected = scm_loss_fn(0.6, 0.4, 1.0)(head, batch, 0.0)
    ones = torch.ones(4)
    assert torch.allclose(packed_loss(head, packed, items[:4], ones, 0.0), expected)
    # weights: an item weighted 2 counts as two copies of it
    doubled = packed_loss(head, packed, [items[0], *items[:4]], torch.ones(5), 0.0)
    weighted = packed_loss(head, packed, items[:4], torch.tensor([2.0, 1, 1, 1]), 0.0)
    assert torch.allclose(doubled, weighted)
    seen: list[int] = []
    trained = fit_packed(packed, items, seed=1, epochs=2, batch_size=4,
                         on_epoch=lambda epoch, _: seen.append(epoch))
    assert seen == [1, 2] and not trained.training


def test_soft_targets_follow_the_human_score_except_a_harmful_answers_benign_opening() -> None:
    gen = torch.Generator().manual_seed(0)
    records = [_cached(i, i % 2, 8 + i, gen) for i in range(4)]
    packed = pack(records, 3)
    soft = [0.25, 0.5, None, None]  # records 0 (harmless) and 1 (harmful) were human-scored
    hard = prefix_items(packed, range(4), 3, seed=2)
    items = prefix_items(packed, range(4), 3, seed=2, soft_targets=soft)
    assert [(i, n) for i, n, _ in items] == [(i, n) for i, n, _ in hard]  # same cuts
    for (i, n, y), (_, _, y_hard) in zip(items, hard, strict=True):
        if soft[i] is None:
            assert y == y_hard and isinstance(y, int)
        elif i == 0:
            assert y == 0.25  # whole answer and every prefix
        else:  # harmful: the score once a harmful token is in, 0 before (the span starts at n/2)
            assert y == (0.5 if n > packed.lengths[1] // 2 else 0)
    # soft targets of exactly 0 and 1 give the hard loss; 0.5 a different one
    head = DualHead(8, dropout=0.0, seed=1)
    ones = torch.ones(len(hard))
    as_floats = [(i, n, float(y)) for i, n, y in hard]
    assert torch.allclose(packed_loss(head, packed, as_floats, ones, 0.0),
                          packed_loss(head, packed, hard, ones, 0.0))
    assert not torch.allclose(packed_loss(head, packed, items, ones, 0.0),
                              packed_loss(head, packed, hard, ones, 0.0))


def test_a_soft_target_trains_the_sequence_head_towards_it() -> None:
    gen = torch.Generator().manual_seed(0)
    records = [_cached(i, 1, 12, gen) for i in range(8)]
    packed = pack(records, 3)
    whole = [(i, 12, 1) for i in range(8)]
    halves = [(i, 12, 0.5) for i in range(8)]
    scores = {}
    for name, items in (("hard", whole), ("soft", halves)):
        head = fit_packed(packed, items, seed=0, epochs=150, batch_size=8, lr=0.05)
        with torch.no_grad():
            logits = head.sequence_head(packed.x[torch.tensor(packed.starts + 11)])
        scores[name] = torch.softmax(logits, -1)[:, 1].mean().item()
    assert scores["hard"] > 0.9
    assert 0.35 < scores["soft"] < 0.65


@pytest.mark.parametrize("cap", [None, 0.2, 0.0])
def test_count_k_grid_chooses_what_calibrate_count_k_chooses(cap: float | None) -> None:
    rng = np.random.default_rng(7)
    labels = [int(x) for x in rng.integers(0, 2, 60)]
    scores = [np.clip(rng.normal(0.45 + 0.25 * y, 0.25, int(rng.integers(3, 40))), 0, 1)
              for y in labels]
    thresholds = [0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    ours = count_k_grid(scores, labels, thresholds, range(1, 21), cap)
    reference = calibrate_count_k([s.tolist() for s in scores], labels, thresholds,
                                  range(1, 21), cap)
    assert ours.threshold == reference.threshold and ours.k == reference.k
    assert ours.constraint_met == reference.constraint_met
    assert ours.macro_f1 == pytest.approx(reference.macro_f1)
    assert ours.false_halt_rate == pytest.approx(reference.false_halt_rate)
    assert ours.fraction_seen == pytest.approx(reference.fraction_seen)


@pytest.mark.slow
def test_crossfit_training_records_the_protocol(
        tiny_trainer: tuple[Callable[[list[str]], int], list[str], Path]) -> None:
    trainer, base, out = tiny_trainer
    args = [*base, "--layers", "0", "2", "--epochs", "2",
            "--calibration", "crossfit", "--folds", "3", "--ensemble-seeds", "1"]
    assert trainer([*args, "--train-layers", "0", "2"]) == 2  # one layer only
    assert trainer([*args[:-6], "--scored-weight", "3"]) == 2  # crossfit only
    assert trainer([*args[:-6], "--soft-scored"]) == 2  # crossfit only
    assert trainer([*args, "--max-fraction-seen", "0.3"]) == 2  # val calibration only
    assert trainer([*args, "--train-layers", "2"]) == 0
    config = json.loads((out / "harmful_content.json").read_text())
    cal = config["calibration"]
    assert cal["split"] == "train+val out-of-fold" and cal["folds"] == 3
    assert sum(cal["fold_records"]) == cal["records"] == 36
    assert cal["epochs_chosen"] in (1, 2) and config["training"]["epochs"] == cal["epochs_chosen"]
    assert config["layers"] == [2] and config["rule"]["k"] >= 1
    assert config["training"]["ensemble"]["seeds"] == [0, 1]
    assert set(config["metrics"]["oof"]) == {"streaming", "full", "cross_calibrated",
                                             "one_fold_calibrated"}
    # an MLP sequence head goes through the folds and the final fit: two seeds' units kept
    assert trainer([*args, "--train-layers", "2", "--sequence-hidden", "4"]) == 0
    head = load_probe(out / "harmful_content.safetensors").head
    assert isinstance(head, DualHead) and head.sequence_hidden == 8


def test_a_strategy_refuses_settings_it_cannot_run_before_reading_data(tmp_path: Path) -> None:
    from guardrail_harmful_content.training.train import TrainConfig, train
    from guardrail_harmful_content.training.validation import CrossFold

    missing = tmp_path / "no-build"  # never read: the settings are refused first
    with pytest.raises(ValueError, match="trains one layer"):
        train(TrainConfig(data=missing, layers=(0, 2), validation=CrossFold(folds=3),
                          progress=False))
    with pytest.raises(ValueError, match=r"--train-layers \[3\] are not among"):
        train(TrainConfig(data=missing, layers=(0, 2), train_layers=(3,), progress=False))
    with pytest.raises(FileNotFoundError, match="no train split"):
        train(TrainConfig(data=missing, layers=(2,), validation=CrossFold(folds=3),
                          cache=tmp_path, progress=False))
