"""``guardrail train entity-hallucination``: build the offline data, cache SmolLM2's states, train
the entity probe, pick its layer and threshold on validation, evaluate it and its baselines on the
held-out test split and the paired set, and save the weights (see docs/entity-hallucination.md).

Two heads: the span head (``--head span``, the default since it beat the token probe on
validation; below) and the paper's token probe (``--head token``). The token probe is
``Linear(hidden, 1)`` (optionally ``hidden + 2`` with the token's standardised
surprisal and entropy appended); labels: fabricated entity tokens 1, supported entity tokens 0,
other tokens 0 with weight 1 and entity tokens weight 10; loss: token BCE annealed linearly into
span-max BCE (``guardrail.toolkit.train.entity_loss``). Candidate layers are compared by validation
span-max AUC. Its full run subsamples the training and validation splits so that it fits about
12 minutes on two shared CPU cores (the sizes used are saved with the weights).

The span head (``span_probe``, ``train_span``): one logistic
regression per entity the monitor's finder sees, on the mean of its tokens' states and its
surprisal/entropy statistics, with the layer and weight decay chosen on validation span AUC
(scored as the monitor scores); it trains on the whole training and validation splits by default
(features cached as ``<split>.all.jsonl``) and records the shipped token probe's validation span
AUC on the same records beside its own.

SmolLM2's own answers (``python -m guardrail_entity_hallucination.training.data own``, written next
to the build as ``own-{train,val,test}.jsonl``): when ``own-test.jsonl`` is there the probe is also
evaluated on it (pooled, per subject kind and per fact type); ``--own`` adds ``own-train`` and
``own-val`` to the training and validation records (``--own-repeat`` times each).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from guardrail.probes.heads import LinearProbe
from guardrail.probes.io import save_probe
from guardrail.toolkit.calibrate import threshold_for_fpr
from guardrail.toolkit.features import CachedRecord
from guardrail.toolkit.sources import cache_dir
from guardrail.toolkit.train import entity_loss, span_auc_metric, train_head

from ..probe import (
    EXTRA_FEATURES,
    SPAN_WEIGHTS,
    TOKEN_WEIGHTS,
    AnyEntityProbe,
    EntityProbe,
    load_entity_probe,
    stack_inputs,
)
from ..span_probe import EntitySpanProbe, save_span_probe
from .evaluation import (
    TokenScorer,
    entity_tokens_only,
    evaluate_by_type,
    evaluate_records,
    probe_scorer,
    score_tokens,
    span_auc,
    span_scores,
    span_types,
    within_type,
)
from .features import CANDIDATE_LAYERS, DEFAULT_LIMITS, build_data, split_features, split_sizes
from .train_span import (
    DEFAULT_WEIGHT_DECAYS,
    SHIPPED_MEMBERS,
    SHIPPED_WEIGHT_DECAY,
    parse_member,
    select_span_probe,
)

__all__ = ["FitResult", "fit_probe", "main", "select_probe", "with_extras"]


@dataclasses.dataclass
class FitResult:
    """A trained probe with its validation span-max AUC and per-epoch history."""

    probe: EntityProbe
    val_span_auc: float | None
    history: list[dict[str, float | None]]


def _feature_stats(records: Sequence[CachedRecord]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of surprisal and entropy over the training tokens."""
    columns = []
    for name in EXTRA_FEATURES:
        values = torch.cat([getattr(r, name).float() for r in records])
        values = values[~torch.isnan(values)]
        columns.append((values.mean(), values.std()))
    return (torch.tensor([float(m) for m, _ in columns]),
            torch.tensor([max(float(s), 1e-6) for _, s in columns]))


def with_extras(records: Sequence[CachedRecord], layer: int, mean: torch.Tensor,
                std: torch.Tensor) -> list[CachedRecord]:
    """Copies of ``records`` whose layer-``layer`` states carry the standardised surprisal and
    entropy as two more columns (what a probe with extra features reads)."""
    out = []
    for r in records:
        if r.surprisal is None or r.entropy is None:
            raise ValueError(f"record {r.index}: no surprisal/entropy cached (stats=True)")
        stacked = stack_inputs(r.hidden[layer].float(),
                               {"surprisal": r.surprisal, "entropy": r.entropy},
                               EXTRA_FEATURES, mean, std)
        out.append(dataclasses.replace(r, hidden={layer: stacked}))
    return out


def fit_probe(train: Sequence[CachedRecord], val: Sequence[CachedRecord], layer: int, *,
              extras: bool = False, epochs: int = 15, lr: float = 2e-3, batch_size: int = 8,
              warmup: float = 1.0, seed: int = 42, progress: bool = True) -> FitResult:
    """Train one probe on ``layer`` (with or without the extra features); the best epoch by
    validation span-max AUC is kept."""
    hidden_size = int(train[0].hidden[layer].shape[-1])
    names: tuple[str, ...] = ()
    mean, std = torch.zeros(0), torch.ones(0)
    if extras:
        names = EXTRA_FEATURES
        mean, std = _feature_stats(train)
        train, val = with_extras(train, layer, mean, std), with_extras(val, layer, mean, std)
    head = LinearProbe(hidden_size + len(names), seed=seed)
    result = train_head(head, train, val, layer=layer, loss_fn=entity_loss(warmup),
                        metric_fn=span_auc_metric(layer), epochs=epochs, lr=lr,
                        batch_size=batch_size, seed=seed, progress=progress,
                        collate_kwargs={"entity_weight": 10.0})
    probe = EntityProbe(head, layer, 0.5, names, mean, std)
    return FitResult(probe, result.best_metric, result.history)


def select_probe(train: Sequence[CachedRecord], val: Sequence[CachedRecord],
                 layers: Sequence[int], *, try_extras: bool = True, progress: bool = True,
                 **fit_kwargs: Any) -> tuple[FitResult, list[dict[str, Any]]]:
    """Fit a plain probe on each candidate layer, then one with extra features on the best layer;
    return the best by validation span-max AUC and the comparison table."""
    table: list[dict[str, Any]] = []
    best: FitResult | None = None
    for layer in layers:
        fit = fit_probe(train, val, layer, progress=progress, **fit_kwargs)
        table.append({"layer": layer, "extras": False, "val_span_auc": fit.val_span_auc})
        if progress:
            print(f"layer {layer}: val span AUC {fit.val_span_auc}", file=sys.stderr)
        if best is None or (fit.val_span_auc or 0) > (best.val_span_auc or 0):
            best = fit
    assert best is not None, "no candidate layer"
    if try_extras and all(r.surprisal is not None for r in train):
        fit = fit_probe(train, val, best.probe.layer, extras=True, progress=progress,
                        **fit_kwargs)
        table.append({"layer": best.probe.layer, "extras": True,
                      "val_span_auc": fit.val_span_auc})
        if progress:
            print(f"layer {best.probe.layer} + surprisal/entropy: val span AUC "
                  f"{fit.val_span_auc}", file=sys.stderr)
        if (fit.val_span_auc or 0) > (best.val_span_auc or 0):
            best = fit
    return best, table


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
    span = args.head == "span"
    if args.out is None:
        args.out = TOKEN_WEIGHTS if args.head == "token" else SPAN_WEIGHTS
    if args.report is not None and \
            args.report.resolve() == args.out.with_suffix(".json").resolve():
        parser.error(f"--report {args.report} would overwrite the weights' own .json; "
                     "choose another name")
    if args.head == "combined":
        from .train_combined import main as train_combined

        return train_combined([*(["--data", str(args.data)] if args.data else []),
                               *(["--features", str(args.features)] if args.features else []),
                               "--out", str(args.out),
                               *(["--choose"] if args.choose else []),
                               *(["--report", str(args.report)] if args.report else [])])
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    limits: dict[str, int | None] = {
        "train": args.train_limit if args.train_limit is not None or span
        else DEFAULT_LIMITS["train"],
        "val": args.val_limit if args.val_limit is not None or span else DEFAULT_LIMITS["val"],
        "test": args.test_limit, "paired": None}
    layers = list(args.layers)
    ensemble = span and not args.single_layer
    try:
        members = [parse_member(m) for m in args.members] if ensemble else None
    except ValueError as exc:
        parser.error(str(exc))
    decays = list(args.weight_decays) if args.weight_decays is not None else (
        [SHIPPED_WEIGHT_DECAY] if ensemble else list(DEFAULT_WEIGHT_DECAYS))
    member_layers = {layer for m in members or [] for _, layer in m}
    if args.quick:
        limits = {"train": 60, "val": 30, "test": 40, "paired": 20}
        layers, args.epochs, decays = layers[:2], 3, decays[:2]
    base = cache_dir()
    data_dir = build_data(args.data or base / "entity-data")
    from guardrail.observer.hf import SMOLLM2_NAME, load_smollm2
    from guardrail.policy import ObserverSpec

    observer = load_smollm2(ObserverSpec())
    # A full run caches every candidate layer, so --layers picks among them without re-reading
    extract = sorted(set(layers) | member_layers) if args.quick \
        else sorted(set(CANDIDATE_LAYERS) | set(layers) | member_layers)
    features = {}
    for split in ("train", "val", "test", "paired"):
        features.update(split_features(observer, data_dir,
                                       args.features or base / "entity-features", (split,),
                                       limits, extract, seed=0,
                                       tag=_tag(split, limits[split], args.quick)))
    own_splits = ["own-train", "own-val"] if args.own else []
    if args.own:
        for name in own_splits:
            if not (data_dir / f"{name}.jsonl").exists():
                raise SystemExit(f"--own: {data_dir / (name + '.jsonl')} is missing (run "
                                 f"`python -m "
                                 f"guardrail_entity_hallucination.training.data own --data "
                                 f"{data_dir}`)")
    if (data_dir / "own-test.jsonl").exists():
        own_splits.append("own-test")
    features.update(split_features(observer, data_dir, args.features or base / "entity-features",
                                   own_splits, {}, extract, seed=0,
                                   tag="quick" if args.quick else "sub"))
    t_features = time.perf_counter() - t0
    train_records = list(features["train"].records)
    val_records = list(features["val"].records)
    if args.own:
        train_records += list(features["own-train"].records) * max(1, args.own_repeat)
        val_records += list(features["own-val"].records)
    probe: AnyEntityProbe
    comparison: dict[str, Any] | None = None
    if span:
        span_fit, table = select_span_probe(train_records, val_records, layers, decays,
                                            members=members)
        probe = span_fit.probe
        training: dict[str, Any] = {
            "method": "logistic regression per entity found by spans.find_entities: mean of "
                      "its tokens' states + surprisal/entropy max, mean, first + log token "
                      "count + kind one-hot, standardised (states folded into the weights); "
                      "LBFGS on mean BCE + wd * ||w||^2" + (
                          "; an ensemble: each member (blocks of mean states and states of the "
                          "token before the entity, on the named layers) fitted alone, their "
                          "logits averaged into one linear head" if ensemble else ""),
            "weight_decay": span_fit.weight_decay, "weight_decays": decays,
            "train_loss": span_fit.train_loss, **probe.config, "layer_selection": table}
        comparison = _token_comparison(val_records, span_fit.val_span_auc)
    else:
        best, table = select_probe(train_records, val_records, layers,
                                   try_extras=not args.no_extras, epochs=args.epochs,
                                   lr=args.lr, seed=args.seed)
        probe = best.probe
        training = {"loss": "token BCE (entity weight 10) annealed into span-max BCE",
                    "epochs": args.epochs, "lr": args.lr, "batch_size": 8, "seed": args.seed,
                    "best_epoch_history": best.history, "layer_selection": table}
    threshold = calibrate(probe, val_records)
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
    manifest = json.loads((data_dir / "manifest.json").read_text(encoding="utf-8"))
    config = {
        "base_model": SMOLLM2_NAME,
        "hidden_size": probe.hidden_size,
        "data": {"builder": "python -m guardrail_entity_hallucination.training.data build",
                 "seed": manifest.get("seed"),
                 "sources": {name: {k: v for k, v in info.items() if k in ("version", "sha256")}
                             for name, info in manifest.get("sources", {}).items()}},
        "splits": split_sizes(features, data_dir),
        "own_answers": ({"builder": "python -m guardrail_entity_hallucination.training.data own",
                         "train_repeat": max(1, args.own_repeat)} if args.own else None),
        "training": training,
        **({"validation_comparison": comparison} if comparison is not None else {}),
        "calibration": threshold,
        "metrics": {split: {"all": r["all"]["probe"], **{
            key: {k: v["probe"] for k, v in r[key].items()}
            for key in ("by_kind", "by_subject_kind", "by_type") if key in r}}
            for split, r in results.items()},
        "seconds": {"features": round(t_features), "total": round(time.perf_counter() - t0)},
    }
    if isinstance(probe, EntitySpanProbe):
        weights = save_span_probe(probe, args.out, config)
    else:
        weights = save_entity_probe(probe, args.out, config)
    summary = {"weights": str(weights), "unit": probe.unit, "layer": probe.layer,
               "features": list(probe.features), "threshold": probe.threshold,
               "layer_selection": table,
               **({"validation_comparison": comparison} if comparison is not None else {}),
               "test": results["test"]["all"], "paired": results["paired"]["all"],
               **({"own-test": results["own-test"]["all"],
                   "own-test_within_type": results["own-test"].get("within_type")}
                  if "own-test" in results else {}),
               "seconds": config["seconds"]}
    if args.report is not None:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps({**summary, "results": results, "config": config},
                                          indent=2, default=_json_default) + "\n",
                               encoding="utf-8")
    print(json.dumps(summary, indent=2, default=_json_default))
    return 0


def _tag(split: str, limit: int | None, quick: bool) -> str:
    """The name under which a split's records are written and cached: ``quick`` for smoke runs;
    training and validation whole (``all``) or subsampled (``sub``); test and paired are always
    whole and keep the name ``sub`` (their feature caches predate ``all``)."""
    if quick:
        return "quick"
    return "all" if limit is None and split in ("train", "val") else "sub"


def _token_comparison(val: Sequence[CachedRecord], span_head_auc: float | None
                      ) -> dict[str, Any] | None:
    """Validation span AUC of the shipped token probe on the span head's validation records,
    with every token scored and with only the tokens of the monitor's entities scored (as the
    monitor scores it); None when it is missing or its layer is not cached."""
    if not TOKEN_WEIGHTS.exists() or not val:
        return None
    token = load_entity_probe(TOKEN_WEIGHTS)
    if token.layer not in val[0].hidden:
        return None

    def auc(scorer: TokenScorer) -> float | None:
        value = span_auc(val, scorer)
        return None if value is None else round(value, 4)

    every = auc(probe_scorer(token))
    entities = auc(entity_tokens_only(probe_scorer(token)))
    best = max((v for v in (every, entities) if v is not None), default=None)
    head = None if span_head_auc is None else round(span_head_auc, 4)
    return {"records": len(val), "span_head": head,
            "token_probe_all_tokens": every, "token_probe_entity_tokens": entities,
            "span_head_wins": span_head_auc is not None and best is not None
            and span_head_auc > best}


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


if __name__ == "__main__":
    raise SystemExit(main())
