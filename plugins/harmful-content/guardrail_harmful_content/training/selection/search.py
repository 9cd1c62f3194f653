"""Stage 3: out-of-source scores for every candidate (layer set, fit, L2 strength, pooling
half-life, up-weight, prompt term), the best rule of each, and the chosen candidate with its
report."""

from __future__ import annotations

import itertools
import json
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from guardrail.toolkit.metrics import best_threshold

from ..pooled import HalfLife, PoolRecord, fit_loso
from .record import candidate_name, per_source
from .rule import (
    CAPPED_MIXED,
    KS,
    THRESHOLDS,
    choose_rule,
    family_halts,
    grid_summary,
    nested,
    rule_of,
)

__all__ = ["Family", "Key", "layer_sets_of", "pick", "rule_candidates", "run",
           "score_candidates"]

# (layer set, L2 strength, half-life, fit, up-weight factor, prompt term's scale or None)
Key = tuple[tuple[int, ...], float, HalfLife, str, float, float | None]
# (rule family, its parameter): ("count", None), ("ema", half-life), ("cusum", None)
Family = tuple[str, float | None]


def layer_sets_of(layers: Sequence[int], layer_sets: Sequence[Sequence[int]] | None
                  ) -> list[tuple[int, ...]]:
    """``layer_sets`` (default: each layer of ``layers``, every pair and all together), each
    once, checked against ``layers``."""
    if layer_sets is None:
        layer_sets = [(layer,) for layer in layers] + [
            s for n in (2, len(layers)) if 1 < n <= len(layers)
            for s in itertools.combinations(layers, n)]
    out = list(dict.fromkeys(tuple(s) for s in layer_sets))
    if any(layer not in layers for s in out for layer in s):
        raise ValueError(f"layer sets {out} use layers outside {list(layers)}")
    return out


def score_candidates(records: Sequence[PoolRecord], layers: Sequence[int],
                     layer_sets: Sequence[tuple[int, ...]],
                     strengths: Mapping[str, Sequence[float]],
                     halflives: Sequence[HalfLife], upweights: Sequence[float],
                     upweight_prefix: str, progress: bool,
                     prompt_scales: Sequence[float | None] = (None,),
                     turn_rows: Sequence[int] = ()) -> dict[Key, list[np.ndarray]]:
    """Every record's out-of-source prefix scores (``pooled.fit_loso``) under every candidate;
    ``strengths`` maps each fit to its L2 strengths; ``prompt_scales``: a head per scale of a
    prompt term (None: none); ``turn_rows``: ``pooled.row_matrix``'s, for every head."""
    from tqdm import tqdm

    n_tags = len({r.tag for r in records})
    bar = tqdm(total=n_tags * len(halflives) * len(strengths) * len(upweights)
               * len(prompt_scales), desc="LOSO folds", unit="fold", disable=not progress)
    scored: dict[Key, list[np.ndarray]] = {}
    for factor in upweights:
        for fit, lams in strengths.items():
            for halflife in halflives:
                for scale in prompt_scales:
                    for (layer_set, lam), scores in fit_loso(
                            records, layers, layer_sets, lams, halflife=halflife,
                            progress=lambda t: bar.update(1), fit=fit,
                            upweight={upweight_prefix: factor}, prompt_scale=scale,
                            turn_rows=turn_rows).items():
                        scored[(layer_set, lam, halflife, fit, factor, scale)] = scores
    bar.close()
    return scored


def _candidate(key: Key, family: Family, summary: Mapping[str, np.ndarray], j: int, k: int,
               met: bool, upweight_prefix: str) -> dict[str, Any]:
    layer_set, lam, halflife, fit, factor, scale = key
    rule = rule_of(family[0], family[1], j, k)
    extra: dict[str, Any] = {} if family[0] == "count" else {
        "rule_family": family[0], "score_transform": rule["score_transform"]}
    if "height" in rule:  # cusum: the evidence its threshold stands for
        extra["height"] = rule["height"]
    if scale is not None:
        extra["prompt_scale"] = scale
    groups = {name[6:]: float(v[j, k]) for name, v in summary.items()
              if name.startswith("group:")}
    if groups:
        extra["group_false_halt_rates"] = groups
    return {"layers": list(layer_set), "ridge": lam, "halflife": halflife, "fit": fit,
            "upweight": {} if factor == 1 else {upweight_prefix: factor},
            "threshold": rule["threshold"], "k": rule["k"], **extra, "constraint_met": met,
            "mean_harmful_source_macro_f1": float(summary["mean_f1"][j, k]),
            "worst_benign_source_false_halt_rate": float(summary["worst_fhr"][j, k]),
            "pool_macro_f1": float(summary["pooled"][j, k]),
            "fraction_seen": float(summary["read"][j, k])}


def rule_candidates(scored: Mapping[Key, list[np.ndarray]], labels: np.ndarray,
                    tags: np.ndarray, lengths: np.ndarray, max_false_halts: float,
                    max_read: float, capped: Sequence[str], upweight_prefix: str,
                    progress: bool, families: Sequence[Family] = (("count", None),),
                    objective: Sequence[str] | None = None,
                    groups: Mapping[str, np.ndarray] | None = None
                    ) -> tuple[list[dict[str, Any]], dict[str, Any],
                               dict[str, tuple[Key, np.ndarray, int, int]]]:
    """Each (head, rule family) candidate with its best rule under the caps (``groups``: capped
    groups of records, ``rule.grid_summary``); its per-source figures by name; by name, its
    head's key, its halt table over the family's grid and the chosen rule's grid indices."""
    from tqdm import tqdm

    candidates: list[dict[str, Any]] = []
    by_candidate: dict[str, Any] = {}
    tables: dict[str, tuple[Key, np.ndarray, int, int]] = {}
    for key, scores in tqdm(scored.items(), desc="rules", unit="head", disable=not progress):
        for family in families:
            table = family_halts(scores, family[0], family[1])
            summary = grid_summary(labels, tags, lengths, table, max_false_halts, max_read,
                                   capped, objective, groups)
            j, k, met = choose_rule(summary)
            candidates.append(_candidate(key, family, summary, j, k, met, upweight_prefix))
            name = candidate_name(candidates[-1])
            tables[name] = (key, table, j, k)
            by_candidate[name] = per_source(labels, tags, lengths, table[:, j, k], scores)
            if not progress:
                print(json.dumps(candidates[-1]), file=sys.stderr, flush=True)
    return candidates, by_candidate, tables


def pick(candidates: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The best candidate within the caps (mean harmful-source macro-F1; else the fewest
    worst-source false halts; ties: fewer layers, then the plain count rule)."""
    return max(candidates, key=lambda c: (c["constraint_met"],
                                          c["mean_harmful_source_macro_f1"]
                                          if c["constraint_met"]
                                          else -c["worst_benign_source_false_halt_rate"],
                                          -len(c["layers"]), "rule_family" not in c))


def _caps(max_false_halts: float, max_read: float, capped: Sequence[str],
          objective: Sequence[str] | None, groups: Mapping[str, np.ndarray] | None
          ) -> dict[str, Any]:
    """The caps and the objective the selection ran under, as the report records them."""
    return {"max_false_halt_rate_per_benign_source": max_false_halts,
            "max_fraction_seen": max_read, "capped_mixed_sources": list(capped),
            **({} if objective is None else {"objective_sources": list(objective)}),
            **({} if not groups else {"capped_groups": {
                k: int(v.sum()) for k, v in groups.items()}})}


def _grid_axes(upweights: Sequence[float], upweight_prefix: str,
               halflives: Sequence[HalfLife], fits: Sequence[str],
               prompt_scales: Sequence[float | None], turn_rows: Sequence[int]
               ) -> dict[str, Any]:
    """The head settings a selection ran over, as the report's ``grid`` records them."""
    return {"upweights": list(upweights), "upweight_prefix": upweight_prefix,
            "halflives": list(halflives), "fits": list(fits),
            "prompt_scales": list(prompt_scales), "turn_rows": list(turn_rows)}


def run(records: Sequence[PoolRecord], layers: Sequence[int], ridges: Sequence[float],
        max_false_halts: float, max_read: float,
        halflives: Sequence[HalfLife] = (None,), capped: Sequence[str] = CAPPED_MIXED,
        progress: bool = False, layer_sets: Sequence[Sequence[int]] | None = None,
        fits: Sequence[str] = ("ridge",),
        strengths: Mapping[str, Sequence[float]] | None = None,
        upweights: Sequence[float] = (1.0,), upweight_prefix: str = "handwritten:",
        families: Sequence[Family] = (("count", None),),
        objective: Sequence[str] | None = None,
        prompt_scales: Sequence[float | None] = (None,),
        groups: Mapping[str, np.ndarray] | None = None,
        turn_rows: Sequence[int] = ()) -> dict[str, Any]:
    """The LOSO selection over ``layer_sets`` (``layer_sets_of``), at every ridge strength and
    pooling half-life (None: the prefix mean), for each fit in ``fits`` (ridge, logistic;
    ``strengths`` gives a fit its own L2 strengths instead of ``ridges``) and each factor in
    ``upweights`` on the cells of the tags that start with ``upweight_prefix``
    (``pooled.row_matrix``). Each head is tried with each rule family in ``families``
    (``rule.FAMILIES``: the count rule on its scores, or on their ``evidence.py`` transform).
    ``objective`` names the harmful sources the mean macro-F1 runs over (default: every one in
    the pool; the caps always cover every capped source). ``prompt_scales``: each head also
    with a prompt term at each scale (``pooled.fit_loso``; None: without); ``groups``: record
    groups capped like sources (``groups.harmful_prompt_groups``); ``turn_rows``: rows after a
    harmful record's first harmful token for every head (``pooled.row_matrix``)."""
    t0 = time.perf_counter()
    sets = layer_sets_of(layers, layer_sets)
    lams = {f: (strengths or {}).get(f, ridges) for f in fits}
    scored = score_candidates(records, layers, sets, lams, halflives, upweights,
                              upweight_prefix, progress, prompt_scales, turn_rows)
    labels = np.asarray([r.label for r in records])
    tags = np.asarray([r.tag for r in records])
    lengths = np.asarray([len(r) for r in records])
    candidates, by_candidate, tables = rule_candidates(
        scored, labels, tags, lengths, max_false_halts, max_read, capped, upweight_prefix,
        progress, families, objective, groups)
    for candidate in candidates if turn_rows else ():
        candidate["turn_rows"] = list(turn_rows)
    best = pick(candidates)
    key, table, j, k = tables[candidate_name(best)]
    # full detection (the last token's score only), thresholded on the same out-of-source scores
    best["full_detection_threshold"] = best_threshold(
        labels.tolist(), [float(s[-1]) for s in scored[key]])[0]
    halt_nested = nested(labels, tags, lengths, table, max_false_halts, max_read, capped,
                         objective, groups)
    return {
        "chosen": best,
        "candidates": candidates,
        "loso_by_candidate": by_candidate,
        "loso": per_source(labels, tags, lengths, table[:, j, k], scored[key]),
        "loso_nested": per_source(labels, tags, lengths, halt_nested, scored[key]),
        "caps": _caps(max_false_halts, max_read, capped, objective, groups),
        "grid": {"thresholds": list(THRESHOLDS), "ks": list(KS),
                 "families": [list(f) for f in families], "ridges": list(ridges),
                 "strengths": {f: list(v) for f, v in lams.items()}, **_grid_axes(
                     upweights, upweight_prefix, halflives, fits, prompt_scales, turn_rows),
                 "layer_sets": [list(s) for s in sets]},
        "pool": {"records": len(records), "sources": {t: int((tags == t).sum())
                                                      for t in sorted(set(tags))}},
        "seconds": round(time.perf_counter() - t0, 1),
    }
