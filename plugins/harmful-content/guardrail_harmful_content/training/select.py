"""Choose the harm head and its streaming rule by leave-one-source-out (LOSO) validation.

``python -m guardrail_harmful_content.training.select --pool POOL.jsonl --features DIR [--out DIR]``

The pool (``loso.pool_sample`` of a build, every record with its ``source_tag``) is read once by
the observer (``guardrail.toolkit.features`` cache, or the shards of a cut run). For every layer
set, fit (``--fits``: ridge, logistic), L2 strength (``--ridges``, ``--logistic-strengths``) and
pooling (``--halflives``: the prefix mean, ``none``, or exponentially weighted means with these
half-lives in tokens; ``4,32``: two side by side), ``pooled.fit_loso`` scores each record with the
probe fitted without its source. ``--token-norm rms`` normalises every token's state of every layer
first (``pooling.normalise_tokens``; written into the weights for the monitor). The count-k rule
``(threshold, k)`` is then chosen on these out-of-source scores, one rule for every source: the
candidate and rule with the best mean macro-F1 over the sources that hold harmful records, among
those whose false-halt rate is at most ``--max-false-halts`` on every capped source and whose mean
share of a harmful answer read is at most ``--max-read``. Capped: every benign-only source, and the
benign records of the mixed sources named by ``--capped`` prefixes (default the hand-written sets:
topic-matched benign answers whose labels are clean, where pyrit's "harmless" responses are often
compliant answers rated below 0.5). The in-split test figures are never looked at to choose
anything.
``--rule-families`` tries each head with other streaming rule families too (``count``;
``ema:H``, the count rule on the weighted mean of the prefix scores, half-life ``H`` tokens;
``cusum``, cumulative evidence above a drift; ``evidence.py``): the family the best candidate
uses is written into its weights (``score_transform``) and the monitor applies it.
``--objective-sources`` restricts the mean macro-F1 to the harmful sources named (a pass that
adds sources compares pools on the previous pool's sources); the caps still cover every capped
source. ``--prompt-features CACHE`` (``context.py``'s cache of the pool's prompt states) tries
each head with a prompt term at each ``--prompt-scales`` (the eighth and ninth passes; with
``--out`` the term is written into the weights), and ``--cap-harmful-prompts`` adds the ninth
pass's cap: false halts at most ``--max-false-halts`` on each of two pooled groups of the capped
sets' benign answers to harmful-sounding prompts (``selection/groups.py``).

Also reported, for the chosen candidate: a nested estimate (each source's rule chosen on the
other sources' out-of-source scores, then applied to it). With ``--out`` the chosen probe is
fitted on the whole pool and written as the plugin's weights (``pooled.to_dual_head``) with the
per-source figures in its JSON.

The stages live in ``selection/``: ``features`` (cached states), ``data`` (the build's labels
and splits), ``search`` (candidates), ``rule`` (the count-k rule) and ``record`` (figures,
weights); this module is the command line and re-exports their public names.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from ..pooling import TOKEN_NORMS, halflives_of
from .context import attach_prompt_states, load_prompt_states
from .pooled import FITS, HalfLife
from .selection.data import reconcile
from .selection.features import extract, load_parts, load_pool, normalise_records
from .selection.groups import harmful_prompt_groups
from .selection.record import (
    candidate_name,
    in_split,
    per_source,
    render,
    save_chosen,
    source_metrics,
)
from .selection.rule import CAPPED_MIXED, KS, THRESHOLDS, choose_rule, grid_summary, halts, nested
from .selection.search import run

__all__ = ["CAPPED_MIXED", "KS", "THRESHOLDS", "candidate_name", "choose_rule", "extract",
           "grid_summary", "halts", "in_split", "load_parts", "load_pool", "main", "nested",
           "per_source", "reconcile", "render", "run", "save_chosen", "source_metrics"]


def _family(text: str) -> tuple[str, float | None]:
    """``count``, ``cusum`` or ``ema:HALFLIFE``."""
    name, _, param = text.partition(":")
    if name in ("count", "cusum") and not param:
        return name, None
    if name == "ema":
        try:
            halflife = float(param)
        except ValueError:
            halflife = 0.0
        if halflife > 0:
            return name, halflife
    raise argparse.ArgumentTypeError(
        f"{text!r}: a rule family is count, cusum or ema:HALFLIFE (tokens > 0)")


def _halflife(text: str) -> HalfLife:
    """``none`` (the prefix mean), a half-life in tokens, or several joined by commas (one
    weighted mean per half-life side by side, e.g. ``4,32``)."""
    if text == "none":
        return None
    try:
        values = halflives_of([float(x) for x in text.split(",")])
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: a half-life is none, a number of tokens > 0, or several joined by "
            "commas (4,32)") from None
    return values[0] if len(values) == 1 else values


def _scale(text: str) -> float | None:
    """A prompt term's scale (a number >= 0), or ``none`` for the head without one."""
    if text == "none":
        return None
    try:
        scale = float(text)
    except ValueError:
        scale = -1.0
    if not (math.isfinite(scale) and scale >= 0):
        raise argparse.ArgumentTypeError(f"{text!r}: a prompt scale is a number >= 0 or none")
    return scale


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m guardrail_harmful_content.training.select")
    add = parser.add_argument
    add("--pool", type=Path, nargs="+", required=True,
        help="pool JSON Lines (several: parts read by separate runs)")
    add("--features", type=Path, nargs="+", default=None,
        help="feature cache folder of each --pool part, in the same order "
             "(default: read the parts with SmolLM2 into the guardrail cache)")
    add("--layers", type=int, nargs="+", default=[6, 9, 12, 15])
    add("--ridges", type=float, nargs="+", default=[0.01, 0.1, 1.0, 10.0],
        help="L2 strengths (of each --fits)")
    add("--fits", nargs="+", choices=FITS, default=["ridge"],
        help="ridge (closed form, Platt-scaled) and/or logistic")
    add("--upweights", nargs="+", type=float, default=[1.0],
        help="factors on the (source, label) cells of the tags that start with "
             "--upweight-prefix (each tried; 1: every cell weighs the same)")
    add("--upweight-prefix", default="handwritten:")
    add("--logistic-strengths", type=float, nargs="+", default=None,
        help="L2 strengths of the logistic fit (default: --ridges)")
    add("--halflives", nargs="+", type=_halflife, default=[None], metavar="H",
        help="pooling half-lives in tokens ('none': the prefix mean; 4,32: two weighted means "
             "side by side), each a candidate")
    add("--token-norm", choices=TOKEN_NORMS, default="none",
        help="normalise each token's state of each layer before pooling (rms: divide by its "
             "root mean square, as the model's RMSNorm does; pooling.TOKEN_NORMS)")
    add("--capped", nargs="*", default=list(CAPPED_MIXED),
        help="tag prefixes of mixed sources whose benign records are capped too")
    add("--layer-sets", nargs="+", default=None, metavar="L,L",
        help="layer sets to try, e.g. 12 9,12,15 (default: each layer of "
             "--layers, every pair and all together)")
    add("--build", type=Path, default=None,
        help="keep only the pool records this data build holds, with its splits")
    add("--quiet", action="store_true", help="no progress bars")
    add("--rule-families", nargs="+", type=_family, default=[("count", None)],
        metavar="FAMILY", help="rule families to try per head: count, ema:HALFLIFE, cusum "
                               "(default: count)")
    add("--objective-sources", nargs="+", default=None, metavar="TAG",
        help="harmful sources the mean macro-F1 runs over (default: every one in the pool; "
             "a pass that adds sources keeps the previous pool's)")
    add("--prompt-features", type=Path, default=None, metavar="CACHE",
        help="the pool's prompt states (python -m guardrail_harmful_content.training.context): "
             "try each head with a prompt term")
    add("--prompt-scales", type=_scale, nargs="+", default=[1.0], metavar="S",
        help="scales of the prompt term to try (with --prompt-features; 'none': the head "
             "without it too; default 1)")
    add("--cap-harmful-prompts", action="store_true",
        help="also cap false halts on benign answers to harmful-sounding prompts (refusals "
             "and matched negatives; safety answers), each group pooled over the capped sets")
    add("--turn-rows", type=int, nargs="+", default=[], metavar="D",
        help="also train on the pooled prefix D tokens after a harmful record's first harmful "
             "token, for each D (default: the fixed cuts only)")
    add("--max-false-halts", type=float, default=0.05)
    add("--max-read", type=float, default=0.5)
    add("--report", type=Path, required=True, help="JSON report to write")
    add("--out", type=Path, default=None,
        help="also fit the chosen probe on the whole pool and write weights here")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.features is None:
        args.features = [extract(part, args.layers) for part in args.pool]
    if len(args.pool) != len(args.features):
        parser.error("--pool and --features need the same number of paths")
    if any(d < 0 for d in args.turn_rows):
        parser.error(f"--turn-rows: offsets must be >= 0 tokens, got {args.turn_rows}")
    records = load_parts(args.pool, args.features, args.layers)
    if args.build is not None:
        records = reconcile(records, args.build)
    if not records:
        print(f"error: {args.features}: no feature shards", file=sys.stderr)
        return 2
    print(f"{len(records)} records", file=sys.stderr, flush=True)
    harmful = {r.tag for r in records if r.label == 1}
    unknown = sorted(set(args.objective_sources or ()) - harmful)
    if unknown:
        parser.error(f"--objective-sources: {', '.join(unknown)} hold no harmful record of the "
                     "pool")
    scales: list[float | None] = [None]
    if args.prompt_features is not None:
        try:
            cache = load_prompt_states(args.prompt_features)
            missing = sorted(set(args.layers) - set(cache.layers))
            if missing:
                raise ValueError(f"{args.prompt_features}: no states for layers {missing}")
            attach_prompt_states(records, cache.by_prompt())
        except ValueError as exc:
            parser.error(f"--prompt-features: {exc}")
        scales = list(dict.fromkeys(args.prompt_scales))
    groups = harmful_prompt_groups(records, args.capped) if args.cap_harmful_prompts else None
    normalise_records(records, args.token_norm)
    halflives = list(dict.fromkeys(args.halflives))
    layer_sets = (None if args.layer_sets is None
                  else [[int(x) for x in s.split(",")] for s in args.layer_sets])
    report = run(records, args.layers, args.ridges, args.max_false_halts, args.max_read,
                 halflives, args.capped, progress=not args.quiet, layer_sets=layer_sets,
                 fits=args.fits, upweights=args.upweights,
                 upweight_prefix=args.upweight_prefix, families=args.rule_families,
                 objective=args.objective_sources, prompt_scales=scales, groups=groups,
                 strengths=({"logistic": args.logistic_strengths}
                            if args.logistic_strengths else None),
                 turn_rows=args.turn_rows)
    if args.token_norm != "none":  # the records were normalised: so must the runtime's be
        report["chosen"]["token_norm"] = args.token_norm
        for candidate in report["candidates"]:
            candidate["token_norm"] = args.token_norm
    report["in_split"] = in_split(records, report["chosen"])
    args.report.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if args.out is not None:
        save_chosen(records, report, args.out)
    print(json.dumps({"chosen": report["chosen"], "pool": report["loso"]["pool"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
