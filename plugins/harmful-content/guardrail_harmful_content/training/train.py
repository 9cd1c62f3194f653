"""``guardrail train harmful-content``: build the data, read it once with the observer, train SCM's
dual head on a frozen backbone, choose the layer(s) and calibrate the count-k rule on validation,
and write the weights (safetensors + JSON) that the monitor ships.

Steps (each with a progress bar; the whole run is timed):

1. build the offline data (``guardrail_harmful_content.data``) unless ``--data`` names a build;
2. optionally subsample the training split, stratified by record kind and label
   (``--max-train``; default: all records), keep validation whole;
3. extract the observer's states of the candidate layers once (``guardrail.probes.features``
   cache; the observer reads the prompt as context, then the response);
4. for each candidate layer, and the concatenation of the two best, train a ``DualHead`` with
   0.6 token CE + 0.4 sequence CE + 1.0 logic loss; keep the epoch and the candidate with the
   best streaming macro-F1 on validation (false halts capped);
5. with ``--ensemble-seeds``, train the chosen layers again with those seeds and average the
   heads (linear heads: their logits are averaged);
6. calibrate ``(threshold, k)`` on validation: best macro-F1 with a false-halt rate <= 3%;
7. save the head with its config (base model, layers, dims, threshold, k, data, splits, metrics).

With ``--calibration crossfit`` steps 4-6 are replaced (``crossfit.py``): train+val are cut into
``--folds`` folds by prompt group; each fold is scored by the seed heads (``--seed`` and
``--ensemble-seeds``, averaged) trained on the other folds; the epoch count and ``(threshold, k)``
are chosen on these out-of-fold scores of all train+val records, and the shipped heads are trained
on train+val for that many epochs. The JSON records the folds, their sizes and two honest
estimates (each fold decided by a calibration on the other folds, or on one fold).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, cast

from guardrail.probes.calibrate import StreamingResult, calibrate_count_k
from guardrail.probes.features import CachedRecord, extract_features
from guardrail.probes.heads import ProbeHead
from guardrail.probes.io import ProbeFileError, save_probe
from guardrail.probes.metrics import count_k_halt, fraction_seen, macro_f1
from guardrail.probes.train import MetricFn, train_head
from guardrail.sources import cache_dir

from ..head import DualHead
from ..pooling import POOLINGS
from ..prefixes import prefix_views
from .losses import scm_loss_fn
from .scoring import (
    BENIGN_QUANTILES,
    STACKED,
    calibration_thresholds,
    full_report,
    full_threshold,
    prefix_scores,
    stack_layers,
    streaming_report,
)

__all__ = [
    "DEFAULT_LAYERS",
    "NAME",
    "WEIGHTS_DIR",
    "Candidate",
    "TrainConfig",
    "load_observer",
    "main",
    "prepare_data",
    "subsample",
    "train",
]

WEIGHTS_DIR = Path(__file__).parent / "weights"
NAME = "harmful_content"
DEFAULT_LAYERS = (9, 12, 15)
LOSS_WEIGHTS = {"token_ce": 0.6, "sequence_ce": 0.4, "logic": 1.0}  # SCM's run-scm.sh
# The calibration grid: these fixed steps plus quantiles of the benign validation prefix scores
# (``calibration_thresholds``). On SmolLM2 benign prefixes pass 0.95 often enough that a 3%
# false-halt budget needs thresholds near 1, where a fixed grid is too coarse.
THRESHOLDS = (*(round(0.05 * i, 2) for i in range(1, 20)), 0.96, 0.97, 0.98, 0.99, 0.995,
              0.998, 0.999)
MAX_K = 100
ENSEMBLE_HOW = {  # how DualHead.ensemble folds the members into one head, as the weights record
    False: "the heads' weights averaged: the heads are linear, so this averages their logits",
    True: "the members' hidden units side by side and their output weights divided by their "
          "number: the mean of their logits, exactly",
}


@dataclass
class TrainConfig:
    """What ``guardrail train harmful-content`` does; the CLI flags map one to one."""

    data: Path | None = None  # a build folder (train/val/test.jsonl); None: build one
    out: Path = WEIGHTS_DIR
    model: str | None = None  # local HF model folder; None: the embedded SmolLM2
    layers: tuple[int, ...] = DEFAULT_LAYERS
    # Heads are trained on these of ``layers`` only (None: all); the features are still read
    # for all of ``layers``, so a cache written by a wider run is reused.
    train_layers: tuple[int, ...] | None = None
    concat: bool = True  # also try the two best layers side by side
    pooling: str = "prefix_mean"  # see scoring.POOLINGS
    # 0: SCM's linear sequence head; m > 0: a one-hidden-layer MLP with m units per seed
    sequence_hidden: int = 0
    prefixes: int = 2  # truncated copies of each training record added to the training set
    max_train: int | None = None
    max_val: int | None = None
    epochs: int = 12
    batch_size: int = 16
    lr: float = 2e-3
    seed: int = 0
    # More seeds for the chosen layers: their heads are averaged with the first seed's head.
    ensemble_seeds: tuple[int, ...] = ()
    max_false_halt_rate: float = 0.03
    # Also cap the mean share of a harmful answer read before the halt (validation; val
    # calibration only); None: no cap.
    max_fraction_seen: float | None = None
    # "val": (threshold, k) and the epoch chosen on validation (the heads train on train);
    # "crossfit": grouped K-fold over train+val, (threshold, k) and the epoch count chosen on
    # out-of-fold scores, the shipped heads trained on train+val (see crossfit.py).
    calibration: str = "val"
    folds: int = 5
    # Loss weight of pyrit's human-scored records (records with a human_score), crossfit only.
    scored_weight: float = 1.0
    # Their human score as the sequence target instead of 0/1 (crossfit only; see
    # crossfit.prefix_items). Evaluation labels stay score >= 0.5.
    soft_scored: bool = False
    chunk_size: int = 512
    cache: Path | None = None
    progress: bool = True
    # Trained weights to re-calibrate instead of training: (threshold, k) chosen again on
    # validation under this config's caps; the heads are kept as they are.
    recalibrate: Path | None = None


@dataclass
class Candidate:
    """One trained head on one layer set, with its validation scores."""

    layers: tuple[int, ...]
    head: DualHead
    best_epoch: int
    val_metric: float
    history: list[dict[str, Any]] = field(default_factory=list)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


def subsample(records: Sequence[dict[str, Any]], n: int | None, seed: int
              ) -> list[dict[str, Any]]:
    """At most ``n`` records, the same share from every (kind, label) stratum (each stratum keeps
    at least one record), in their original order."""
    if n is None or n >= len(records):
        return list(records)
    strata: dict[tuple[str, int], list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        strata[(str(r.get("kind", "")), int(r.get("label") or 0))].append(i)
    rng = random.Random(seed)
    keep: list[int] = []
    for key in sorted(strata):
        members = strata[key]
        take = max(1, round(len(members) * n / len(records)))
        keep.extend(rng.sample(members, min(take, len(members))))
    return [records[i] for i in sorted(keep)]


def prepare_data(config: TrainConfig, work: Path) -> tuple[dict[str, Path], dict[str, Any]]:
    """The split files to read (train and val subsampled into ``work``) and the build manifest."""
    data = config.data
    if data is None:
        from ..data import BuildConfig, build_dataset

        data = work / "data"
        build_dataset(data, BuildConfig())
    manifest_path = data / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    paths: dict[str, Path] = {}
    for split, limit in (("train", config.max_train), ("val", config.max_val)):
        source = data / f"{split}.jsonl"
        if not source.exists():
            raise FileNotFoundError(f"{source}: no {split} split (build one with "
                                    "python -m guardrail_harmful_content.data build --out DIR)")
        chosen = subsample(_read_jsonl(source), limit, config.seed)
        # The file's name keys the feature cache: a whole split is the same file for every seed.
        name = f"{split}-all" if limit is None else f"{split}-{limit}-seed{config.seed}"
        target = work / f"{name}.jsonl"
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in chosen)
        if not target.exists() or target.read_text(encoding="utf-8") != text:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
        paths[split] = target
    paths["test"] = data / "test.jsonl"
    return paths, manifest


def load_observer(model: str | None) -> Any:
    """The embedded SmolLM2 observer, or the local HF causal LM in folder ``model``."""
    from guardrail.observer.hf import load_model_dir, load_smollm2
    from guardrail.policy import ObserverSpec

    if model is None:
        return load_smollm2(ObserverSpec())
    path = Path(model).expanduser()
    return load_model_dir(path, name=path.name, window=2048)


def _fit(layers: tuple[int, ...], train: Sequence[CachedRecord], val: Sequence[CachedRecord],
         config: TrainConfig) -> Candidate:
    train_view = stack_layers(train, layers, config.pooling)
    val_view = stack_layers(val, layers, config.pooling)
    width = int(train_view[0].hidden[STACKED].shape[-1])
    head = DualHead(width, dropout=0.1, seed=config.seed,
                    sequence_hidden=config.sequence_hidden)
    metric = _streaming_metric(config.max_false_halt_rate, config.max_fraction_seen)
    result = train_head(
        head, train_view, val_view, layer=STACKED,
        loss_fn=scm_loss_fn(LOSS_WEIGHTS["token_ce"], LOSS_WEIGHTS["sequence_ce"],
                            LOSS_WEIGHTS["logic"]),
        metric_fn=metric, epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
        seed=config.seed, progress=config.progress,
    )
    assert isinstance(result.head, DualHead)
    return Candidate(layers, result.head, result.best_epoch, float(result.best_metric or 0.0),
                     [dict(h) for h in result.history])


def _label(r: CachedRecord) -> int:
    return int(r.label or 0)


def calibrate(scores: Sequence[Sequence[float]], labels: Sequence[int],
              max_false_halt_rate: float, max_fraction_seen: float | None = None,
              ) -> StreamingResult:
    """SCM's ``(threshold, k)``: the best macro-F1 on these records with false halts (and,
    optionally, the mean share of a harmful answer read) capped."""
    return calibrate_count_k(scores, labels, thresholds=calibration_thresholds(
                                 scores, labels, THRESHOLDS),
                             ks=range(1, MAX_K + 1), max_false_halt_rate=max_false_halt_rate,
                             max_fraction_seen=max_fraction_seen)


def _val_decision(scores: Sequence[Sequence[float]], labels: Sequence[int],
                  config: TrainConfig) -> dict[str, Any]:
    """The shipped rule chosen on validation scores under ``config``'s caps, as the weights'
    JSON records it: threshold, rule, full-detection threshold, calibration and metrics."""
    choice = calibrate(scores, labels, config.max_false_halt_rate, config.max_fraction_seen)
    full_t = full_threshold(scores, labels)
    return {
        "threshold": choice.threshold,
        "rule": {"kind": "count", "k": choice.k},
        "full_detection_threshold": full_t,
        "calibration": {"objective": "macro_f1", "split": "val", "max_k": MAX_K,
                        "thresholds": list(THRESHOLDS),
                        "benign_quantiles": list(BENIGN_QUANTILES),
                        "max_false_halt_rate": config.max_false_halt_rate,
                        "max_fraction_seen": config.max_fraction_seen,
                        "constraint_met": choice.constraint_met},
        "metrics": {"val": {"streaming": streaming_report(scores, labels, choice.threshold,
                                                          choice.k),
                            "full": full_report(scores, labels, full_t)}},
    }


def _streaming_metric(max_false_halt_rate: float, max_fraction_seen: float | None = None,
                      ) -> MetricFn:
    """Epoch selection: the calibrated streaming macro-F1 on validation (the shipped decision)."""

    def metric(head: ProbeHead, records: Sequence[CachedRecord]) -> float:
        assert isinstance(head, DualHead)
        scores = prefix_scores(head, records)
        return calibrate(scores, [_label(r) for r in records], max_false_halt_rate,
                         max_fraction_seen).macro_f1

    return metric


def train(config: TrainConfig, observer: Any = None) -> dict[str, Any]:
    """Run the whole pipeline; return the saved config (``weights`` holds the file's path).

    ``observer``: an observer object to read with instead of loading ``config.model`` (tests
    pass a fake one with a planted signal)."""
    if config.calibration not in ("val", "crossfit"):
        raise ValueError(f"calibration {config.calibration!r}: expected 'val' or 'crossfit'")
    if config.scored_weight != 1.0 and config.calibration != "crossfit":
        raise ValueError("--scored-weight needs --calibration crossfit")
    if config.soft_scored and config.calibration != "crossfit":
        raise ValueError("--soft-scored needs --calibration crossfit")
    if config.max_fraction_seen is not None and config.calibration != "val":
        raise ValueError("--max-fraction-seen works with --calibration val only")
    if config.recalibrate is not None:
        return recalibrate(config, observer)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    work = (config.cache or cache_dir()) / "harmful-content"
    paths, manifest = prepare_data(config, work)
    timings["data_s"] = time.perf_counter() - t0

    if observer is None:
        observer = load_observer(config.model)
    n_layers = int(observer.num_layers)
    bad = [layer for layer in config.layers if not -n_layers <= layer < n_layers]
    if bad:
        raise ValueError(f"--layers {bad} out of range: observer {observer.name!r} has "
                         f"{n_layers} layers")
    t = time.perf_counter()
    features = {
        split: extract_features(observer, paths[split], work / "features", config.layers,
                                dtype="float16", chunk_size=config.chunk_size,
                                progress=config.progress).records
        for split in ("train", "val")
    }
    timings["features_s"] = time.perf_counter() - t
    if config.calibration == "crossfit":
        return _train_crossfit(config, observer, features, manifest, timings, t0)
    whole, val_set = features["train"], features["val"]
    train_set = list(whole) + prefix_views(whole, config.prefixes, config.seed)
    val_labels = [_label(r) for r in val_set]
    if len(set(val_labels)) < 2 or len({_label(r) for r in train_set}) < 2:
        raise ValueError("train and validation splits both need harmful and harmless records")

    fit_layers = config.train_layers or config.layers
    stray = sorted(set(fit_layers) - set(config.layers))
    if stray:
        raise ValueError(f"--train-layers {stray} are not among --layers {list(config.layers)}")
    t = time.perf_counter()
    candidates = []
    for layer in fit_layers:
        candidates.append(_fit((layer,), train_set, val_set, config))
        _say(config, f"layer {layer}: val streaming macro-F1 {candidates[-1].val_metric:.4f} "
                     f"(epoch {candidates[-1].best_epoch})")
    if config.concat and len(fit_layers) >= 2:
        top = sorted(candidates, key=lambda c: -c.val_metric)[:2]
        pair = tuple(sorted(c.layers[0] for c in top))
        candidates.append(_fit(pair, train_set, val_set, config))
        _say(config, f"layers {pair}: val streaming macro-F1 {candidates[-1].val_metric:.4f}")
    best = max(candidates, key=lambda c: (c.val_metric, -len(c.layers)))
    members, seeds = [best], [config.seed]
    for seed in config.ensemble_seeds:
        if seed in seeds:
            continue
        seeds.append(seed)
        seeded = replace(config, seed=seed)
        views = list(whole) + prefix_views(whole, config.prefixes, seed)
        members.append(_fit(best.layers, views, val_set, seeded))
        _say(config, f"seed {seed}: val streaming macro-F1 {members[-1].val_metric:.4f}")
    head = DualHead.ensemble([m.head for m in members])
    timings["train_s"] = time.perf_counter() - t

    decision = _val_decision(
        prefix_scores(head, stack_layers(val_set, best.layers, config.pooling)), val_labels,
        config)
    timings["total_s"] = time.perf_counter() - t0

    saved = {
        "base_model": observer.name,
        "layer": best.layers[0],
        "layers": list(best.layers),
        "pooling": config.pooling,
        "dims": {"hidden_size": int(observer.hidden_size), "input_size": best.head.hidden_size,
                 "observer_layers": n_layers},
        **{k: decision[k] for k in ("threshold", "rule", "full_detection_threshold",
                                    "calibration")},
        "data": _data_summary(manifest, config),
        "splits": {"train": len(features["train"]), "val": len(val_set),
                   "train_prefix_views": len(train_set) - len(features["train"]),
                   "built": {k: v.get("labels") for k, v in
                             manifest.get("counts", {}).items()}},
        "training": {"loss": LOSS_WEIGHTS, "backbone": "frozen", "epochs": config.epochs,
                     "prefix_views_per_record": config.prefixes,
                     "best_epoch": best.best_epoch, "batch_size": config.batch_size,
                     "lr": config.lr, "optimizer": "AdamW", "seed": config.seed,
                     "candidates": [{"layers": list(c.layers), "val_streaming_macro_f1":
                                     c.val_metric, "best_epoch": c.best_epoch}
                                    for c in candidates],
                     "history": best.history,
                     "ensemble": {
                         "seeds": seeds,
                         "members_val_streaming_macro_f1": [m.val_metric for m in members],
                         "members_best_epoch": [m.best_epoch for m in members],
                         "how": ENSEMBLE_HOW[bool(config.sequence_hidden)]}
                     if len(members) > 1 else None},
        "metrics": decision["metrics"],
        "timings": {k: round(v, 1) for k, v in timings.items()},
    }
    weights = save_probe(config.out, head, saved, name=NAME)
    _say(config, f"saved {weights} ({weights.stat().st_size} bytes) in {timings['total_s']:.0f} s")
    return {**saved, "weights": str(weights)}


def recalibrate(config: TrainConfig, observer: Any = None) -> dict[str, Any]:
    """Choose ``(threshold, k)`` again for the heads in ``config.recalibrate`` on validation,
    under ``config``'s caps, and write them with the new rule to ``config.out``; the heads are
    not retrained. The saved config keeps the training record and notes what was re-chosen."""
    from guardrail.probes.io import load_probe

    if config.recalibrate is None:
        raise ValueError("recalibrate needs the weights to re-calibrate")
    if config.calibration != "val":
        raise ValueError("--recalibrate re-calibrates on validation: use --calibration val")
    t0 = time.perf_counter()
    work = (config.cache or cache_dir()) / "harmful-content"
    paths, _ = prepare_data(config, work)
    if observer is None:
        observer = load_observer(config.model)
    loaded = load_probe(config.recalibrate, name=NAME, observer=observer)
    head = loaded.head
    if not isinstance(head, DualHead):
        raise ValueError(f"{loaded.path}: not a harmful-content head "
                         f"({type(head).__name__})")
    layers = tuple(int(x) for x in loaded.config.get("layers") or [loaded.config["layer"]])
    pooling = str(loaded.config.get("pooling", "prefix_mean"))
    read = tuple(sorted(set(config.layers) | set(layers)))  # reuse the trainer's feature cache
    val = extract_features(observer, paths["val"], work / "features", read, dtype="float16",
                           chunk_size=config.chunk_size, progress=config.progress).records
    labels = [_label(r) for r in val]
    if len(set(labels)) < 2:
        raise ValueError("the validation split needs harmful and harmless records")
    decision = _val_decision(prefix_scores(head, stack_layers(val, layers, pooling)), labels,
                             config)
    before = {"weights": str(loaded.path), "threshold": loaded.config.get("threshold"),
              "rule": loaded.config.get("rule"),
              "calibration": loaded.config.get("calibration"),
              "metrics": loaded.config.get("metrics")}
    saved = {k: v for k, v in loaded.config.items() if k not in ("format", "version", "name",
                                                                  "head", "tensors")}
    saved.update({**decision, "recalibrated_from": before,
                  "timings": {"total_s": round(time.perf_counter() - t0, 1)}})
    weights = save_probe(config.out, head, saved, name=NAME)
    _say(config, f"re-calibrated {loaded.path}: threshold {saved['threshold']}, k "
                 f"{saved['rule']['k']}; saved {weights}")
    return {**saved, "weights": str(weights)}


def _human_score(r: CachedRecord) -> float | None:
    """A pyrit record's human score (0-1), None for every other record."""
    score = r.extra.get("human_score")
    if score is None:
        return None
    if not isinstance(score, (int, float)) or not 0.0 <= float(score) <= 1.0:
        raise ValueError(f"human_score {score!r} of a record of {r.prompt[:40]!r}: expected a "
                         "number in [0, 1]")
    return float(score)


def _group(r: CachedRecord) -> str:
    return str(r.extra.get("group") or r.prompt)


def _train_crossfit(config: TrainConfig, observer: Any,
                    features: Mapping[str, Sequence[CachedRecord]], manifest: dict[str, Any],
                    timings: dict[str, float], t0: float) -> dict[str, Any]:
    """``--calibration crossfit``: grouped K-fold over train+val. Every record gets out-of-fold
    prefix scores after each epoch (seed heads averaged); the epoch count with the best
    calibrated macro-F1 on them is kept, ``(threshold, k)`` is calibrated on all of them, and
    the shipped heads are trained on train+val for that many epochs."""
    from tqdm.auto import tqdm

    from .crossfit import (
        average_states,
        count_k_grid,
        cross_fit,
        fit_packed,
        grouped_folds,
        pack,
        packed_scores,
        prefix_items,
    )

    layers = tuple(config.train_layers or config.layers)
    if len(layers) != 1:
        raise ValueError(f"--calibration crossfit trains one layer: give one --train-layers "
                         f"(got {list(layers)})")
    records = [*features["train"], *features["val"]]
    labels = [_label(r) for r in records]
    folds = grouped_folds([_group(r) for r in records], labels, config.folds, config.seed)
    if any(len({labels[i] for i, f in enumerate(folds) if f == k}) < 2
           for k in range(config.folds)):
        raise ValueError(f"--folds {config.folds}: every fold needs harmful and harmless "
                         "records; use fewer folds")
    packed = pack(records, layers[0], config.pooling)
    seeds = list(dict.fromkeys([config.seed, *config.ensemble_seeds]))
    record_weights = [config.scored_weight if r.extra.get("human_score") is not None else 1.0
                      for r in records]
    soft_targets = ([_human_score(r) for r in records] if config.soft_scored else None)
    t = time.perf_counter()
    bar = tqdm(total=(config.folds + 1) * len(seeds) * config.epochs, unit="epoch",
               desc=f"cross-fit {config.folds} folds x {len(seeds)} seeds",
               disable=not config.progress)
    fitted = cross_fit(packed, folds, seeds=seeds, epochs=config.epochs,
                       prefixes=config.prefixes, batch_size=config.batch_size, lr=config.lr,
                       record_weights=record_weights, sequence_hidden=config.sequence_hidden,
                       soft_targets=soft_targets, on_fit=lambda: bar.update(1))

    def choose(idx: Sequence[int], epoch: int) -> StreamingResult:
        scores = [fitted.oof[epoch][i] for i in idx]
        y = [labels[i] for i in idx]
        grid = calibration_thresholds(cast(list[Sequence[float]], scores), y, THRESHOLDS)
        return count_k_grid(scores, y, grid,
                            range(1, MAX_K + 1), config.max_false_halt_rate)

    everyone = list(range(len(records)))
    per_epoch = {e: choose(everyone, e) for e in fitted.oof}
    epochs = min(per_epoch, key=lambda e: (-per_epoch[e].macro_f1, e))
    choice = per_epoch[epochs]
    # Honest estimate of the whole recipe: each fold decided by (threshold, k) calibrated on
    # the other folds' out-of-fold scores.
    # The same with validation-sized calibration data (the next fold only), the shipped
    # protocol's counterpart.
    lengths = [len(s) for s in fitted.oof[epochs]]
    estimates = {}
    for name, calibration_folds in (
            ("cross_calibrated", lambda k: [f for f in range(config.folds) if f != k]),
            ("one_fold_calibrated", lambda k: [(k + 1) % config.folds])):
        halts: list[int | None] = [None] * len(records)
        fold_choices = []
        for k in range(config.folds):
            c = choose([i for i, f in enumerate(folds) if f in calibration_folds(k)], epochs)
            fold_choices.append({"threshold": c.threshold, "k": c.k})
            for i in fitted.fold_rows(k):
                halts[i] = count_k_halt(fitted.oof[epochs][i].tolist(), c.threshold, c.k)
        estimates[name] = {**_halt_summary(halts, labels, lengths),
                           "fold_choices": fold_choices}
    cross = estimates["cross_calibrated"]
    members = []
    for seed in seeds:
        items = prefix_items(packed, everyone, config.prefixes, seed, soft_targets)
        weights = [record_weights[i] for i, _, _ in items]
        head = fit_packed(packed, items, seed=seed, epochs=epochs, batch_size=config.batch_size,
                          lr=config.lr, item_weights=weights,
                          sequence_hidden=config.sequence_hidden,
                          on_epoch=lambda e, h: bar.update(1))
        members.append(head.state_dict())
    bar.close()
    width = int(packed.x.shape[1])
    head = average_states(members, width, 0.1, config.seed, config.sequence_hidden)
    timings["train_s"] = time.perf_counter() - t
    oof = [s.tolist() for s in fitted.oof[epochs]]
    streaming = streaming_report(oof, labels, choice.threshold, choice.k)
    full_t = full_threshold(oof, labels)
    full = full_report(oof, labels, full_t)
    final_scores = packed_scores(head, packed, everyone)
    timings["total_s"] = time.perf_counter() - t0
    _say(config, f"cross-fit: {epochs} epochs, threshold {choice.threshold:.6g}, k {choice.k}: "
                 f"out-of-fold macro-F1 {choice.macro_f1:.4f} (cross-calibrated "
                 f"{cross['macro_f1']:.4f}, false halts {cross['false_halt_rate']:.4f})")
    kinds = [str(r.extra.get("kind", "")) for r in records]
    fold_sizes = [sum(1 for f in folds if f == k) for k in range(config.folds)]
    saved = {
        "base_model": observer.name,
        "layer": layers[0],
        "layers": list(layers),
        "pooling": config.pooling,
        "dims": {"hidden_size": int(observer.hidden_size), "input_size": width,
                 "observer_layers": int(observer.num_layers)},
        "threshold": choice.threshold,
        "rule": {"kind": "count", "k": choice.k},
        "full_detection_threshold": full_t,
        "calibration": {
            "objective": "macro_f1", "split": "train+val out-of-fold",
            "protocol": "grouped K-fold by prompt group (no group in two folds; groups dealt "
                        "round-robin in a seeded shuffle inside harmful / harmless strata); "
                        "each fold scored by the average of the seed heads trained on the "
                        "other folds; epochs and (threshold, k) chosen on all out-of-fold "
                        "scores; the shipped heads are trained on train+val",
            "folds": config.folds, "fold_records": fold_sizes,
            "fold_harmful": [sum(labels[i] for i, f in enumerate(folds) if f == k)
                             for k in range(config.folds)],
            "records": len(records), "harmful": sum(labels),
            "pyrit_harmless_responses": kinds.count("harmless_response"),
            "max_k": MAX_K, "thresholds": list(THRESHOLDS),
            "benign_quantiles": list(BENIGN_QUANTILES),
            "max_false_halt_rate": config.max_false_halt_rate,
            "constraint_met": choice.constraint_met,
            "epochs_chosen": epochs,
            "per_epoch_oof_macro_f1": {str(e): r.macro_f1 for e, r in per_epoch.items()},
            "estimates": {**estimates,
                          "how": "each fold decided by (threshold, k) calibrated on the other "
                                 "folds' out-of-fold scores (cross_calibrated) or on the next "
                                 "fold's only (one_fold_calibrated: validation-sized)"}},
        "data": _data_summary(manifest, config),
        "splits": {"train": len(features["train"]), "val": len(features["val"]),
                   "trained_on": "train+val", "train_prefix_views_per_record": config.prefixes,
                   "built": {k: v.get("labels") for k, v in
                             manifest.get("counts", {}).items()}},
        "training": {"loss": LOSS_WEIGHTS, "backbone": "frozen", "epochs": epochs,
                     "epochs_tried": config.epochs,
                     "prefix_views_per_record": config.prefixes,
                     "batch_size": config.batch_size, "lr": config.lr, "optimizer": "AdamW",
                     "trainer": "crossfit.fit_packed (packed rows; the same loss as "
                                "guardrail.probes.train.train_head's, no epoch selection)",
                     "seed": config.seed, "scored_weight": config.scored_weight,
                     "soft_scored": config.soft_scored,
                     "ensemble": {"seeds": seeds,
                                  "how": ENSEMBLE_HOW[bool(config.sequence_hidden)]}},
        "metrics": {"oof": {"streaming": streaming, "full": full, **estimates},
                    "train+val_in_sample": streaming_report(
                        [s.tolist() for s in final_scores], labels, choice.threshold,
                        choice.k)},
        "timings": {k: round(v, 1) for k, v in timings.items()},
    }
    path = save_probe(config.out, head, saved, name=NAME)
    _say(config, f"saved {path} ({path.stat().st_size} bytes) in {timings['total_s']:.0f} s")
    return {**saved, "weights": str(path)}


def _halt_summary(halts: Sequence[int | None], labels: Sequence[int], lengths: Sequence[int]
                  ) -> dict[str, Any]:
    predictions = [int(h is not None) for h in halts]
    m = macro_f1(labels, predictions)
    benign = [p for p, y in zip(predictions, labels, strict=True) if y == 0]
    return {"macro_f1": m["macro_f1"], "precision": m["precision_1"], "recall": m["recall_1"],
            "fraction_seen": fraction_seen(labels, halts, lengths),
            "false_halt_rate": sum(benign) / len(benign) if benign else None,
            "records": len(labels)}


def _data_summary(manifest: dict[str, Any], config: TrainConfig) -> dict[str, Any]:
    return {
        "builder": "python -m guardrail_harmful_content.data build",
        "folder": str(config.data) if config.data else None,
        "seed": manifest.get("seed"),
        "sources": [{k: s.get(k) for k in ("name", "version", "sha256", "licence", "model",
                                           "decoding", "answers")
                     if s.get(k) is not None} for s in manifest.get("sources", [])],
        "subsample": {"train": config.max_train, "val": config.max_val,
                      "how": "stratified by (kind, label), seeded"},
    }


def _say(config: TrainConfig, message: str) -> None:
    if config.progress:
        print(f"[harmful-content] {message}", file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="guardrail train harmful-content",
                                description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--data", type=Path, help="a data build folder (default: build one)")
    p.add_argument("--out", type=Path, default=d.out, help="where to write the weights")
    p.add_argument("--model", help="local HF model folder (default: the embedded SmolLM2)")
    p.add_argument("--layers", type=int, nargs="+", default=list(d.layers),
                   help="candidate layers (decoder blocks, as in Needs.layers)")
    p.add_argument("--train-layers", type=int, nargs="+",
                   help="train heads on these of --layers only (default: all)")
    p.add_argument("--no-concat", action="store_true", help="do not try two layers together")
    p.add_argument("--pooling", choices=POOLINGS, default=d.pooling,
                   help="what the head reads per token: its states, or also the mean of the "
                        "response's states so far (default)")
    p.add_argument("--sequence-hidden", type=int, default=d.sequence_hidden, metavar="M",
                   help="0: SCM's linear sequence head (default); M > 0: a one-hidden-layer MLP "
                        "with M GELU units (an ensemble keeps every seed's units)")
    p.add_argument("--max-train", type=int, default=d.max_train,
                   help="training records kept (stratified); 0: all")
    p.add_argument("--max-val", type=int, default=0, help="validation records kept; 0: all")
    p.add_argument("--prefixes", type=int, default=d.prefixes,
                   help="truncated copies of each training record to train on too (0: none)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--ensemble-seeds", type=int, nargs="+", default=[],
                   help="also train the chosen layers with these seeds and average the heads "
                        "(the logits of linear heads; one head's cost per token)")
    p.add_argument("--max-false-halt-rate", type=float, default=d.max_false_halt_rate)
    p.add_argument("--max-fraction-seen", type=float, default=None, metavar="SHARE",
                   help="also cap the mean share of a harmful answer read before the halt "
                        "(validation; --calibration val)")
    p.add_argument("--calibration", choices=("val", "crossfit"), default=d.calibration,
                   help="val: choose the epoch and (threshold, k) on validation (default); "
                        "crossfit: grouped K-fold over train+val, choose them on out-of-fold "
                        "scores and train the shipped heads on train+val")
    p.add_argument("--folds", type=int, default=d.folds, help="folds of --calibration crossfit")
    p.add_argument("--scored-weight", type=float, default=d.scored_weight,
                   help="loss weight of pyrit's human-scored records (crossfit only; "
                        "default 1)")
    p.add_argument("--soft-scored", action="store_true",
                   help="train on pyrit's human scores as soft sequence targets (crossfit "
                        "only; evaluation labels stay score >= 0.5)")
    p.add_argument("--recalibrate", type=Path, metavar="WEIGHTS",
                   help="do not train: choose (threshold, k) again for these trained heads on "
                        "validation under the caps above, and write them to --out")
    p.add_argument("--cache", type=Path, help="work folder (default: the guardrail cache)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config = TrainConfig(
        data=args.data, out=args.out, model=args.model, layers=tuple(args.layers),
        train_layers=tuple(args.train_layers) if args.train_layers else None,
        concat=not args.no_concat, pooling=args.pooling,
        sequence_hidden=args.sequence_hidden, prefixes=args.prefixes,
        max_train=args.max_train or None,
        max_val=args.max_val or None, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, seed=args.seed, ensemble_seeds=tuple(args.ensemble_seeds),
        max_false_halt_rate=args.max_false_halt_rate,
        max_fraction_seen=args.max_fraction_seen, calibration=args.calibration,
        folds=args.folds, scored_weight=args.scored_weight, soft_scored=args.soft_scored,
        cache=args.cache,
        progress=not args.quiet, recalibrate=args.recalibrate,
    )
    try:
        saved = train(config)
    except (FileNotFoundError, ValueError, ProbeFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = {"weights": saved["weights"], "layers": saved["layers"],
               "threshold": saved["threshold"], "k": saved["rule"]["k"],
               "metrics": saved["metrics"], "timings": saved["timings"],
               "config": asdict(config) | {"out": str(config.out), "data": str(config.data),
                                           "cache": str(config.cache)}}
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
