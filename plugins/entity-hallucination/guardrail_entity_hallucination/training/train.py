"""``guardrail train entity-hallucination``: build the offline data, cache SmolLM2's states, choose
a head and its threshold (leave-one-source-out for the default combined head, on the validation
split for the others), evaluate it and save the weights with their record (see
docs/entity-hallucination.md).

The run is a pipeline of stages: ``plan`` (what the arguments ask for), ``load_features`` (data
and the observer's states), the plan's ``HeadSearch`` (the validation strategy, ``search.py``:
``TokenSearch`` for the paper's token probe, ``SpanSearch`` for the span head), ``calibrate``,
``evaluate`` and ``record``. ``--head combined`` runs ``train_combined`` instead. With
``own-test.jsonl`` in the build (SmolLM2's own answers) the head is also evaluated on it;
``--own`` trains and validates on them too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from guardrail.probes.io import save_probe
from guardrail.toolkit.calibrate import threshold_for_fpr
from guardrail.toolkit.features import CachedRecord, FeatureSet
from guardrail.toolkit.sources import cache_dir

from ..probe import SPAN_WEIGHTS, TOKEN_WEIGHTS, AnyEntityProbe, EntityProbe
from ..span_probe import EntitySpanProbe, save_span_probe
from .evaluation import (
    evaluate_by_type,
    evaluate_records,
    probe_scorer,
    score_tokens,
    span_scores,
    span_types,
    within_type,
)
from .features import CANDIDATE_LAYERS, DEFAULT_LIMITS, build_data, split_features, split_sizes
from .search import HeadSearch, Search, SpanSearch, TokenSearch
from .train_span import (
    DEFAULT_WEIGHT_DECAYS,
    SHIPPED_MEMBERS,
    SHIPPED_WEIGHT_DECAY,
    parse_member,
)
from .train_token import FitResult, fit_probe, select_probe, with_extras

__all__ = ["FitResult", "HeadSearch", "Plan", "Search", "SpanSearch", "TokenSearch", "calibrate",
           "evaluate", "fit_probe", "load_features", "main", "plan", "record",
           "save_entity_probe", "select_probe", "with_extras"]

Records = list[CachedRecord]


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one run does, resolved from the arguments (``--quick`` applied)."""

    search: HeadSearch
    limits: dict[str, int | None]
    extract: list[int]  # layers cached
    data: Path
    features: Path
    quick: bool = False
    own: bool = False
    own_repeat: int = 1


def calibrate(probe: AnyEntityProbe, val: Sequence[CachedRecord], target_fpr: float = 0.1
              ) -> dict[str, Any]:
    """Set ``probe.threshold`` to the one with the highest span recall at FPR <= target on
    validation; return the choice."""
    labels, scores, _ = span_scores(val, score_tokens(probe_scorer(probe), val), "max")
    choice = threshold_for_fpr(labels, scores, target=target_fpr)
    probe.threshold = float(choice.threshold)
    return {"target_fpr": target_fpr, "threshold": choice.threshold, "recall": choice.recall,
            "fpr": choice.fpr, "met": choice.met}


def save_entity_probe(probe: EntityProbe, weights: Path, config: dict[str, Any]) -> Path:
    """Write the probe as ``weights`` (.safetensors) with its .json beside it."""
    document = {
        "layer": probe.layer, "threshold": probe.threshold, "rule": {"kind": "span_max"},
        "features": {"names": list(probe.features), "mean": probe.mean.tolist(),
                     "std": probe.std.tolist()},
        **config,
    }
    return save_probe(weights.parent, probe.head, document, name=weights.stem)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="guardrail train entity-hallucination",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=None,
                   help="data folder (built if missing; default: <cache>/entity-data)")
    p.add_argument("--features", type=Path, default=None,
                   help="feature cache (default: <cache>/entity-features)")
    p.add_argument("--head", choices=("combined", "token", "span"), default="combined",
                   help="combined (default, shipped): the span head chosen and calibrated "
                   "leave-one-source-out (train_combined); span: the version-2 span head "
                   "chosen on validation; token: the paper's per-token probe")
    p.add_argument("--choose", action="store_true",
                   help="combined head: run the whole leave-one-source-out grid and write its "
                   "choice instead of the shipped recipe")
    p.add_argument("--out", type=Path, default=None,
                   help="weights .safetensors to write (default: the package's shipped file of "
                   "that head, weights/entity_probe.* or weights/entity_span_probe.*)")
    p.add_argument("--layers", type=int, nargs="+", default=list(CANDIDATE_LAYERS))
    p.add_argument("--weight-decays", type=float, nargs="+", default=None,
                   help="span head: the L2 weight decays tried (chosen on validation; default: "
                   f"{SHIPPED_WEIGHT_DECAY} for the ensemble, {list(DEFAULT_WEIGHT_DECAYS)} "
                   "with --single-layer)")
    p.add_argument("--members", nargs="+", default=list(SHIPPED_MEMBERS),
                   help="span head: the ensemble's members, each POOL:LAYER blocks joined by "
                   "'+' (pool 'mean': the entity's mean state; 'prev': the state of the token "
                   "before it); their logits are averaged into one head")
    p.add_argument("--single-layer", action="store_true",
                   help="span head: one mean block per candidate layer (--layers), the layer "
                   "and weight decay chosen on validation, instead of the ensemble")
    p.add_argument("--train-limit", type=int, default=None,
                   help=f"training records used (default: token {DEFAULT_LIMITS['train']}, "
                   "span all)")
    p.add_argument("--val-limit", type=int, default=None,
                   help=f"validation records used (default: token {DEFAULT_LIMITS['val']}, "
                   "span all)")
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument("--epochs", type=int, default=15, help="token head only")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--no-extras", action="store_true",
                   help="do not try the probe with surprisal and entropy features")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 is fastest on a shared 2-core machine)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 60/30/40/20 records, 2 layers, 3 epochs")
    p.add_argument("--report", type=Path, default=None, help="also write the results JSON here")
    p.add_argument("--own", action="store_true",
                   help="also train and validate on SmolLM2's own answers (own-train.jsonl, "
                   "own-val.jsonl from `python -m "
                   "guardrail_entity_hallucination.training.data own`)")
    p.add_argument("--own-repeat", type=int, default=1,
                   help="with --own: each own-answer training record counts this many times")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = TOKEN_WEIGHTS if args.head == "token" else SPAN_WEIGHTS
    if args.report is not None and \
            args.report.resolve() == args.out.with_suffix(".json").resolve():
        parser.error(f"--report {args.report} would overwrite the weights' own .json; "
                     "choose another name")
    if args.head == "combined":
        return _train_combined(args)
    try:
        run = plan(args)
    except ValueError as exc:
        parser.error(str(exc))
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    features, data_dir = load_features(run)
    seconds = {"features": round(time.perf_counter() - t0)}
    train, val = training_records(features, run)
    found = run.search.run(train, val)
    threshold = calibrate(found.probe, val)
    results = evaluate(found.probe, features)
    config = record(found, run, features, data_dir, threshold, results)
    seconds["total"] = round(time.perf_counter() - t0)
    config["seconds"] = seconds
    if isinstance(found.probe, EntitySpanProbe):
        weights = save_span_probe(found.probe, args.out, config)
    else:
        weights = save_entity_probe(found.probe, args.out, config)
    _report(found, weights, results, config, args.report)
    return 0


def _train_combined(args: argparse.Namespace) -> int:
    """``--head combined``: the leave-one-source-out trainer, with the options it shares."""
    from .train_combined import main as train_combined

    return train_combined([*(["--data", str(args.data)] if args.data else []),
                           *(["--features", str(args.features)] if args.features else []),
                           "--out", str(args.out),
                           *(["--choose"] if args.choose else []),
                           *(["--report", str(args.report)] if args.report else [])])


def plan(args: argparse.Namespace) -> Plan:
    """The run the arguments ask for; ValueError names a bad ``--members`` entry."""
    span, quick = args.head == "span", args.quick
    ensemble = span and not args.single_layer
    members = [parse_member(m) for m in args.members] if ensemble else None
    decays = list(args.weight_decays) if args.weight_decays is not None else (
        [SHIPPED_WEIGHT_DECAY] if ensemble else list(DEFAULT_WEIGHT_DECAYS))
    limits: dict[str, int | None] = {
        "train": args.train_limit if args.train_limit is not None or span
        else DEFAULT_LIMITS["train"],
        "val": args.val_limit if args.val_limit is not None or span else DEFAULT_LIMITS["val"],
        "test": args.test_limit, "paired": None}
    layers, epochs = list(args.layers), args.epochs
    if quick:
        limits = {"train": 60, "val": 30, "test": 40, "paired": 20}
        layers, epochs, decays = layers[:2], 3, decays[:2]
    search: HeadSearch = (
        SpanSearch(layers, decays, members) if span
        else TokenSearch(layers, not args.no_extras, epochs, args.lr, args.seed))
    # A full run caches every candidate layer, so --layers picks among them without re-reading
    extract = set(layers) | search.layers_read() | (set() if quick else set(CANDIDATE_LAYERS))
    base = cache_dir()
    return Plan(search, limits, sorted(extract), args.data or base / "entity-data",
                args.features or base / "entity-features", quick, args.own, args.own_repeat)


def load_features(run: Plan) -> tuple[dict[str, FeatureSet], Path]:
    """Build the data (when missing) and cache SmolLM2's states over each split used."""
    data_dir = build_data(run.data)
    from guardrail.observer.hf import FLOAT32_PRODUCTS, load_smollm2
    from guardrail.policy import ObserverSpec

    observer = load_smollm2(ObserverSpec(options=FLOAT32_PRODUCTS))
    features = {}
    for split in ("train", "val", "test", "paired"):
        features.update(split_features(observer, data_dir, run.features, (split,), run.limits,
                                       run.extract, seed=0,
                                       tag=_tag(split, run.limits[split], run.quick)))
    own_splits = _own_splits(data_dir, run.own)
    features.update(split_features(observer, data_dir, run.features, own_splits, {},
                                   run.extract, seed=0, tag="quick" if run.quick else "sub"))
    return features, data_dir


def _own_splits(data_dir: Path, own: bool) -> list[str]:
    """SmolLM2's own answers used: ``own-train``/``own-val`` with ``--own`` (which needs them)
    and ``own-test`` whenever it is there."""
    splits = ["own-train", "own-val"] if own else []
    for name in splits:
        if not (data_dir / f"{name}.jsonl").exists():
            raise SystemExit(f"--own: {data_dir / (name + '.jsonl')} is missing (run "
                             f"`python -m "
                             f"guardrail_entity_hallucination.training.data own --data "
                             f"{data_dir}`)")
    if (data_dir / "own-test.jsonl").exists():
        splits.append("own-test")
    return splits


def training_records(features: Mapping[str, FeatureSet], run: Plan) -> tuple[Records, Records]:
    """The training and validation records (with ``--own``, the own answers added)."""
    train = list(features["train"].records)
    val = list(features["val"].records)
    if run.own:
        train += list(features["own-train"].records) * max(1, run.own_repeat)
        val += list(features["own-val"].records)
    return train, val


def evaluate(probe: AnyEntityProbe, features: Mapping[str, FeatureSet]
             ) -> dict[str, dict[str, Any]]:
    """The head and its baselines on validation, test, the paired set and the own answers."""
    results = {
        "val": evaluate_records(probe, features["val"].records),
        "test": evaluate_records(probe, features["test"].records),
        "paired": evaluate_records(probe, features["paired"].records, by="version"),
    }
    if "own-test" in features:
        own = features["own-test"]
        results["own-test"] = evaluate_records(probe, own.records, by="subject_kind")
        if own.path is not None:
            types = span_types(Path(own.meta["data"]["path"]))
            by_type = evaluate_by_type(probe, own.records, types)
            results["own-test"]["by_type"] = by_type
            results["own-test"]["within_type"] = within_type(by_type)
    return results


def record(found: Search, run: Plan, features: Mapping[str, FeatureSet], data_dir: Path,
           threshold: dict[str, Any], results: Mapping[str, Mapping[str, Any]]
           ) -> dict[str, Any]:
    """The weights' JSON: base model, data provenance, splits, training, calibration, metrics."""
    from guardrail.observer.hf import SMOLLM2_NAME

    manifest = json.loads((data_dir / "manifest.json").read_text(encoding="utf-8"))
    own = {"builder": "python -m guardrail_entity_hallucination.training.data own",
           "train_repeat": max(1, run.own_repeat)}
    return {
        "base_model": SMOLLM2_NAME,
        "hidden_size": found.probe.hidden_size,
        "data": {"builder": "python -m guardrail_entity_hallucination.training.data build",
                 "seed": manifest.get("seed"),
                 "sources": {name: {k: v for k, v in info.items() if k in ("version", "sha256")}
                             for name, info in manifest.get("sources", {}).items()}},
        "splits": split_sizes(features, data_dir),
        "own_answers": own if run.own else None,
        "training": found.training,
        **({"validation_comparison": found.comparison} if found.comparison is not None else {}),
        "calibration": threshold,
        "metrics": {split: {"all": r["all"]["probe"], **{
            key: {k: v["probe"] for k, v in r[key].items()}
            for key in ("by_kind", "by_subject_kind", "by_type") if key in r}}
            for split, r in results.items()},
    }


def _report(found: Search, weights: Path, results: Mapping[str, Mapping[str, Any]],
            config: Mapping[str, Any], report: Path | None) -> None:
    """Print the run's summary; with ``report``, write it with the results and config."""
    probe, comparison = found.probe, found.comparison
    summary = {"weights": str(weights), "unit": probe.unit, "layer": probe.layer,
               "features": list(probe.features), "threshold": probe.threshold,
               "layer_selection": found.table,
               **({"validation_comparison": comparison} if comparison is not None else {}),
               "test": results["test"]["all"], "paired": results["paired"]["all"],
               **({"own-test": results["own-test"]["all"],
                   "own-test_within_type": results["own-test"].get("within_type")}
                  if "own-test" in results else {}),
               "seconds": config["seconds"]}
    if report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps({**summary, "results": results, "config": config},
                                     indent=2, default=_json_default) + "\n", encoding="utf-8")
    print(json.dumps(summary, indent=2, default=_json_default))


def _tag(split: str, limit: int | None, quick: bool) -> str:
    """The name under which a split's records are written and cached: ``quick`` for smoke runs;
    training and validation whole (``all``) or subsampled (``sub``); test and paired are always
    whole and keep the name ``sub`` (their feature caches predate ``all``)."""
    if quick:
        return "quick"
    return "all" if limit is None and split in ("train", "val") else "sub"


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


if __name__ == "__main__":
    raise SystemExit(main())
