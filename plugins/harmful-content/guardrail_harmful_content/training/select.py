"""Choose the harm head and its streaming rule by leave-one-source-out (LOSO) validation.

``python -m guardrail_harmful_content.training.select --pool POOL.jsonl --features DIR [--out DIR]``

The pool (``loso.pool_sample`` of a build, every record with its ``source_tag``) is read once by
the observer (``guardrail.toolkit.features`` cache, or the shards of a cut run). For every layer
set, fit (``--fits``: ridge, logistic), L2 strength (``--ridges``, ``--logistic-strengths``) and
pooling (``--halflives``: the prefix mean, ``none``, or exponentially weighted means with these
half-lives in tokens), ``pooled.fit_loso`` scores each record with the probe fitted without its
source. The count-k rule ``(threshold, k)`` is then chosen on these
out-of-source scores, one rule for every source: the candidate and rule with the best mean
macro-F1 over the sources that hold harmful records, among those whose false-halt rate is at most
``--max-false-halts`` on every capped source and whose mean share of a harmful answer read is at
most ``--max-read``. Capped: every benign-only source, and the benign records of the mixed
sources named by ``--capped`` prefixes (default the hand-written sets: topic-matched benign
answers whose labels are clean, where pyrit's "harmless" responses are often compliant answers
rated below 0.5). The in-split test figures are never looked at to choose anything.

Also reported, for the chosen candidate: a nested estimate (each source's rule chosen on the
other sources' out-of-source scores, then applied to it). With ``--out`` the chosen probe is
fitted on the whole pool and written as the plugin's weights (``pooled.to_dual_head``) with the
per-source figures in its JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from guardrail.toolkit.metrics import best_threshold, macro_f1, roc_auc

from .pooled import FITS, PoolRecord, fit_loso, fit_probe, to_dual_head

__all__ = ["KS", "THRESHOLDS", "candidate_name", "choose_rule", "halts", "load_parts",
           "load_pool", "main", "render", "source_metrics"]

# Fine steps above 0.9: a logistic fit's scores crowd there, and a coarse step lands the rule
# well inside a cap it could meet exactly.
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.905, 0.91, 0.915, 0.92, 0.925,
              0.93, 0.935, 0.94, 0.945, 0.95, 0.955, 0.96, 0.965, 0.97, 0.975, 0.98, 0.985,
              0.99, 0.995, 0.996, 0.997, 0.998, 0.9985, 0.999, 0.9995)
KS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 20, 24, 28, 32)


def halts(scores: Sequence[np.ndarray], thresholds: Sequence[float], ks: Sequence[int]
          ) -> np.ndarray:
    """``(records, thresholds, ks)`` halt index of the count-k rule (``-1``: no halt): the token
    at which the count of prefix scores ``>= t`` reaches ``k``, as ``count_k_halt``."""
    out = np.full((len(scores), len(thresholds), len(ks)), -1, dtype=np.int64)
    karr = np.asarray(ks)
    for i, s in enumerate(scores):
        for j, t in enumerate(thresholds):
            idx = np.flatnonzero(s >= t)
            ok = karr <= len(idx)
            out[i, j, ok] = idx[karr[ok] - 1]
    return out


def source_metrics(labels: np.ndarray, halt: np.ndarray, lengths: np.ndarray
                   ) -> dict[str, Any]:
    """macro-F1, recall, false-halt rate and mean share read (halted harmful answers) of one
    record set at one rule."""
    predicted = (halt >= 0).astype(int)
    out: dict[str, Any] = {"records": len(labels), "harmful": int(labels.sum())}
    benign = labels == 0
    out["false_halt_rate"] = float(predicted[benign].mean()) if benign.any() else None
    harmful = labels == 1
    if harmful.any():
        m = macro_f1(labels.tolist(), predicted.tolist())
        out["macro_f1"] = m["macro_f1"] if benign.any() else None
        out["recall"] = m["recall_1"]
        caught = harmful & (halt >= 0)
        out["fraction_seen"] = (float(((halt[caught] + 1) / lengths[caught]).mean())
                                if caught.any() else None)
    return out


CAPPED_MIXED = ("handwritten:",)


def _grid_summary(labels: np.ndarray, tags: np.ndarray, lengths: np.ndarray, table: np.ndarray,
                  max_false_halts: float, max_read: float,
                  capped: Sequence[str] = CAPPED_MIXED) -> dict[str, np.ndarray]:
    """Per rule in the grid: mean macro-F1 over harmful sources, the worst capped source's
    false-halt rate (benign-only sources, and the benign records of sources whose tag starts
    with one of ``capped``), pooled fraction read and pooled macro-F1."""
    _, nt, nk = table.shape
    harmful_tags = sorted({t for t, y in zip(tags, labels, strict=True) if y == 1})
    benign_tags = sorted(set(tags) - set(harmful_tags)) + [
        t for t in harmful_tags if t.startswith(tuple(capped))]
    mean_f1 = np.zeros((nt, nk))
    worst_fhr = np.zeros((nt, nk))
    read = np.ones((nt, nk))
    pooled = np.zeros((nt, nk))
    fired = table >= 0
    for tag in harmful_tags:
        sel = tags == tag
        y = labels[sel]
        f = fired[sel]
        tp = (f & (y == 1)[:, None, None]).sum(0)
        fp = (f & (y == 0)[:, None, None]).sum(0)
        fn = (~f & (y == 1)[:, None, None]).sum(0)
        tn = (~f & (y == 0)[:, None, None]).sum(0)
        mean_f1 += (_f1(tp, fp, fn) + _f1(tn, fn, fp)) / 2
    mean_f1 /= max(1, len(harmful_tags))
    for tag in benign_tags:
        sel = (tags == tag) & (labels == 0)
        if sel.any():
            worst_fhr = np.maximum(worst_fhr, fired[sel].mean(0))
    y = labels == 1
    tp = (fired & y[:, None, None]).sum(0)
    fp = (fired & ~y[:, None, None]).sum(0)
    fn = (~fired & y[:, None, None]).sum(0)
    tn = (~fired & ~y[:, None, None]).sum(0)
    pooled = (_f1(tp, fp, fn) + _f1(tn, fn, fp)) / 2
    share = np.where(fired & y[:, None, None], (table + 1) / lengths[:, None, None], 0.0)
    caught = (fired & y[:, None, None]).sum(0)
    read = np.where(caught > 0, share.sum(0) / np.maximum(caught, 1), 1.0)
    ok = (worst_fhr <= max_false_halts) & (read <= max_read)
    return {"mean_f1": mean_f1, "worst_fhr": worst_fhr, "read": read, "pooled": pooled, "ok": ok}


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    p = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0)
    r = np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1), 0.0)
    return np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-12), 0.0)


def choose_rule(summary: Mapping[str, np.ndarray]) -> tuple[int, int, bool]:
    """Grid indices ``(threshold, k)`` of the best rule: the best mean harmful-source macro-F1
    among rules within the caps (ties: pooled macro-F1, then less read); with none within the
    caps, the fewest worst-source false halts."""
    ok = summary["ok"]
    if ok.any():
        key = np.where(ok, summary["mean_f1"] + 1e-6 * summary["pooled"]
                       - 1e-9 * summary["read"], -np.inf)
        j, k = np.unravel_index(int(np.argmax(key)), key.shape)
        return int(j), int(k), True
    key = -summary["worst_fhr"] + 1e-6 * summary["mean_f1"]
    j, k = np.unravel_index(int(np.argmax(key)), key.shape)
    return int(j), int(k), False


def per_source(labels: np.ndarray, tags: np.ndarray, lengths: np.ndarray, halt: np.ndarray,
               scores: Sequence[np.ndarray]) -> dict[str, Any]:
    """Figures of every source tag and of the pool at one rule (``halt``: ``(records,)``)."""
    out: dict[str, Any] = {}
    for tag in sorted(set(tags)):
        sel = tags == tag
        out[tag] = source_metrics(labels[sel], halt[sel], lengths[sel])
        if 0 < labels[sel].sum() < sel.sum():
            out[tag]["auc"] = roc_auc(labels[sel].tolist(),
                                      [float(scores[int(i)].max()) for i in np.flatnonzero(sel)])
    out["pool"] = source_metrics(labels, halt, lengths)
    out["pool"]["auc"] = roc_auc(labels.tolist(), [float(s.max()) for s in scores])
    return out


def in_split(records: Sequence[PoolRecord], chosen: Mapping[str, Any]) -> dict[str, Any]:
    """The build's own split, for comparison only (never for choosing): the chosen probe fitted
    on the pool's train and val records, scored on its test records at the chosen rule."""
    train = [r for r in records if r.split in ("train", "val")]
    test = [r for r in records if r.split == "test"]
    if not train or not test:
        return {}
    probe = fit_probe(train, chosen["layers"], chosen["ridge"], chosen.get("halflife"),
                      chosen.get("fit", "ridge"), chosen.get("upweight"))
    scores = [probe.prefix_scores(r) for r in test]
    table = halts(scores, (chosen["threshold"],), (chosen["k"],))[:, 0, 0]
    return per_source(np.asarray([r.label for r in test]), np.asarray([r.tag for r in test]),
                      np.asarray([len(r) for r in test]), table, scores)


def nested(labels: np.ndarray, tags: np.ndarray, lengths: np.ndarray, table: np.ndarray,
           max_false_halts: float, max_read: float,
           capped: Sequence[str] = CAPPED_MIXED) -> np.ndarray:
    """Each source's halts under the rule chosen on the other sources' scores."""
    out = np.full(len(labels), -1, dtype=np.int64)
    for tag in sorted(set(tags)):
        rest = tags != tag
        summary = _grid_summary(labels[rest], tags[rest], lengths[rest], table[rest],
                                max_false_halts, max_read, capped)
        j, k, _ = choose_rule(summary)
        out[tags == tag] = table[tags == tag, j, k]
    return out


def load_pool(pool: Path, features: Path, layers: Sequence[int]) -> list[PoolRecord]:
    """The pool's records with their cached states: a finished ``extract_features`` folder, or
    the shards a cut run left (the records of whole shards only)."""
    from safetensors.numpy import load_file

    from guardrail.toolkit.features import token_labels
    from guardrail.toolkit.records import SpanLabel

    rows = [json.loads(x) for x in pool.read_text(encoding="utf-8").splitlines() if x.strip()]
    out: list[PoolRecord] = []
    for shard in sorted(features.glob("shard-*.safetensors")):
        tensors = load_file(str(shard))
        indices = sorted({int(k.split("/")[0]) for k in tensors})
        for i in indices:
            if i >= len(rows):  # a run over a longer file: its tail is another part's
                continue
            row = rows[i]
            hidden = {layer: tensors[f"{i}/hidden.{layer}"] for layer in layers}
            if next(iter(hidden.values())).shape[0] == 0:
                continue
            first = None
            if int(row["label"]) == 1:
                spans = [SpanLabel(int(s["start"]), int(s["end"]), int(s.get("label", 1)))
                         for s in row.get("spans") or []]
                labs = token_labels(tensors[f"{i}/offsets"].tolist(), spans)
                first = next((j for j, v in enumerate(labs) if v == 1), 0)
            out.append(PoolRecord(str(row["source_tag"]), int(row["label"]), hidden, first,
                                  str(row.get("split", "")), str(row.get("kind", "")),
                                  {"index": i, "key": (str(row["prompt"]), str(row["response"])),
                                   "offsets": tensors[f"{i}/offsets"]}))
    return out


def reconcile(records: Sequence[PoolRecord], build: Path) -> list[PoolRecord]:
    """The records of ``records`` that ``build`` holds (a pool part read before a source's file
    was final can hold answers since dropped or edited), each with its split in ``build``; a
    record cut for the pool is found by its response's opening. A record the build relabelled
    (``data/relabel.py``) takes the build's label, its first harmful token from the build's
    spans. Records of a source the build does not hold at all (a set read as a part of its
    own) are kept as they are."""
    from guardrail.toolkit.features import token_labels
    from guardrail.toolkit.records import SpanLabel

    from .loso import read_pool_records

    where: dict[tuple[str, str], tuple[str, str, int]] = {}
    relabelled: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in read_pool_records(build):
        where[(row["prompt"], row["response"])] = (row["split"], row["source_tag"],
                                                   int(row["label"]))
        if row.get("relabel"):
            relabelled[(row["prompt"], row["response"])] = list(row.get("spans") or [])
    by_prompt: dict[str, list[tuple[str, tuple[str, str, int]]]] = {}
    for (prompt, response), value in where.items():
        by_prompt.setdefault(prompt, []).append((response, value))
    tags = {v[1] for v in where.values()}
    out = []
    for r in records:
        if r.tag not in tags:
            out.append(r)
            continue
        prompt, response = r.extra["key"]
        full: str | None = response if (prompt, response) in where else next(
            (f for f, _ in by_prompt.get(prompt, []) if f.startswith(response)), None)
        found = None if full is None else where[(prompt, full)]
        if found is None or found[1] != r.tag:
            continue
        if found[2] != r.label:
            assert full is not None
            if (prompt, full) not in relabelled or "offsets" not in r.extra:
                continue
            r.label = found[2]
            r.first_harm = None
            if r.label == 1:
                spans = [SpanLabel(int(s["start"]), int(s["end"]), 1)
                         for s in relabelled[(prompt, full)]]
                labs = token_labels(np.asarray(r.extra["offsets"]).tolist(), spans)
                r.first_harm = next((j for j, v in enumerate(labs) if v == 1), 0)
        r.split = found[0]
        out.append(r)
    return out


def extract(pool: Path, layers: Sequence[int]) -> Path:
    """Read a pool part with the embedded SmolLM2 once (``extract_features`` cache); the
    cache folder."""
    from guardrail.toolkit.features import extract_features
    from guardrail.toolkit.sources import cache_dir

    from .train import load_observer

    work = cache_dir() / "harmful-content" / "features"
    found = extract_features(load_observer(None), pool, work, layers, dtype="float16",
                             chunk_size=512)
    if found.path is None:
        raise FileNotFoundError(f"no feature cache for {pool} in {work}")
    return found.path


def load_parts(pools: Sequence[Path], features: Sequence[Path], layers: Sequence[int]
               ) -> list[PoolRecord]:
    """``load_pool`` of each (pool part, feature folder) pair, concatenated."""
    return [r for pool, folder in zip(pools, features, strict=True)
            for r in load_pool(pool, folder, layers)]


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(records: Sequence[PoolRecord], layers: Sequence[int], ridges: Sequence[float],
        max_false_halts: float, max_read: float,
        halflives: Sequence[float | None] = (None,), capped: Sequence[str] = CAPPED_MIXED,
        progress: bool = False, layer_sets: Sequence[Sequence[int]] | None = None,
        fits: Sequence[str] = ("ridge",),
        strengths: Mapping[str, Sequence[float]] | None = None,
        upweights: Sequence[float] = (1.0,), upweight_prefix: str = "handwritten:"
        ) -> dict[str, Any]:
    """The LOSO selection over ``layer_sets`` (default: each layer of ``layers``, every pair and
    all of them together), at every ridge strength and pooling half-life (None: the prefix
    mean), for each fit in ``fits`` (ridge, logistic; ``strengths`` gives a fit its own L2
    strengths instead of ``ridges``) and each factor in ``upweights`` on the cells of the tags
    that start with ``upweight_prefix`` (``pooled.row_matrix``)."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    if layer_sets is None:
        layer_sets = [(layer,) for layer in layers] + [
            s for n in (2, len(layers)) if 1 < n <= len(layers)
            for s in itertools.combinations(layers, n)]
    layer_sets = list(dict.fromkeys(tuple(s) for s in layer_sets))
    if any(layer not in layers for s in layer_sets for layer in s):
        raise ValueError(f"layer sets {layer_sets} use layers outside {list(layers)}")
    n_tags = len({r.tag for r in records})
    bar = tqdm(total=n_tags * len(halflives) * len(fits) * len(upweights), desc="LOSO folds",
               unit="fold", disable=not progress)
    Key = tuple[tuple[int, ...], float, float | None, str, float]
    scored: dict[Key, list[np.ndarray]] = {}
    for factor in upweights:
        for fit in fits:
            for halflife in halflives:
                for (layer_set, lam), scores in fit_loso(
                        records, layers, layer_sets, (strengths or {}).get(fit, ridges),
                        halflife=halflife, progress=lambda t: bar.update(1), fit=fit,
                        upweight={upweight_prefix: factor}).items():
                    scored[(layer_set, lam, halflife, fit, factor)] = scores
    bar.close()
    labels = np.asarray([r.label for r in records])
    tags = np.asarray([r.tag for r in records])
    lengths = np.asarray([len(r) for r in records])
    candidates: list[dict[str, Any]] = []
    by_candidate: dict[str, Any] = {}
    tables: dict[Key, np.ndarray] = {}
    for (layer_set, lam, halflife, fit, factor), scores in tqdm(
            scored.items(), desc="rules", unit="head", disable=not progress):
        table = halts(scores, THRESHOLDS, KS)
        summary = _grid_summary(labels, tags, lengths, table, max_false_halts, max_read, capped)
        j, k, met = choose_rule(summary)
        tables[(layer_set, lam, halflife, fit, factor)] = table
        candidates.append({"layers": list(layer_set), "ridge": lam, "halflife": halflife,
                           "fit": fit,
                           "upweight": {} if factor == 1 else {upweight_prefix: factor},
                           "threshold": THRESHOLDS[j],
                           "k": KS[k], "constraint_met": met,
                           "mean_harmful_source_macro_f1": float(summary["mean_f1"][j, k]),
                           "worst_benign_source_false_halt_rate":
                               float(summary["worst_fhr"][j, k]),
                           "pool_macro_f1": float(summary["pooled"][j, k]),
                           "fraction_seen": float(summary["read"][j, k])})
        by_candidate[candidate_name(candidates[-1])] = per_source(
            labels, tags, lengths, table[:, j, k], scores)
        if not progress:
            _say(json.dumps(candidates[-1]))
    best = max(candidates, key=lambda c: (c["constraint_met"],
                                          c["mean_harmful_source_macro_f1"]
                                          if c["constraint_met"]
                                          else -c["worst_benign_source_false_halt_rate"],
                                          -len(c["layers"])))
    key = (tuple(best["layers"]), float(best["ridge"]), best["halflife"], best["fit"],
           float(next(iter(best["upweight"].values()), 1.0)))
    table = tables[key]
    j, k = THRESHOLDS.index(best["threshold"]), KS.index(best["k"])
    # full detection (the last token's score only), thresholded on the same out-of-source scores
    best["full_detection_threshold"] = best_threshold(
        labels.tolist(), [float(s[-1]) for s in scored[key]])[0]
    return {
        "chosen": best,
        "candidates": candidates,
        "loso_by_candidate": by_candidate,
        "loso": per_source(labels, tags, lengths, table[:, j, k], scored[key]),
        "loso_nested": per_source(labels, tags, lengths,
                                  nested(labels, tags, lengths, table, max_false_halts, max_read,
                                         capped),
                                  scored[key]),
        "caps": {"max_false_halt_rate_per_benign_source": max_false_halts,
                 "max_fraction_seen": max_read,
                 "capped_mixed_sources": list(capped)},
        "grid": {"thresholds": list(THRESHOLDS), "ks": list(KS), "ridges": list(ridges),
                 "strengths": {f: list((strengths or {}).get(f, ridges)) for f in fits},
                 "upweights": list(upweights), "upweight_prefix": upweight_prefix,
                 "halflives": list(halflives), "fits": list(fits),
                 "layer_sets": [list(s) for s in layer_sets]},
        "pool": {"records": len(records), "sources": {t: int((tags == t).sum())
                                                      for t in sorted(set(tags))}},
        "seconds": round(time.perf_counter() - t0, 1),
    }


def candidate_name(candidate: Mapping[str, Any]) -> str:
    """``fit L2 half-life layers``, e.g. ``logistic 100 hl12 6,9,12,15``."""
    hl = candidate.get("halflife")
    up = "".join(f" {p}x{w:g}" for p, w in (candidate.get("upweight") or {}).items())
    return (f"{candidate.get('fit', 'ridge')} {candidate['ridge']:g} "
            f"{'mean' if hl is None else f'hl{hl:g}'} "
            f"{','.join(str(x) for x in candidate['layers'])}{up}")


def _f(x: Any) -> str:
    return "-" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)


def render(per: Mapping[str, Any], other: Mapping[str, Any] | None = None,
           names: tuple[str, str] = ("pooled probe", "shipped recipe")) -> str:
    """A markdown table of per-source figures (``per_source`` of a report), with a second
    head's figures beside them when ``other`` is given."""
    heads = [names[0]] + ([names[1]] if other is not None else [])
    cols = " | ".join(f"{h}: AUC | {h}: macro-F1 | {h}: false halts | {h}: read"
                      for h in heads)
    lines = [f"| source | records (harmful) | {cols} |",
             "|---|---|" + "---|" * (4 * len(heads))]
    for tag in sorted(per, key=lambda t: (t == "pool", t)):
        row = [tag, f"{per[tag]['records']} ({per[tag]['harmful']})"]
        for fig in [per[tag]] + ([other.get(tag) or {}] if other is not None else []):
            row += [_f(fig.get("auc")), _f(fig.get("macro_f1")), _f(fig.get("false_halt_rate")),
                    _f(fig.get("fraction_seen"))]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m guardrail_harmful_content.training.select")
    parser.add_argument("--pool", type=Path, nargs="+", required=True,
                        help="pool JSON Lines (several: parts read by separate runs)")
    parser.add_argument("--features", type=Path, nargs="+", default=None,
                        help="feature cache folder of each --pool part, in the same order "
                             "(default: read the parts with SmolLM2 into the guardrail cache)")
    parser.add_argument("--layers", type=int, nargs="+", default=[6, 9, 12, 15])
    parser.add_argument("--ridges", type=float, nargs="+", default=[0.01, 0.1, 1.0, 10.0],
                        help="L2 strengths (of each --fits)")
    parser.add_argument("--fits", nargs="+", choices=FITS, default=["ridge"],
                        help="ridge (closed form, Platt-scaled) and/or logistic")
    parser.add_argument("--upweights", nargs="+", type=float, default=[1.0],
                        help="factors on the (source, label) cells of the tags that start with "
                             "--upweight-prefix (each tried; 1: every cell weighs the same)")
    parser.add_argument("--upweight-prefix", default="handwritten:")
    parser.add_argument("--logistic-strengths", type=float, nargs="+", default=None,
                        help="L2 strengths of the logistic fit (default: --ridges)")
    parser.add_argument("--halflives", nargs="+", default=["none"],
                        help="pooling half-lives in tokens ('none': the prefix mean)")
    parser.add_argument("--capped", nargs="*", default=list(CAPPED_MIXED),
                        help="tag prefixes of mixed sources whose benign records are capped too")
    parser.add_argument("--layer-sets", nargs="+", default=None, metavar="L,L",
                        help="layer sets to try, e.g. 12 9,12,15 (default: each layer of "
                             "--layers, every pair and all together)")
    parser.add_argument("--build", type=Path, default=None,
                        help="keep only the pool records this data build holds, with its splits")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--max-false-halts", type=float, default=0.05)
    parser.add_argument("--max-read", type=float, default=0.5)
    parser.add_argument("--report", type=Path, required=True, help="JSON report to write")
    parser.add_argument("--out", type=Path, default=None,
                        help="also fit the chosen probe on the whole pool and write weights here")
    args = parser.parse_args(argv)
    if args.features is None:
        args.features = [extract(part, args.layers) for part in args.pool]
    if len(args.pool) != len(args.features):
        parser.error("--pool and --features need the same number of paths")
    records = load_parts(args.pool, args.features, args.layers)
    if args.build is not None:
        records = reconcile(records, args.build)
    if not records:
        print(f"error: {args.features}: no feature shards", file=sys.stderr)
        return 2
    _say(f"{len(records)} records")
    halflives = [None if h == "none" else float(h) for h in args.halflives]
    layer_sets = (None if args.layer_sets is None
                  else [[int(x) for x in s.split(",")] for s in args.layer_sets])
    report = run(records, args.layers, args.ridges, args.max_false_halts, args.max_read,
                 halflives, args.capped, progress=not args.quiet, layer_sets=layer_sets,
                 fits=args.fits, upweights=args.upweights,
                 upweight_prefix=args.upweight_prefix,
                 strengths=({"logistic": args.logistic_strengths}
                            if args.logistic_strengths else None))
    report["in_split"] = in_split(records, report["chosen"])
    args.report.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if args.out is not None:
        save_chosen(records, report, args.out)
    print(json.dumps({"chosen": report["chosen"], "pool": report["loso"]["pool"]}))
    return 0


def save_chosen(records: Sequence[PoolRecord], report: Mapping[str, Any], out: Path) -> Path:
    """Fit the chosen probe on every record of the pool and save it as the plugin's weights."""
    from guardrail.probes.io import save_probe

    from .train import NAME

    chosen = report["chosen"]
    probe = fit_probe(records, chosen["layers"], chosen["ridge"], chosen.get("halflife"),
                      chosen.get("fit", "ridge"), chosen.get("upweight"))
    hidden_size = int(next(iter(records[0].hidden.values())).shape[1])
    head = to_dual_head(probe, hidden_size)
    config = {
        "base_model": "smollm2-135m",
        "layer": chosen["layers"][0],
        "layers": chosen["layers"],
        "pooling": "prefix_mean" if probe.halflife is None else "prefix_ema",
        **({} if probe.halflife is None else {"halflife": probe.halflife}),
        "dims": {"hidden_size": hidden_size, "input_size": head.hidden_size,
                 "observer_layers": 30},
        "threshold": chosen["threshold"],
        "rule": {"kind": "count", "k": chosen["k"]},
        "full_detection_threshold": chosen["full_detection_threshold"],
        "method": {"head": "linear probe on the pooled prefix of the layers' states "
                           "(mean, or exponentially weighted mean with 'halflife'): ridge on "
                           "standardised rows, Platt-scaled, or L2 logistic regression "
                           "('fit'; pooled.py); a one-unit MLP in the file carries its bias "
                           "(pooled.to_dual_head)",
                   "fit": probe.fit, "ridge": chosen["ridge"],
                   "upweight": chosen.get("upweight") or {},
                   "platt": {"a": probe.a, "c": probe.c},
                   "selection": "leave-one-source-out (select.py)"},
        "calibration": {"objective": "mean macro-F1 over held-out harmful sources",
                        "split": "leave-one-source-out", **report["caps"]},
        "metrics": {"in_split_test": report.get("in_split") or None},
        "loso": {"chosen": chosen, "per_source": report["loso"],
                 "nested": report["loso_nested"], "pool": report["pool"]},
    }
    return save_probe(out, head, config, name=NAME)


if __name__ == "__main__":
    raise SystemExit(main())
