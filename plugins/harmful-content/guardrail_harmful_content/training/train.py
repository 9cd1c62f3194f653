"""``guardrail train harmful-content``: SCM's dual head on a frozen backbone, as a staged pipeline.

1. data (``inputs.prepare_data``): build the offline data unless ``--data`` names a build, and
   subsample train and val, stratified by record kind and label (``--max-train``, ``--max-val``);
2. features (``inputs.read_features``): the observer's states of the candidate layers, read once
   into the feature cache (the prompt as context, then the response);
3. search and 4. calibration, by the validation strategy (``validation.py``): ``HoldOut``
   (``--calibration val``) trains a head per layer and on the two best side by side (0.6 token
   CE + 0.4 sequence CE + 1.0 logic loss), keeps the epoch and layers with the best calibrated
   streaming macro-F1 on validation, adds the ``--ensemble-seeds`` heads and calibrates
   ``(threshold, k)`` on validation (false halts <= 3%); ``CrossFold`` (``--calibration
   crossfit``) chooses both on grouped K-fold out-of-fold scores of train+val;
5. record (``record.save``): the head and its JSON (base model, layers, dims, threshold, k, data,
   splits, metrics) that the monitor ships.

``--recalibrate WEIGHTS`` runs stages 1, 2 and 4 only, for heads already trained.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from guardrail.probes.io import ProbeFileError, load_probe, save_probe

from ..head import DualHead
from ..pooling import POOLINGS
from .calibration import holdout_decision
from .config import DEFAULT_LAYERS, WEIGHTS_DIR, TrainConfig
from .inputs import label, load_observer, prepare_data, read_features, subsample, work_dir
from .record import NAME, built_counts, save, say
from .scoring import prefix_scores, stack_layers
from .search import LOSS_WEIGHTS
from .validation import CrossFold, HoldOut, Validation

DESCRIPTION = ("``guardrail train harmful-content``: build the data, read it once with the "
               "observer, train SCM's dual head on a frozen backbone, choose the layer(s) and "
               "calibrate the count-k rule on validation, and write the weights (safetensors + "
               "JSON) that the monitor ships.")

__all__ = [
    "DEFAULT_LAYERS",
    "LOSS_WEIGHTS",
    "NAME",
    "WEIGHTS_DIR",
    "TrainConfig",
    "load_observer",
    "main",
    "prepare_data",
    "recalibrate",
    "subsample",
    "train",
]


def train(config: TrainConfig, observer: Any = None) -> dict[str, Any]:
    """Run the pipeline; return the saved config (``weights`` holds the file's path).

    ``observer``: an observer object to read with instead of loading ``config.model`` (tests
    pass a fake one with a planted signal)."""
    stray = sorted(set(config.fit_layers) - set(config.layers))
    if stray:
        raise ValueError(f"--train-layers {stray} are not among --layers {list(config.layers)}")
    config.validation.check(config)
    t0 = time.perf_counter()
    work = work_dir(config)
    paths, manifest = prepare_data(config, work)
    timings = {"data_s": time.perf_counter() - t0}
    if observer is None:
        observer = load_observer(config.model)
    t = time.perf_counter()
    features = read_features(observer, paths, work, config.layers, config)
    timings["features_s"] = time.perf_counter() - t
    t = time.perf_counter()
    fitted = config.validation.fit(config, features, lambda m: say(config, m))
    timings["train_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    record = {**fitted.record, "splits": {**fitted.record["splits"],
                                          "built": built_counts(manifest)}}
    return save(config, observer, fitted.head, fitted.layers, record, manifest, timings)


def recalibrate(config: TrainConfig, weights: Path, observer: Any = None) -> dict[str, Any]:
    """Choose ``(threshold, k)`` again for the heads in ``weights`` on validation, under
    ``config``'s caps, and write them with the new rule to ``config.out``; the heads are not
    retrained. The saved config keeps the training record and notes what was re-chosen."""
    if not isinstance(config.validation, HoldOut):
        raise ValueError("--recalibrate re-calibrates on validation: use --calibration val")
    t0 = time.perf_counter()
    work = work_dir(config)
    paths, _ = prepare_data(config, work)
    if observer is None:
        observer = load_observer(config.model)
    loaded = load_probe(weights, name=NAME, observer=observer)
    head = loaded.head
    if not isinstance(head, DualHead):
        raise ValueError(f"{loaded.path}: not a harmful-content head "
                         f"({type(head).__name__})")
    layers = tuple(int(x) for x in loaded.config.get("layers") or [loaded.config["layer"]])
    pooling = str(loaded.config.get("pooling", "prefix_mean"))
    read = tuple(sorted(set(config.layers) | set(layers)))  # reuse the trainer's feature cache
    val = read_features(observer, paths, work, read, config, splits=("val",))["val"]
    labels = [label(r) for r in val]
    if len(set(labels)) < 2:
        raise ValueError("the validation split needs harmful and harmless records")
    decision = holdout_decision(prefix_scores(head, stack_layers(val, layers, pooling)), labels,
                                config.max_false_halt_rate, config.validation.max_fraction_seen)
    before = {"weights": str(loaded.path), "threshold": loaded.config.get("threshold"),
              "rule": loaded.config.get("rule"),
              "calibration": loaded.config.get("calibration"),
              "metrics": loaded.config.get("metrics")}
    saved = {k: v for k, v in loaded.config.items() if k not in ("format", "version", "name",
                                                                  "head", "tensors")}
    saved.update({**decision, "recalibrated_from": before,
                  "timings": {"total_s": round(time.perf_counter() - t0, 1)}})
    path = save_probe(config.out, head, saved, name=NAME)
    say(config, f"re-calibrated {loaded.path}: threshold {saved['threshold']}, k "
                f"{saved['rule']['k']}; saved {path}")
    return {**saved, "weights": str(path)}


def _parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="guardrail train harmful-content", description=DESCRIPTION)
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
    p.add_argument("--calibration", choices=("val", "crossfit"), default=HoldOut.name,
                   help="val: choose the epoch and (threshold, k) on validation (default); "
                        "crossfit: grouped K-fold over train+val, choose them on out-of-fold "
                        "scores and train the shipped heads on train+val")
    p.add_argument("--folds", type=int, default=CrossFold.folds,
                   help="folds of --calibration crossfit")
    p.add_argument("--scored-weight", type=float, default=CrossFold.scored_weight,
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


def _validation(args: argparse.Namespace) -> Validation:
    """The strategy ``--calibration`` names, refusing the other one's flags."""
    if args.calibration == CrossFold.name:
        if args.max_fraction_seen is not None:
            raise ValueError("--max-fraction-seen works with --calibration val only")
        return CrossFold(folds=args.folds, scored_weight=args.scored_weight,
                         soft_scored=args.soft_scored)
    if args.scored_weight != 1.0:
        raise ValueError("--scored-weight needs --calibration crossfit")
    if args.soft_scored:
        raise ValueError("--soft-scored needs --calibration crossfit")
    return HoldOut(max_fraction_seen=args.max_fraction_seen)


def _config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        data=args.data, out=args.out, model=args.model, layers=tuple(args.layers),
        train_layers=tuple(args.train_layers) if args.train_layers else None,
        concat=not args.no_concat, pooling=args.pooling,
        sequence_hidden=args.sequence_hidden, prefixes=args.prefixes,
        max_train=args.max_train or None,
        max_val=args.max_val or None, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, seed=args.seed, ensemble_seeds=tuple(args.ensemble_seeds),
        max_false_halt_rate=args.max_false_halt_rate, validation=_validation(args),
        cache=args.cache, progress=not args.quiet,
    )


def _summary(config: TrainConfig, recalibrated: Path | None) -> dict[str, Any]:
    """The run's settings as the CLI prints them: one flat dict, flag by flag."""
    flat = {k: v for k, v in asdict(config).items() if k != "validation"}
    strategy = {"max_fraction_seen": None, "calibration": config.validation.name,
                "folds": CrossFold.folds, "scored_weight": CrossFold.scored_weight,
                "soft_scored": CrossFold.soft_scored, **vars(config.validation)}
    return flat | strategy | {"out": str(config.out), "data": str(config.data),
                              "cache": str(config.cache), "recalibrate": recalibrated}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = _config(args)
        if args.recalibrate is not None:
            saved = recalibrate(config, args.recalibrate)
        else:
            saved = train(config)
    except (FileNotFoundError, ValueError, ProbeFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = {"weights": saved["weights"], "layers": saved["layers"],
               "threshold": saved["threshold"], "k": saved["rule"]["k"],
               "metrics": saved["metrics"], "timings": saved["timings"],
               "config": _summary(config, args.recalibrate)}
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
