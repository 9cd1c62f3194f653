"""How a run chooses its epoch, layers and ``(threshold, k)``: the validation strategy.

``HoldOut`` (``--calibration val``) trains on train and chooses on validation; ``CrossFold``
(``--calibration crossfit``) chooses on out-of-fold scores of train+val and ships heads trained
on all of it. Each owns its flags, checks them against the run's settings, and returns the
trained head with the parts of the weights' JSON it decides."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from guardrail.toolkit.calibrate import StreamingResult
from guardrail.toolkit.features import CachedRecord
from guardrail.toolkit.metrics import count_k_halt

from ..head import DualHead
from .calibration import grid_choice, grid_record, halt_summary, holdout_decision, streaming_metric
from .crossfit import (
    CrossFit,
    Packed,
    average_states,
    cross_fit,
    fit_packed,
    grouped_folds,
    pack,
    packed_scores,
    prefix_items,
)
from .inputs import label
from .record import ENSEMBLE_HOW
from .scoring import full_report, full_threshold, prefix_scores, stack_layers, streaming_report
from .search import LOSS_WEIGHTS, Candidate, best_of, search_layers, seed_ensemble, with_prefixes

if TYPE_CHECKING:
    from .config import TrainConfig

__all__ = ["CrossFold", "Fitted", "HoldOut", "Validation"]

Splits = Mapping[str, Sequence[CachedRecord]]
Say = Callable[[str], None]


@dataclass
class Fitted:
    """The head to ship, its layers, and the strategy's part of the weights' JSON
    (``record.save`` lists the keys)."""

    head: DualHead
    layers: tuple[int, ...]
    record: dict[str, Any]


class Validation(Protocol):
    name: ClassVar[str]  # the --calibration value

    def check(self, config: TrainConfig) -> None:
        """Raise ``ValueError`` for settings this strategy cannot run with."""

    def fit(self, config: TrainConfig, features: Splits, say: Say) -> Fitted:
        """Train, choose and calibrate on the train and val features."""


@dataclass(frozen=True)
class HoldOut:
    """Epoch, layers and ``(threshold, k)`` chosen on validation; the heads train on train.
    ``max_fraction_seen`` also caps the mean share of a harmful answer read before the halt."""

    max_fraction_seen: float | None = None
    name: ClassVar[str] = "val"

    def check(self, config: TrainConfig) -> None:
        pass

    def fit(self, config: TrainConfig, features: Splits, say: Say) -> Fitted:
        whole, val = features["train"], features["val"]
        val_labels = [label(r) for r in val]
        if len(set(val_labels)) < 2 or len({label(r) for r in whole}) < 2:
            raise ValueError("train and validation splits both need harmful and harmless records")
        metric = streaming_metric(config.max_false_halt_rate, self.max_fraction_seen)
        train_set = with_prefixes(whole, config, config.seed)
        candidates = search_layers(config, train_set, val, metric, say)
        best = best_of(candidates)
        members = seed_ensemble(config, best, whole, val, metric, say)
        head = DualHead.ensemble([m.head for m in members])
        scores = prefix_scores(head, stack_layers(val, best.layers, config.pooling))
        decision = holdout_decision(scores, val_labels, config.max_false_halt_rate,
                                    self.max_fraction_seen)
        splits = {"train": len(whole), "val": len(val),
                  "train_prefix_views": len(train_set) - len(whole)}
        return Fitted(head, best.layers, {**decision, "splits": splits, "training":
                                          _holdout_training(config, candidates, best, members)})


def _holdout_training(config: TrainConfig, candidates: Sequence[Candidate], best: Candidate,
                      members: Sequence[Candidate]) -> dict[str, Any]:
    return {"loss": LOSS_WEIGHTS, "backbone": "frozen", "epochs": config.epochs,
            "prefix_views_per_record": config.prefixes,
            "best_epoch": best.best_epoch, "batch_size": config.batch_size,
            "lr": config.lr, "optimizer": "AdamW", "seed": config.seed,
            "candidates": [{"layers": list(c.layers), "val_streaming_macro_f1": c.val_metric,
                            "best_epoch": c.best_epoch} for c in candidates],
            "history": best.history,
            "ensemble": {
                "seeds": config.seeds,
                "members_val_streaming_macro_f1": [m.val_metric for m in members],
                "members_best_epoch": [m.best_epoch for m in members],
                "how": ENSEMBLE_HOW[bool(config.sequence_hidden)]}
            if len(members) > 1 else None}


@dataclass
class _Pool:
    """Train+val as cross-fitting reads them: packed states, labels, folds, per-record loss
    weights and soft targets."""

    packed: Packed
    labels: list[int]
    folds: list[int]
    weights: list[float]
    soft_targets: list[float | None] | None
    kinds: list[str]

    def rows(self, folds: Sequence[int]) -> list[int]:
        return [i for i, f in enumerate(self.folds) if f in folds]


def _human_score(r: CachedRecord) -> float | None:
    """A pyrit record's human score (0-1), None for every other record."""
    score = r.extra.get("human_score")
    if score is None:
        return None
    if not isinstance(score, (int, float)) or not 0.0 <= float(score) <= 1.0:
        raise ValueError(f"human_score {score!r} of a record of {r.prompt[:40]!r}: expected a "
                         "number in [0, 1]")
    return float(score)


@dataclass(frozen=True)
class CrossFold:
    """Grouped K-fold over train+val (``crossfit.py``): every record gets out-of-fold prefix
    scores after each epoch (seed heads averaged); the epoch count with the best calibrated
    macro-F1 on them is kept, ``(threshold, k)`` is calibrated on all of them, and the shipped
    heads are trained on train+val for that many epochs. Pyrit's human-scored records weigh
    ``scored_weight`` in the loss, and with ``soft_scored`` their score is the sequence target
    (evaluation labels stay score >= 0.5)."""

    folds: int = 5
    scored_weight: float = 1.0
    soft_scored: bool = False
    name: ClassVar[str] = "crossfit"

    def check(self, config: TrainConfig) -> None:
        if len(config.fit_layers) != 1:
            raise ValueError(f"--calibration crossfit trains one layer: give one --train-layers "
                             f"(got {list(config.fit_layers)})")

    def _pool(self, config: TrainConfig, records: Sequence[CachedRecord]) -> _Pool:
        labels = [label(r) for r in records]
        groups = [str(r.extra.get("group") or r.prompt) for r in records]
        folds = grouped_folds(groups, labels, self.folds, config.seed)
        if any(len({labels[i] for i, f in enumerate(folds) if f == k}) < 2
               for k in range(self.folds)):
            raise ValueError(f"--folds {self.folds}: every fold needs harmful and harmless "
                             "records; use fewer folds")
        return _Pool(pack(records, config.fit_layers[0], config.pooling), labels, folds,
                     [self.scored_weight if r.extra.get("human_score") is not None else 1.0
                      for r in records],
                     [_human_score(r) for r in records] if self.soft_scored else None,
                     [str(r.extra.get("kind", "")) for r in records])

    def fit(self, config: TrainConfig, features: Splits, say: Say) -> Fitted:
        from tqdm.auto import tqdm

        pool = self._pool(config, [*features["train"], *features["val"]])
        seeds = config.seeds
        bar = tqdm(total=(self.folds + 1) * len(seeds) * config.epochs, unit="epoch",
                   desc=f"cross-fit {self.folds} folds x {len(seeds)} seeds",
                   disable=not config.progress)
        fitted = cross_fit(pool.packed, pool.folds, seeds=seeds, epochs=config.epochs,
                           prefixes=config.prefixes, batch_size=config.batch_size, lr=config.lr,
                           record_weights=pool.weights, sequence_hidden=config.sequence_hidden,
                           soft_targets=pool.soft_targets, on_fit=lambda: bar.update(1))
        per_epoch = {e: self._choose(config, fitted, pool, range(len(pool.labels)), e)
                     for e in fitted.oof}
        epochs = min(per_epoch, key=lambda e: (-per_epoch[e].macro_f1, e))
        choice = per_epoch[epochs]
        estimates = self._estimates(config, fitted, pool, epochs)
        head = self._final_head(config, pool, epochs, lambda: bar.update(1))
        bar.close()
        cross = estimates["cross_calibrated"]
        say(f"cross-fit: {epochs} epochs, threshold {choice.threshold:.6g}, k {choice.k}: "
            f"out-of-fold macro-F1 {choice.macro_f1:.4f} (cross-calibrated "
            f"{cross['macro_f1']:.4f}, false halts {cross['false_halt_rate']:.4f})")
        record = self._record(config, features, pool, fitted, head, per_epoch, epochs,
                              estimates)
        return Fitted(head, config.fit_layers, record)

    @staticmethod
    def _choose(config: TrainConfig, fitted: CrossFit, pool: _Pool, rows: Sequence[int],
                epoch: int) -> StreamingResult:
        """``(threshold, k)`` calibrated on the out-of-fold scores of ``rows`` after ``epoch``."""
        return grid_choice([fitted.oof[epoch][i] for i in rows], [pool.labels[i] for i in rows],
                           config.max_false_halt_rate)

    def _estimates(self, config: TrainConfig, fitted: CrossFit, pool: _Pool, epochs: int
                   ) -> dict[str, Any]:
        """Honest estimates of the recipe: each fold decided by ``(threshold, k)`` calibrated on
        the other folds' out-of-fold scores, or on the next fold's only (validation-sized, the
        hold-out protocol's counterpart)."""
        lengths = [len(s) for s in fitted.oof[epochs]]
        estimates = {}
        for name, calibration_folds in (
                ("cross_calibrated", lambda k: [f for f in range(self.folds) if f != k]),
                ("one_fold_calibrated", lambda k: [(k + 1) % self.folds])):
            halts: list[int | None] = [None] * len(pool.labels)
            fold_choices = []
            for k in range(self.folds):
                c = self._choose(config, fitted, pool, pool.rows(calibration_folds(k)), epochs)
                fold_choices.append({"threshold": c.threshold, "k": c.k})
                for i in fitted.fold_rows(k):
                    halts[i] = count_k_halt(fitted.oof[epochs][i].tolist(), c.threshold, c.k)
            estimates[name] = {**halt_summary(halts, pool.labels, lengths),
                               "fold_choices": fold_choices}
        return estimates

    @staticmethod
    def _final_head(config: TrainConfig, pool: _Pool, epochs: int,
                    tick: Callable[[], None]) -> DualHead:
        """The seed heads trained on every record for ``epochs`` epochs, averaged."""
        everyone = list(range(len(pool.labels)))
        members = []
        for seed in config.seeds:
            items = prefix_items(pool.packed, everyone, config.prefixes, seed, pool.soft_targets)
            head = fit_packed(pool.packed, items, seed=seed, epochs=epochs,
                              batch_size=config.batch_size, lr=config.lr,
                              item_weights=[pool.weights[i] for i, _, _ in items],
                              sequence_hidden=config.sequence_hidden,
                              on_epoch=lambda e, h: tick())
            members.append(head.state_dict())
        return average_states(members, int(pool.packed.x.shape[1]), 0.1, config.seed,
                              config.sequence_hidden)

    def _record(self, config: TrainConfig, features: Splits, pool: _Pool, fitted: CrossFit,
                head: DualHead, per_epoch: Mapping[int, StreamingResult], epochs: int,
                estimates: dict[str, Any]) -> dict[str, Any]:
        choice, labels = per_epoch[epochs], pool.labels
        oof = [s.tolist() for s in fitted.oof[epochs]]
        full_t = full_threshold(oof, labels)
        final_scores = packed_scores(head, pool.packed, list(range(len(labels))))
        return {
            "threshold": choice.threshold, "rule": {"kind": "count", "k": choice.k},
            "full_detection_threshold": full_t,
            "calibration": self._calibration(config, pool, per_epoch, epochs, estimates),
            "splits": {"train": len(features["train"]), "val": len(features["val"]),
                       "trained_on": "train+val",
                       "train_prefix_views_per_record": config.prefixes},
            "training": self._training(config, epochs),
            "metrics": {"oof": {"streaming": streaming_report(oof, labels, choice.threshold,
                                                              choice.k),
                                "full": full_report(oof, labels, full_t), **estimates},
                        "train+val_in_sample": streaming_report(
                            [s.tolist() for s in final_scores], labels, choice.threshold,
                            choice.k)},
        }

    def _calibration(self, config: TrainConfig, pool: _Pool,
                     per_epoch: Mapping[int, StreamingResult], epochs: int,
                     estimates: dict[str, Any]) -> dict[str, Any]:
        labels, grid = pool.labels, grid_record(config.max_false_halt_rate)
        return {
            "objective": "macro_f1", "split": "train+val out-of-fold",
            "protocol": "grouped K-fold by prompt group (no group in two folds; groups dealt "
                        "round-robin in a seeded shuffle inside harmful / harmless strata); "
                        "each fold scored by the average of the seed heads trained on the "
                        "other folds; epochs and (threshold, k) chosen on all out-of-fold "
                        "scores; the shipped heads are trained on train+val",
            "folds": self.folds,
            "fold_records": [len(pool.rows([k])) for k in range(self.folds)],
            "fold_harmful": [sum(labels[i] for i in pool.rows([k])) for k in range(self.folds)],
            "records": len(labels), "harmful": sum(labels),
            "pyrit_harmless_responses": pool.kinds.count("harmless_response"),
            "max_k": grid["max_k"], "thresholds": grid["thresholds"],
            "benign_quantiles": grid["benign_quantiles"],
            "max_false_halt_rate": config.max_false_halt_rate,
            "constraint_met": per_epoch[epochs].constraint_met,
            "epochs_chosen": epochs,
            "per_epoch_oof_macro_f1": {str(e): r.macro_f1 for e, r in per_epoch.items()},
            "estimates": {**estimates,
                          "how": "each fold decided by (threshold, k) calibrated on the other "
                                 "folds' out-of-fold scores (cross_calibrated) or on the next "
                                 "fold's only (one_fold_calibrated: validation-sized)"}}

    def _training(self, config: TrainConfig, epochs: int) -> dict[str, Any]:
        return {"loss": LOSS_WEIGHTS, "backbone": "frozen", "epochs": epochs,
                "epochs_tried": config.epochs, "prefix_views_per_record": config.prefixes,
                "batch_size": config.batch_size, "lr": config.lr, "optimizer": "AdamW",
                "trainer": "crossfit.fit_packed (packed rows; the same loss as "
                           "guardrail.toolkit.train.train_head's, no epoch selection)",
                "seed": config.seed, "scored_weight": self.scored_weight,
                "soft_scored": self.soft_scored,
                "ensemble": {"seeds": config.seeds,
                             "how": ENSEMBLE_HOW[bool(config.sequence_hidden)]}}
