"""Leave-one-source-out figures of the harm heads: the shipped recipe against the pooled probe.

For every source tag of the pool, the head is trained without that source and scores it; one
count-k rule for all sources is chosen on these out-of-source scores (as ``select.py`` does), and
each held-out source and the pool are reported at that rule.

- ``recipe``: the recipe of the head shipped before (issue 23's starting point): SCM dual head, an
  MLP sequence head (256 units) on layer 12 with ``prefix_mean`` pooling, two prefix views per
  record, ``--epochs`` epochs, one seed (the shipped head averaged four);
- ``pooled``: the selection report's chosen probe (its LOSO scores are recomputed here).

    python -m bench.harm_loso --pool POOL.jsonl.. --features DIR.. --report SELECT.json
        [--folds TAG..]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .common import write_result


def _cached(records: Sequence[Any]) -> list[Any]:
    """Pool records as the trainer's ``CachedRecord`` (token labels from the first harmful
    token: the pool keeps only that of the spans)."""
    from guardrail_harmful_content.training.data.records import normalise  # noqa: F401 - plugin present

    from guardrail.toolkit.features import CachedRecord
    from guardrail.toolkit.records import SpanLabel

    out = []
    for i, r in enumerate(records):
        n = len(r)
        first = r.first_harm if r.label == 1 and r.first_harm is not None else None
        spans = (SpanLabel(first, n, 1),) if first is not None else ()
        offsets = torch.stack([torch.arange(n), torch.arange(1, n + 1)], dim=1)
        out.append(CachedRecord(i, "", "x" * n, r.label, spans, offsets,
                                torch.zeros(n, dtype=torch.int64),
                                {layer: torch.as_tensor(h) for layer, h in r.hidden.items()}))
    return out


def recipe_scores(records: Sequence[Any], tags: Sequence[str], epochs: int,
                  folds: Sequence[str] | None) -> list[np.ndarray | None]:
    """Out-of-source prefix scores of the shipped recipe (``None`` for folds not run)."""
    from guardrail_harmful_content.head import DualHead
    from guardrail_harmful_content.training.loso import loso_folds
    from guardrail_harmful_content.training.losses import scm_loss_fn
    from guardrail_harmful_content.training.prefixes import prefix_views
    from guardrail_harmful_content.training.scoring import STACKED, prefix_scores, stack_layers
    from guardrail_harmful_content.training.train import LOSS_WEIGHTS

    from guardrail.toolkit.train import train_head

    cached = _cached(records)
    out: list[np.ndarray | None] = [None] * len(records)
    for fold in loso_folds(list(tags), folds):
        t = time.perf_counter()
        train = [cached[i] for i in fold.train]
        train = list(train) + prefix_views(train, 2, 0)
        view = stack_layers(train, (12,), "prefix_mean")
        head = DualHead(int(view[0].hidden[STACKED].shape[-1]), dropout=0.1, seed=0,
                        sequence_hidden=256)
        train_head(head, view, [], layer=STACKED,
                   loss_fn=scm_loss_fn(LOSS_WEIGHTS["token_ce"], LOSS_WEIGHTS["sequence_ce"],
                                       LOSS_WEIGHTS["logic"]),
                   metric_fn=None, epochs=epochs, batch_size=16, lr=2e-3, seed=0,
                   progress=False)
        test = stack_layers([cached[i] for i in fold.test], (12,), "prefix_mean")
        for i, s in zip(fold.test, prefix_scores(head, test), strict=True):
            out[i] = np.asarray(s)
        print(f"recipe fold {fold.held_out}: {time.perf_counter() - t:.0f} s", file=sys.stderr,
              flush=True)
    return out


def evaluate(records: Sequence[Any], scores: Sequence[np.ndarray | None],
             max_false_halts: float, max_read: float) -> dict[str, Any]:
    """One rule chosen on the out-of-source scores; figures per source and pooled."""
    from guardrail_harmful_content.training.select import (
        KS,
        THRESHOLDS,
        choose_rule,
        grid_summary,
        halts,
        nested,
        per_source,
    )

    keep = [i for i, s in enumerate(scores) if s is not None]
    sc = [np.asarray(scores[i]) for i in keep]
    labels = np.asarray([records[i].label for i in keep])
    tags = np.asarray([records[i].tag for i in keep])
    lengths = np.asarray([len(records[i]) for i in keep])
    table = halts(sc, THRESHOLDS, KS)
    summary = grid_summary(labels, tags, lengths, table, max_false_halts, max_read)
    j, k, met = choose_rule(summary)
    return {"rule": {"threshold": THRESHOLDS[j], "k": KS[k], "constraint_met": met},
            "mean_harmful_source_macro_f1": float(summary["mean_f1"][j, k]),
            "per_source": per_source(labels, tags, lengths, table[:, j, k], sc),
            "nested": per_source(labels, tags, lengths,
                                 nested(labels, tags, lengths, table, max_false_halts, max_read),
                                 sc)}


def render(result: dict[str, Any]) -> str:
    """The per-source comparison for docs/benchmarks.md."""
    from guardrail_harmful_content.training.select import render as table

    same = result.get("pooled_same_folds") or result["pooled"]
    lines = ["### Harmful content out of source: the shipped recipe against the pooled probe", "",
             f"Leave-one-source-out on {result['pool']['records']} pool records, held-out sources "
             f"{', '.join(result['recipe']['folds']) if 'recipe' in result else 'all'}; each "
             "head retrained without the source, one rule per head chosen on its out-of-source "
             "scores (`python -m bench.harm_loso`; see docs/harmful-content.md).", ""]
    if "recipe" in result:
        lines.append(table(same["per_source"], result["recipe"]["per_source"],
                           ("pooled probe", "shipped recipe")))
    else:
        lines.append(table(same["per_source"]))
    return "\n".join(lines)


def _rule_text(rule: dict[str, Any]) -> str:
    kind = str(rule["kind"])
    if kind.startswith("window"):
        kind = f"mean of the last {kind[6:]} scores, count"
    return f"{kind} t {rule['threshold']} k {rule['k']}"


def render_pass3(result: dict[str, Any]) -> str:
    """The third selection pass: every candidate's LOSO figures, the incumbent and the best
    candidate per source (LOSO and nested), and the ship decision."""
    from guardrail_harmful_content.training.select import render as table

    rule = result["ship_rule"]
    lines = [f"### {result['title']}", "",
             f"{result['pool']['records']} pool records, {result['pool']['sources']} source tags "
             f"({result['pool']['harmful_sources']} with harmful answers); layers 6, 9, 12, 15, "
             "half-life 12; every figure out of source (each source scored by the probe fitted "
             "without it), one rule per candidate under the caps (false halts <= 0.05 on every "
             "capped source, mean share read <= 0.5). Ship rule, written before the run: "
             f"{rule['text']}. Best candidate {rule['best']}: margin {rule['margin']:+.3f} over "
             f"the incumbent ({rule['incumbent']}); shipped: {'yes' if rule['ship'] else 'no'}.",
             "", "| training | ridge | rule family | rule chosen | mean macro-F1 (harmful "
             "sources) | nested | pooled macro-F1 | recall | worst capped false halts | read |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in result["candidates"]:
        lines.append(f"| {c['training']} | {c['ridge']:g} | {c['rule_family']} | "
                     f"{_rule_text(c['rule'])} | {c['mean_harmful_source_macro_f1']:.3f} | "
                     f"{c['nested_mean_harmful_source_macro_f1']:.3f} | "
                     f"{c['pool_macro_f1']:.3f} | {c['pool_recall']:.3f} | "
                     f"{c['worst_capped_false_halt_rate']:.3f} | {c['fraction_seen']:.3f} |")
    inc, best = result["incumbent"], result["best"]
    lines += ["", f"Per source, out of source: the incumbent ({_rule_text(inc['rule'])}) and the "
              f"best candidate ({best['key']}, {_rule_text(best['rule'])}).", "",
              table(inc["loso"], best["loso"], ("incumbent", "best candidate")),
              "Nested (each source's rule chosen on the other sources' scores):", "",
              table(inc["nested"], best["nested"], ("incumbent", "best candidate"))]
    relabelled = result.get("relabelled_pool") or {}
    if relabelled:
        lines += ["", "The recipe refitted on the pool with the third pass's 9 label "
                  "corrections (count rule): " + "; ".join(
                      f"{k}: {v['mean_harmful_source_macro_f1']:.3f} "
                      f"({_rule_text(v['rule'])})" for k, v in relabelled.items()) + "."]
    return "\n".join(lines)


def _head_rows(inc: dict[str, Any], cand: dict[str, Any], extra: Sequence[str] = ()
               ) -> list[str]:
    """The incumbent's and the candidate's rows of a pass's head table; ``extra`` names the
    figures shown after the mean macro-F1."""
    rows = []
    for name, h in (("incumbent", inc), ("candidate", cand)):
        p = h["pool_old_sources"]
        rule = _family_rule_text(h) if "family" in h else _rule_text(h["rule"])
        cells = [name, rule, f"{h['mean_harmful_source_macro_f1']:.3f}",
                 *(f"{h[key]:.3f}" for key in extra),
                 f"{h['nested_mean_harmful_source_macro_f1']:.3f}", f"{p['macro_f1']:.3f}",
                 f"{p['recall']:.3f}", f"{h['worst_capped_false_halt_rate']:.3f}",
                 f"{h['fraction_seen']:.3f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def _candidate_tables(result: dict[str, Any]) -> list[str]:
    """The tables a pass with new training data ends with: the candidate against the incumbent
    per source (LOSO and nested), and the shipped head on the new sources when measured."""
    from guardrail_harmful_content.training.select import render as table

    inc, cand = result["incumbent"], result["candidate"]
    lines = ["", "Per source, out of source (the candidate's pool row includes the new "
             "sources):", "", table(cand["loso"], inc["loso"], ("candidate", "incumbent")),
             "Nested (each source's rule chosen on the other sources' scores):", "",
             table(cand["nested"], inc["nested"], ("candidate", "incumbent"))]
    shipped = result.get("shipped_on_new")
    if shipped:
        lines += [f"The shipped head as it is ({_rule_text(shipped['rule'])}) on the new "
                  "sources, beside the candidate out of source:", "",
                  table(shipped["per_source"], result.get("candidate_on_new") or {
                      t: cand["loso"][t] for t in shipped["per_source"] if t != "pool"},
                        ("shipped head", "candidate (LOSO)"))]
    return lines


def render_pass4(result: dict[str, Any]) -> str:
    """The fourth selection pass (new training data): the incumbent against the candidate with
    the third hand-written wave, per source (LOSO and nested), the shipped head on the new
    sources, and the ship decision."""
    rule, inc, cand = result["ship_rule"], result["incumbent"], result["candidate"]
    lines = [f"### {result['title']}", "",
             f"Incumbent: {result['pool']['incumbent_records']} pool records (the third pass's "
             f"pool with the current label corrections); candidate: the same folds with "
             f"{result['pool']['candidate_records'] - result['pool']['incumbent_records']} "
             f"new hand-written answers as two more sources ({', '.join(result['new_sources'])})."
             " Both: ridge 0.3, half-life 12, layers 6, 9, 12, 15; every figure out of source; "
             "one count rule per head under the caps (false halts <= 0.05 on every capped "
             "source, the new ones included; mean share read <= 0.5), chosen for the mean "
             f"macro-F1 over the incumbent's {len(result['pool']['old_harmful_sources'])} harmful "
             f"sources. Ship rule, written before the run: {rule['text']}. Margin "
             f"{rule['margin']:+.3f}; shipped: {'yes' if rule['ship'] else 'no'}.", "",
             "| head | rule | mean macro-F1 (incumbent's harmful sources) | nested | pooled "
             "macro-F1 (incumbent's sources) | recall | worst capped false halts | read |",
             "|---|---|---|---|---|---|---|---|"]
    lines += _head_rows(inc, cand)
    every = cand.get("rule_py_all_sources")
    if every:
        lines += ["", "The candidate's rule as `select.py` would choose it (mean over all of its "
                  "harmful sources, the new ones included; reported, deciding nothing): "
                  f"{_rule_text(every['rule'])}, mean over all "
                  f"{every['mean_all_harmful_sources_macro_f1']:.3f}, over the incumbent's "
                  f"sources {every['mean_harmful_source_macro_f1']:.3f}."]
    return "\n".join(lines + _candidate_tables(result))


def render_pass5(result: dict[str, Any]) -> str:
    """The fifth selection pass (the fourth hand-written wave as new training data): the
    incumbent (the fourth pass's pool) against the candidate, per source (LOSO and nested), the
    shipped head on the new sources, and the ship decision."""
    rule, inc, cand, pool = result["ship_rule"], result["incumbent"], result["candidate"], \
        result["pool"]
    added = pool["candidate_records"] - pool["incumbent_records"]
    lines = [f"### {result['title']}", "",
             f"Incumbent: {pool['incumbent_records']} pool records (the fourth pass's pool with "
             f"the current label corrections); candidate: the same folds with {added} new "
             f"hand-written answers as {len(result['new_sources'])} more sources "
             f"({', '.join(result['new_sources'])}). Both: ridge 0.3, half-life 12, layers 6, 9, "
             "12, 15; every figure out of source; one count rule per head under the caps (false "
             "halts <= 0.05 on every capped source, the new ones included; mean share read <= "
             "0.5), chosen for the mean macro-F1 over the same "
             f"{len(pool['old_harmful_sources'])} harmful sources as the fourth pass. Ship rule, "
             f"written before the run: {rule['text']}. Margin {rule['margin']:+.3f}; shipped: "
             f"{'yes' if rule['ship'] else 'no'}.", "",
             f"| head | rule | mean macro-F1 ({len(pool['old_harmful_sources'])} harmful sources)"
             f" | the same over {len(pool['harmful_sources_18'])} | nested | pooled macro-F1 "
             f"(incumbent's sources) | recall | worst capped false halts | read |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += _head_rows(inc, cand, extra=("mean_18_harmful_source_macro_f1",))
    every = cand.get("rule_py_all_sources")
    if every:
        lines += ["", "The candidate's rule as `select.py` would choose it (mean over all "
                  f"{every['harmful_sources']} of its harmful sources, the new ones included; "
                  f"reported, deciding nothing): {_rule_text(every['rule'])}, mean over all "
                  f"{every['mean_all_harmful_sources_macro_f1']:.3f}, over the "
                  f"{len(pool['old_harmful_sources'])} sources "
                  f"{every['mean_harmful_source_macro_f1']:.3f}."]
    return "\n".join(lines + _candidate_tables(result))


def _family_rule_text(candidate: dict[str, Any]) -> str:
    """A sixth-pass candidate's rule: its family, parameter and grid point."""
    rule = candidate["rule"]
    if candidate["family"] == "cusum":
        spec = rule["score_transform"]
        return f"cusum d {spec['drift']} h {rule['height']:g}"
    family = ("count" if candidate["family"] == "count"
              else f"ema {candidate['param']:g} + count")
    return f"{family} t {rule['threshold']} k {rule['k']}"


def _family_table(candidates: Sequence[dict[str, Any]], n16: int, n18: int,
                  extra: Sequence[tuple[str, Callable[[dict[str, Any]], str]]] = ()
                  ) -> list[str]:
    """A rule-family pass's table of (head, family) candidates, each at its rule under the
    caps; ``extra`` adds (header, cell) columns."""
    heads = ["head", "rule", f"mean macro-F1 ({n16} harmful sources)", f"the same over {n18}",
             "pooled macro-F1", "worst capped false halts", "read", *(h for h, _ in extra)]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for c in candidates:
        lines.append(f"| {c['head']} | {_family_rule_text(c)} | "
                     f"{c['mean_harmful_source_macro_f1']:.3f} | "
                     f"{c['mean_18_harmful_source_macro_f1']:.3f} | {c['pool_macro_f1']:.3f} | "
                     f"{c['worst_capped_false_halt_rate']:.3f} | {c['fraction_seen']:.3f} |"
                     + "".join(f" {cell(c)} |" for _, cell in extra))
    return lines


def render_pass6(result: dict[str, Any]) -> str:
    """The sixth selection pass (rule families beyond the count rule, the head's ridge and
    half-life on the pool with wave 4): every candidate's best rule under the caps, the
    incumbent against the best challenger and the best head on the wave-4 pool per source, the
    fully nested figure and the per-source ceiling, and the ship decision."""
    from guardrail_harmful_content.training.select import render as table

    rule, pool = result["ship_rule"], result["pool"]
    inc, best, wave4 = result["incumbent"], result["best_challenger"], result["best_wave4_head"]
    n16 = len(pool["old_harmful_sources"])
    lines = [f"### {result['title']}", "",
             f"Heads, each scored out of source by the same folds: the incumbent's (pool "
             f"{pool['incumbent_records']}, ridge 0.3, half-life 12) and six on the pool with "
             f"wave 4 ({pool['candidate_records']} records; ridge 0.3, 1, 3 at half-lives 12 "
             "and 8), layers 6, 9, 12, 15. Rule families: " + "; ".join(
                 f"`{k}`, {v}" for k, v in result["families"].items()) + ". Each (head, "
             "family) candidate's rule is chosen under the caps (false halts <= 0.05 on every "
             "capped source of its pool; mean share read <= 0.5) for the mean macro-F1 over "
             f"the same {n16} harmful sources. Ship rule, written before the run: "
             f"{rule['text']}. The best candidate is the incumbent itself; the best challenger's "
             f"margin {rule['margin']:+.3f}; shipped: {'yes' if rule['ship'] else 'no'}.", "",
             *_family_table(result["candidates"], n16, len(pool["harmful_sources_18"]),
                            [("best under the false-halt cap alone",
                              lambda c: f"{c['best_fh_cap_only']:.3f}")])]
    nested = result["fully_nested"]
    oracle = result["oracle_per_source_rule"]
    lines += ["", f"Nested (each source's rule chosen without it): incumbent "
              f"{inc['nested_mean_harmful_source_macro_f1']:.3f}, best challenger "
              f"{best['nested_mean_harmful_source_macro_f1']:.3f}, best head on the wave-4 pool "
              f"{wave4['nested_mean_harmful_source_macro_f1']:.3f}. Fully nested (for each "
              "held-out source the candidate and its rule chosen on the other sources): "
              f"{nested['mean']:.3f}. Deciding nothing, an upper bound: each harmful source's "
              "own best rule of the family, chosen on that source itself (its own benign "
              "answers' false halts <= 0.05, no read cap), on the same scores: incumbent "
              f"{oracle['incumbent']['mean']:.3f}, best head on the "
              f"wave-4 pool {oracle['best_wave4_head_family']['mean']:.3f}: what one global "
              "rule costs against a rule per source.", "",
              f"Per source, out of source: the best challenger ({best['head']}, "
              f"{_family_rule_text(best)}) beside the incumbent ({_family_rule_text(inc)}):", "",
              table(best["loso"], inc["loso"], ("challenger", "incumbent")),
              f"The best head on the wave-4 pool ({wave4['head']}, {_family_rule_text(wave4)}) "
              "beside the incumbent:", "",
              table(wave4["loso"], inc["loso"], ("wave-4 head", "incumbent")),
              "Each harmful source: the incumbent at its one rule (LOSO) and the source's own "
              "best rule on the same scores (chosen on the source itself; deciding nothing):", "",
              "| source | incumbent: macro-F1 | own best rule: macro-F1 |", "|---|---|---|"]
    for tag, value in oracle["incumbent"]["per_source"].items():
        lines.append(f"| {tag} | {inc['loso'][tag]['macro_f1']:.3f} | {value:.3f} |")
    return "\n".join(lines) + "\n"


def _at_incumbent_rule(result: dict[str, Any], n16: int) -> list[str]:
    """The table of each head at the incumbent's rule (a pass's ``at_incumbent_rule``)."""
    lines = [f"| head | mean macro-F1 ({n16} harmful sources) | worst capped false halts | read "
             "| `social-v2` false halts |", "|---|---|---|---|---|"]
    for name, h in result["at_incumbent_rule"].items():
        lines.append(f"| {name} | {h['mean_harmful_source_macro_f1']:.3f} | "
                     f"{h['worst_capped_false_halt_rate']:.3f} | {h['fraction_seen']:.3f} | "
                     f"{h['social_v2_false_halt_rate']:.3f} |")
    return lines


def render_pass7(result: dict[str, Any]) -> str:
    """The seventh selection pass (the fifth hand-written wave as new sources, with and without
    wave 4, each head with the rule families): every candidate at its rule under the caps with
    the new sources held out, the incumbent against the winner per source (LOSO and nested),
    each head at the incumbent's rule, the shipped head on the new sources, and the ship
    decision."""
    rule, pool, inc = result["ship_rule"], result["pool"], result["incumbent"]
    n16, news = len(pool["old_harmful_sources"]), result["new_sources"]
    short = [t.split(":", 1)[1] for t in news]

    def on_new(tag: str, key: str) -> Callable[[dict[str, Any]], str]:
        return lambda c: f"{c['new_sources'][tag][key]:.3f}" if "new_sources" in c else "-"

    extra = [(f"{name}: {what}", on_new(tag, key)) for tag, name in zip(news, short, strict=True)
             for what, key in (("macro-F1", "macro_f1"), ("false halts", "false_halt_rate"))]
    extra.append(("`social-v2` false halts",
                  lambda c: f"{c['social_v2_false_halt_rate']:.3f}"))
    heads = "; ".join(f"{h}, {n} records" for h, n in pool["candidate_records"].items())
    lines = [f"### {result['title']}", "",
             f"Incumbent: the shipped recipe (ridge 0.3, half-life 12, layers 6, 9, 12, 15) on "
             f"the fourth pass's pool ({pool['incumbent_records']} records), count rule. "
             f"Candidate heads, the same recipe and folds with the fifth hand-written wave as "
             f"{len(news)} new sources ({', '.join(news)}): {heads}. Rule families: "
             + "; ".join(f"`{k}`, {v}" for k, v in result["families"].items()) + ". Every figure "
             "out of source; each candidate's rule is chosen under the caps (false halts <= "
             "0.05 on every capped source of its pool, the new ones included; mean share read "
             f"<= 0.5) for the mean macro-F1 over the same {n16} harmful sources. Ship rule, "
             f"written before the run: {rule['text']}. Best candidate: {result['winner_name']}, "
             f"margin {rule['margin']:+.3f}; shipped: {'yes' if rule['ship'] else 'no'}.", "",
             *_family_table(result["candidates"], n16, len(pool["harmful_sources_18"]), extra),
             "", f"The incumbent and the best candidate ({result['winner_name']}):", "",
             f"| head | rule | mean macro-F1 ({n16} harmful sources) | the same over "
             f"{len(pool['harmful_sources_18'])} | nested | pooled macro-F1 (incumbent's "
             "sources) | recall | worst capped false halts | read |",
             "|---|---|---|---|---|---|---|---|---|",
             *_head_rows(inc, result["candidate"], extra=("mean_18_harmful_source_macro_f1",)),
             "", "Each head at the incumbent's rule (count, 6 prefixes >= 0.97; deciding "
             "nothing): what the wave moves.", "", *_at_incumbent_rule(result, n16)]
    aside = result.get("deciding_nothing") or {}
    if aside:
        lines += ["", "Deciding nothing, what binds: " + "; ".join(
            f"{name}: at the incumbent's rule the worst capped source is "
            f"`{d['worst_at_6_0.97'][0][1]}` ({d['worst_at_6_0.97'][0][0]:.3f}); with the new "
            f"files' benign answers left out of the false-halt cap its best count rule is "
            f"{d['count_rule_caps_without_new_benign']['k']} prefixes >= "
            f"{d['count_rule_caps_without_new_benign']['t']}, mean "
            f"{d['count_rule_caps_without_new_benign']['mean16']:.3f}, halting "
            + " and ".join(f"{v:.3f} of `{t}`'s" for t, v in
                           d["new_benign_fh_at_that_rule"].items()) + " benign answers"
            for name, d in aside.items()) + "."]
    lines += ["", "Fully nested (for each held-out source, the candidate among the "
              f"{len(result['candidates'])} rows above and its rule chosen on the other "
              f"sources): {result['fully_nested']['mean']:.3f}."]
    return "\n".join(lines + _candidate_tables(result)) + "\n"


def render_pass8(result: dict[str, Any]) -> str:
    """The eighth selection pass (the prompt's states beside the response's: joint and stacked
    heads, with the rule families): every candidate and the control at its rule under the caps,
    the prompt probe alone per source, each head at the incumbent's rule, the incumbent against
    the winner per source (LOSO and nested), and the decision."""
    rule, pool, inc = result["ship_rule"], result["pool"], result["incumbent"]
    n16, n18 = len(pool["old_harmful_sources"]), len(pool["harmful_sources_18"])
    best_cap = [("best under the false-halt cap alone", lambda c: f"{c['best_fh_cap_only']:.3f}")]
    lines = [f"### {result['title']}", "",
             f"Incumbent: the shipped recipe (ridge 0.3, half-life 12, layers 6, 9, 12, 15) on "
             f"the fourth pass's pool ({pool['incumbent_records']} records), count rule. "
             "Candidate heads, the same pool and folds, with the prompt's states as the observer "
             "renders the chat (layers 6, 9, 12, 15; " + "; ".join(
                 f"`{k}`, {v}" for k, v in result["prompt_features"].items()) + "): " + "; ".join(
                 f"`{k}`, {v}" for k, v in result["heads"].items()) + ". Rule families: "
             + "; ".join(f"`{k}`, {v}" for k, v in result["families"].items()) + ". Every figure "
             "out of source; each candidate's rule is chosen under the caps (false halts <= "
             "0.05 on every capped source; mean share read <= 0.5) for the mean macro-F1 over "
             f"the same {n16} harmful sources. Ship rule, written before the run: "
             f"{rule['text']}. Best candidate: {result['winner_name']}, margin "
             f"{rule['margin']:+.3f} over the incumbent, {rule['margin_over_control']:+.3f} over "
             f"the control; {result['verdict']}.", "",
             *_family_table(result["candidates"], n16, n18, best_cap),
             "", f"The control ({result['control_text']}; not a candidate):", "",
             *_family_table(result["controls"], n16, n18, best_cap),
             "", f"The incumbent and the best candidate ({result['winner_name']}):", "",
             f"| head | rule | mean macro-F1 ({n16} harmful sources) | the same over {n18} | "
             "nested | pooled macro-F1 | recall | worst capped false halts | read |",
             "|---|---|---|---|---|---|---|---|---|",
             *_head_rows(inc, result["candidate"], extra=("mean_18_harmful_source_macro_f1",)),
             "", "Each head at the incumbent's rule (count, 6 prefixes >= 0.97; deciding "
             "nothing):", "", *_at_incumbent_rule(result, n16)]
    alone = result["prompt_alone"]
    feats = sorted(alone)
    lines += ["", "The prompt probe alone (the stacked heads' outer-fold prompt logit, one score "
              "per record; AUC per source with both labels, out of source), beside the "
              "incumbent's AUC (the response's highest prefix score):", "",
              "| source | " + " | ".join(f"prompt `{f}`" for f in feats) + " | incumbent |",
              "|---|" + "---|" * (len(feats) + 1)]
    for tag in alone[feats[0]]["auc"]:
        own = inc["loso"].get(tag, {}).get("auc")
        lines.append(f"| {tag} | " + " | ".join(f"{alone[f]['auc'][tag]:.3f}" for f in feats)
                     + (f" | {own:.3f} |" if own is not None else " | - |"))
    lines += ["", "Fully nested (for each held-out source, the candidate among the "
              f"{len(result['candidates'])} rows above and its rule chosen on the other "
              f"sources): {result['fully_nested']['mean']:.3f}."]
    return "\n".join(lines + _candidate_tables(result)) + "\n"



def _rate(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _old_caps_cell(c: dict[str, Any]) -> str:
    """A ninth-pass candidate's rule and mean under the old caps alone."""
    old = c["old_caps_only"]
    rule = _family_rule_text({**c, "rule": old["rule"]})
    return f"{rule}, {old['mean_harmful_source_macro_f1']:.3f}"


def render_pass9(result: dict[str, Any]) -> str:
    """The ninth selection pass (the eighth pass's joint head with its prompt term scaled, under
    a new cap on benign answers to harmful-sounding prompts): every candidate at its rule under
    all the caps, the incumbent against the winner, both on the capped and reported groups, per
    source (LOSO and nested), and the decision."""
    rule, pool, inc, cand = (result["ship_rule"], result["pool"], result["incumbent"],
                             result["candidate"])
    n16, n18 = len(pool["old_harmful_sources"]), len(pool["harmful_sources_18"])
    groups = list(result["caps"]["groups"])
    old_rule = result["incumbent_at_old_rule"]
    extra = [*((f"{g}: false halts", lambda c, g=g: f"{c['group_false_halt_rates'][g]:.3f}")
               for g in groups),
             ("under the old caps alone", _old_caps_cell)]
    lines = [f"### {result['title']}", "",
             f"Incumbent: the shipped recipe (ridge 0.3, half-life 12, layers 6, 9, 12, 15) on "
             f"the fourth pass's pool ({pool['incumbent_records']} records), count rule. "
             "Candidate heads, the same pool and folds: " + "; ".join(
                 f"`{k}`, {v}" for k, v in result["heads"].items()) + ". Rule families: "
             + "; ".join(f"`{k}`, {v}" for k, v in result["families"].items()) + ". Every figure "
             "out of source; each candidate's rule is chosen under all the caps (false halts <= "
             "0.05 on every capped source; mean share read <= 0.5; and, new in this pass, false "
             "halts <= 0.05 on each of two groups of benign answers to harmful-sounding prompts: "
             + "; ".join(f"*{k}*, {v}, {result['caps']['group_records'][k]} answers"
                         for k, v in result["caps"]["groups"].items())
             + f") for the mean macro-F1 over the same {n16} harmful sources. Ship rule, written "
             f"before the run: {rule['text']}. Best candidate: {result['winner_name']}, margin "
             f"{rule['margin']:+.3f} over the incumbent; {result['verdict']}.", "",
             *_family_table(result["candidates"], n16, n18, extra),
             "", "Reported, not a candidate:", "",
             *_family_table(result["diagnostics"], n16, n18, extra),
             "", f"The incumbent and the best candidate ({result['winner_name']}):", "",
             f"| head | rule | mean macro-F1 ({n16} harmful sources) | the same over {n18} | "
             "nested | pooled macro-F1 | recall | worst capped false halts | read |",
             "|---|---|---|---|---|---|---|---|---|",
             *_head_rows(inc, cand, extra=("mean_18_harmful_source_macro_f1",)),
             "", f"The incumbent's shipped rule (count, {old_rule['rule']['k']} prefixes >= "
             f"{old_rule['rule']['threshold']}) meets the new cap: "
             + "; ".join(f"{g} {v['false_halt_rate']:.3f}"
                         for g, v in old_rule["groups"]["capped"].items()) + ".",
             "", "Benign answers by group, false halts at each head's rule (the first two capped, "
             "the rest reported):", "",
             "| group | answers | incumbent | candidate |", "|---|---|---|---|"]
    for name, v in {**inc["groups"]["capped"], **inc["groups"]["reported"]}.items():
        other = {**cand["groups"]["capped"], **cand["groups"]["reported"]}[name]
        lines.append(f"| {name} | {v['n']} | {_rate(v['false_halt_rate'])} | "
                     f"{_rate(other['false_halt_rate'])} |")
    lines += ["", "The capped groups per source (halted of answers, incumbent / candidate):", "",
              "| source | " + " | ".join(groups) + " |", "|---|" + "---|" * len(groups)]
    per = {g: inc["groups"]["per_source"][g] for g in groups}
    for tag in sorted({t for g in groups for t in per[g]}):
        cells = []
        for g in groups:
            a, b = per[g].get(tag), cand["groups"]["per_source"][g].get(tag)
            cells.append("-" if a is None or b is None else
                         f"{a['halted']} / {b['halted']} of {a['n']}")
        lines.append(f"| {tag} | " + " | ".join(cells) + " |")
    lines += ["", "Pyrit's benign answers to harmful objectives (not capped: noisy labels), per "
              "source:", "", "| source | answers | incumbent | candidate |", "|---|---|---|---|"]
    for tag, v in inc["groups"]["pyrit_per_source"].items():
        lines.append(f"| {tag} | {v['n']} | {v['false_halt_rate']:.3f} | "
                     f"{cand['groups']['pyrit_per_source'][tag]['false_halt_rate']:.3f} |")
    by_kind = result.get("eighth_pass_group_by_kind")
    if by_kind:
        lines += ["", "The eighth pass's group (hand-written benign answers whose prompt the "
                  "prompt probe reads above 0; deciding nothing) by the writers' kind, halted "
                  "of answers:", "", "| kind | answers | incumbent | candidate |",
                  "|---|---|---|---|"]
        lines += [f"| {k} | {v['n']} | {v['incumbent']} | {v['winner']} |"
                  for k, v in by_kind.items()]
    lines += ["", "Fully nested (for each held-out source, the candidate among the "
              f"{len(result['candidates'])} rows above and its rule chosen on the other "
              f"sources under all the caps): {result['fully_nested']['mean']:.3f}."]
    return "\n".join(lines + _candidate_tables(result)) + "\n"


def render_selection(report: dict[str, Any]) -> str:
    """The LOSO selection's per-source figures (``select.py``'s report), and the head shipped
    before it on the sources it never trained on when the report carries them."""
    from guardrail_harmful_content.training.select import render as table

    chosen = report["chosen"]
    status = report.get("status") or ("shipped" if report.get("shipped") else
                                      "candidate, not shipped")
    hl = chosen.get("halflife")
    hls = hl if isinstance(hl, list) else [hl]
    pooling = ("prefix mean" if hl is None
               else f"exponentially weighted mean, half-life {hl:g} tokens" if len(hls) == 1
               else "exponentially weighted means side by side, half-lives "
                    f"{' and '.join(f'{h:g}' for h in hls)} tokens")
    if chosen.get("token_norm", "none") != "none":
        pooling = (f"each token's states {chosen['token_norm'].upper()}-normalised per layer, "
                   f"{pooling}")
    caps = report.get("caps") or {}
    title = report.get("title") or "Harmful content out of source: the LOSO-chosen pooled probe"
    lines = [
        f"### {title} ({status})",
        "", f"{report['pool']['records']} pool records, {len(report['pool']['sources'])} source "
        f"tags; layers {chosen['layers']}, {pooling}, {chosen.get('fit', 'ridge')} (L2 "
        f"{chosen['ridge']:g}), rule threshold "
        f"{chosen['threshold']}, k {chosen['k']}, chosen on out-of-source scores only (caps: "
        f"false halts <= {caps.get('max_false_halt_rate_per_benign_source')} on every capped "
        f"source, mean share read <= {caps.get('max_fraction_seen')}). Beside: the same probe "
        "fitted on the pool's train+val and scored on its test records.", "",
        table(report["loso"], report.get("in_split") or {}, ("LOSO", "in-split test"))]
    recipe = report.get("shipped_recipe")
    if recipe:
        lines += ["", f"The recipe shipped before ({recipe['name']}, its rule chosen under the "
                  "same caps) on the same pool, out of source, beside the chosen candidate:", "",
                  table(report["loso"], recipe["loso"], ("chosen", "recipe before"))]
    beside = report.get("beside")
    if beside:
        lines += ["", beside["text"], "",
                  table(report["loso"], beside["loso"], ("chosen", beside["name"]))]
    before = report.get("shipped_before_on_handwritten")
    if before:
        mine = {t: report["loso"][t] for t in before if t in report["loso"]}
        if report.get("loso_handwritten_pool"):
            mine["pool"] = report["loso_handwritten_pool"]
        lines += ["", "On the hand-written sources (never trained on by the head shipped before "
                  "this one, held out for the probe): the probe out of source against that "
                  "head with its own rule.", "",
                  table(mine, before, ("LOSO probe", "head before"))]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from guardrail_harmful_content.training.pooled import fit_loso
    from guardrail_harmful_content.training.select import load_parts

    parser = argparse.ArgumentParser(prog="python -m bench.harm_loso")
    parser.add_argument("--pool", type=Path, nargs="+", required=True)
    parser.add_argument("--features", type=Path, nargs="+", required=True)
    parser.add_argument("--report", type=Path, required=True, help="select.py's report")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--folds", nargs="*", default=None, help="source tags (default: all)")
    parser.add_argument("--skip-recipe", action="store_true")
    args = parser.parse_args(argv)
    selection = json.loads(args.report.read_text(encoding="utf-8"))
    chosen = selection["chosen"]
    caps = selection["caps"]
    layers = sorted(set(chosen["layers"]) | {12})
    records = load_parts(args.pool, args.features, layers)
    tags = [r.tag for r in records]
    t0 = time.perf_counter()
    pooled = fit_loso(records, chosen["layers"], [chosen["layers"]], [chosen["ridge"]])
    result: dict[str, Any] = {
        "pool": {"records": len(records), "sources": sorted(set(tags))},
        "caps": caps,
        "pooled": {"head": chosen, **evaluate(
            records, pooled[(tuple(chosen["layers"]), chosen["ridge"])],
            caps["max_false_halt_rate_per_benign_source"], caps["max_fraction_seen"])},
    }
    if not args.skip_recipe:
        recipe = recipe_scores(records, tags, args.epochs, args.folds)
        result["recipe"] = {"head": "SCM dual head, MLP 256 on layer 12, prefix_mean, "
                                    f"{args.epochs} epochs, seed 0",
                            "folds": args.folds or "all",
                            **evaluate(records, recipe,
                                       caps["max_false_halt_rate_per_benign_source"],
                                       caps["max_fraction_seen"])}
        if args.folds:  # compare on the same records
            sub = [s if r.tag in args.folds else None
                   for s, r in zip(pooled[(tuple(chosen["layers"]), chosen["ridge"])], records,
                                   strict=True)]
            result["pooled_same_folds"] = evaluate(
                records, sub, caps["max_false_halt_rate_per_benign_source"],
                caps["max_fraction_seen"])
    result["seconds"] = round(time.perf_counter() - t0, 1)
    path = write_result("harm_loso", result)
    print(json.dumps({k: v for k, v in result.items() if k in ("pool", "seconds")}))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
