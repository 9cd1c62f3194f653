"""The entity monitor's finder (``spans.find_entities``) before and after a change, on text only
(no model): what it finds on every source the entity LOSO reads, and how many spans it finds in
the harm data's benign answers.

- **LOSO sources** (the capped pool of ``training.loso.pool_files`` and the hand-written sets of
  ``bench/entity_sets``, the records ``bench.entity_eval --loso`` scores): per source, the
  labelled spans a finder span overlaps (recall; fabricated apart), the labelled spans the new
  finder loses, and the finder spans that overlap no label (the monitor scores them as entities;
  the LOSO counts them as true ones), with how many of those start a sentence, line or list item.
- **Harm benign answers** (``label`` 0 of the harm data's test split, which the ordinary-word
  list is not built from): finder spans per 1,000 words, names and sentence-initial names apart,
  pooled and per source family.

"Before" is ``spans.py`` at ``--before`` (a git revision), loaded from git; "after" is the
working tree's finder. ``--variants`` adds the finder with the word list built from each source
alone (the project's texts, the tokenizer).

    python -m bench.entity_finder [--before REV] [--variants]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .common import ROOT, write_result

NAME = "entity_finder"
BEFORE = "18c94550cd19b0ece4a2428ad09fff25f4ef8daa"  # main before the sentence-start rule
SPANS_PATH = "plugins/entity-hallucination/guardrail_entity_hallucination/spans.py"

Finder = Callable[[str], Sequence[Any]]
"""The entities of a whole text (``EntitySpan``s, or the same fields from an older module)."""


def _finder_at(rev: str) -> Finder:
    """``find_entities(text, final=True)`` of ``spans.py`` at git revision ``rev``."""
    source = subprocess.run(["git", "show", f"{rev}:{SPANS_PATH}"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "spans_before.py"
        path.write_text(source, encoding="utf-8")
        spec = importlib.util.spec_from_file_location("spans_before", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["spans_before"] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    find = module.find_entities
    return lambda text: find(text, 0, final=True)


def _finder(ordinary: Any = None) -> Finder:
    from guardrail_entity_hallucination.spans import find_entities

    return lambda text: find_entities(text, 0, final=True, ordinary=ordinary)


def _loso_sources(data: Path, tmp: Path) -> dict[str, list[dict[str, Any]]]:
    from guardrail_entity_hallucination.training.loso import pool_files, write_marked
    from guardrail_entity_hallucination.training.train_combined import handwritten_sets

    files = dict(pool_files(data, tmp))
    for path in handwritten_sets():
        files[f"handwritten:{path.stem}"] = write_marked([path], tmp / f"hw-{path.stem}.jsonl")
    return {source: [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
                     if line.strip()]
            for source, path in sorted(files.items())}


def _overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def _on_source(records: Sequence[dict[str, Any]], finders: dict[str, Finder]
               ) -> dict[str, Any]:
    from guardrail_entity_hallucination.spans import sentence_start

    out: dict[str, Any] = {"records": len(records)}
    counts: dict[str, Counter[str]] = {name: Counter() for name in finders}
    lost: list[dict[str, Any]] = []
    for record in records:
        text = record["response"]
        gold = [(g["start"], g["end"], int(g["label"])) for g in record["spans"]]
        found = {name: [(s.start, s.end, s.kind) for s in finder(text)]
                 for name, finder in finders.items()}
        for name, spans in found.items():
            c = counts[name]
            for g in gold:
                hit = any(_overlaps((s, e), g[:2]) for s, e, _ in spans)
                c["labelled"] += 1
                c["fabricated"] += g[2]
                c["found"] += hit
                c["fabricated_found"] += hit and g[2]
                if name == "after" and not hit and any(_overlaps((s, e), g[:2])
                                                       for s, e, _ in found["before"]):
                    lost.append({"text": text[g[0]:g[1]], "label": g[2]})
            for s, e, _ in spans:
                if not any(_overlaps((s, e), g[:2]) for g in gold):
                    c["unlabelled"] += 1
                    c["unlabelled_initial"] += sentence_start(text, s)
            c["spans"] += len(spans)
    keys = ("labelled", "fabricated", "found", "fabricated_found", "unlabelled",
            "unlabelled_initial", "spans")
    out.update({name: {k: int(c[k]) for k in keys} for name, c in counts.items()})
    out["lost"] = lost
    return out


def _family(record: dict[str, Any]) -> str:
    tag = str(record.get("source_tag") or "")
    kind = str(record.get("kind") or "")
    if tag.startswith("handwritten:"):
        return "handwritten " + kind.replace("handwritten_benign_", "")
    return tag.split("/")[0] if tag.startswith("pyrit") else tag


def _density(records: Sequence[dict[str, Any]], finders: dict[str, Finder]) -> dict[str, Any]:
    from guardrail_entity_hallucination.spans import _WORD, sentence_start

    def block(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        words = sum(sum(1 for _ in _WORD.finditer(r["response"])) for r in rows)
        out: dict[str, Any] = {"records": len(rows), "words": words}
        for name, finder in finders.items():
            c: Counter[str] = Counter()
            for r in rows:
                text = r["response"]
                for span in finder(text):
                    c["spans"] += 1
                    if span.kind == "NAME":
                        c["names"] += 1
                        c["initial_names"] += sentence_start(text, span.start)
            out[name] = {k: round(1000 * c[k] / max(words, 1), 2)
                         for k in ("spans", "names", "initial_names")}
        return out

    by_family: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_family[_family(r)].append(r)
    return {"pool": block(records),
            "families": {f: block(rows) for f, rows in sorted(by_family.items())}}


def _variants() -> dict[str, Any]:
    """The word list from each source alone (see ``training.ordinary_words``)."""
    from guardrail_entity_hallucination.training import ordinary_words as ow

    from guardrail.observer.hf import smollm2_dir
    from guardrail.toolkit.sources import cache_dir

    texts = ow._texts([(cache_dir() / folder / name, fields)
                       for folder, name, fields in ow.INPUTS])
    lower, capital = ow.count_cases(texts)
    corpus = frozenset(w for w, n in lower.items() if ow._listable(w) and n >= ow.MIN_LOWER
                       and capital[w] <= ow.MAX_CAP_SHARE * n)
    tokens = frozenset(ow.tokenizer_words(smollm2_dir() / "tokenizer.json"))
    return {"corpus only": corpus, "tokenizer only": tokens}


HEAD_KEYS = ("entities", "fabricated", "fabricated_flagged", "true_flagged",
             "unlabelled_flagged", "initial_unlabelled_flagged")


def _shipped_head(finders: dict[str, Finder]) -> dict[str, Any]:
    """The shipped span head at its shipped threshold on the LOSO sources' cached features
    (``bench.entity_eval --loso``'s), with the entities of the finder before and after: entities
    scored, fabricated ones flagged, true ones flagged (of them, spans with no label and those
    also at a sentence start). The head was fitted on these sources: flags, not a LOSO figure."""
    import torch
    from guardrail_entity_hallucination.probe import load_entity_probe, shipped_threshold
    from guardrail_entity_hallucination.span_probe import EntitySpanProbe, span_members
    from guardrail_entity_hallucination.spans import sentence_start
    from guardrail_entity_hallucination.training.evaluation import span_probe_scorer
    from guardrail_entity_hallucination.training.features import build_data
    from guardrail_entity_hallucination.training.train_combined import (
        handwritten_sets,
        load_groups,
    )

    from guardrail.observer.hf import FLOAT32_PRODUCTS, load_smollm2
    from guardrail.policy import ObserverSpec
    from guardrail.toolkit.sources import cache_dir

    torch.set_num_threads(1)
    probe = load_entity_probe()
    threshold = shipped_threshold()
    if not isinstance(probe, EntitySpanProbe) or threshold is None:
        raise SystemExit("--head needs the shipped span head and its threshold")
    observer = load_smollm2(ObserverSpec(options=FLOAT32_PRODUCTS))
    groups = load_groups(observer, build_data(cache_dir() / "entity-data"),
                         cache_dir() / "entity-features", handwritten_sets())
    out: dict[str, Any] = {"threshold": threshold, "sources": {}}
    for source, records in sorted(groups.items()):
        block = {}
        for name in ("before", "after"):
            finder, scorer = finders[name], span_probe_scorer(probe, finders[name])
            c: Counter[str] = Counter()
            for record in records:
                values = scorer(record)
                spans = finder(record.response)
                for span, rows in zip(spans, span_members(record.offsets.tolist(), spans),
                                      strict=True):
                    scored = [values[i] for i in rows if values[i] == values[i]]  # not NaN
                    if not scored:
                        continue
                    gold = [g.label for g in record.spans
                            if g.start < span.end and g.end > span.start]
                    fabricated, flagged = max(gold, default=0) > 0, scored[0] >= threshold
                    c["entities"] += 1
                    c["fabricated"] += fabricated
                    c["fabricated_flagged"] += fabricated and flagged
                    c["true_flagged"] += flagged and not fabricated
                    if not gold and flagged:
                        c["unlabelled_flagged"] += 1
                        c["initial_unlabelled_flagged"] += sentence_start(record.response,
                                                                          span.start)
            block[name] = {k: int(c[k]) for k in HEAD_KEYS}
        out["sources"][source] = block
    return out


def main(argv: list[str] | None = None) -> Path:
    from guardrail.toolkit.sources import cache_dir

    parser = argparse.ArgumentParser(prog="python -m bench.entity_finder")
    parser.add_argument("--before", default=BEFORE, help="git revision of the finder before")
    parser.add_argument("--variants", action="store_true",
                        help="also the word list built from each source alone")
    parser.add_argument("--head", action="store_true",
                        help="also the shipped head's flags on the LOSO sources' cached "
                             "features (loads SmolLM2; about a minute)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    finders: dict[str, Finder] = {"before": _finder_at(args.before), "after": _finder()}
    lists: dict[str, int] = {}
    if args.variants:
        for name, words in _variants().items():
            finders[name] = _finder(words)
            lists[name] = len(words)
    from guardrail_entity_hallucination.spans import ordinary_words

    lists["shipped"] = len(ordinary_words())
    with tempfile.TemporaryDirectory() as tmp:
        sources = _loso_sources(cache_dir() / "entity-data", Path(tmp))
    loso = {source: _on_source(records, finders) for source, records in sources.items()}
    harm_file = cache_dir() / "harmful-content" / "data" / "test.jsonl"
    benign = [r for line in harm_file.read_text(encoding="utf-8").splitlines() if line.strip()
              for r in [json.loads(line)] if int(r["label"]) == 0]
    result = {"before": args.before, "finders": list(finders), "word_lists": lists,
              "loso": loso, "harm_benign": _density(benign, finders),
              "seconds": 0.0}
    if args.head:
        result["head"] = _shipped_head(finders)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    path = write_result(NAME, result)
    print(render(result))
    return path


def render(result: dict[str, Any]) -> str:
    names = result["finders"]
    lines = ["### Entity finder, before and after", "",
             f"`python -m bench.entity_finder` (before: `spans.py` at {result['before'][:7]}). "
             "LOSO sources: labelled spans a finder span overlaps, and finder spans that "
             "overlap no label (scored as entities), of them sentence-initial.", "",
             "| source | labelled (fabricated) | "
             + " | ".join(f"found, {n}" for n in names) + " | "
             + " | ".join(f"unlabelled (initial), {n}" for n in names) + " | lost |",
             "|---|---|" + "---|" * (2 * len(names)) + "---|"]
    total: dict[str, Counter[str]] = {n: Counter() for n in names}
    lost = 0
    for source, block in result["loso"].items():
        for n in names:
            total[n].update(block[n])
        lost += len(block["lost"])
        first = block[names[0]]
        lines.append(
            f"| {source} | {first['labelled']} ({first['fabricated']}) | "
            + " | ".join(f"{block[n]['found']} ({block[n]['fabricated_found']})" for n in names)
            + " | " + " | ".join(f"{block[n]['unlabelled']} ({block[n]['unlabelled_initial']})"
                                 for n in names)
            + f" | {len(block['lost'])} |")
    first = total[names[0]]
    lines.append(
        f"| **all** | {first['labelled']} ({first['fabricated']}) | "
        + " | ".join(f"{total[n]['found']} ({total[n]['fabricated_found']})" for n in names)
        + " | " + " | ".join(f"{total[n]['unlabelled']} ({total[n]['unlabelled_initial']})"
                             for n in names) + f" | {lost} |")
    harm = result["harm_benign"]
    lines += ["", f"Harm data, benign test answers ({harm['pool']['records']} texts, "
              f"{harm['pool']['words']:,} words): finder spans per 1,000 words, all / names / "
              "sentence-initial names.", "",
              "| texts | words | " + " | ".join(names) + " |",
              "|---|---|" + "---|" * len(names)]
    rows = [("**all**", harm["pool"]), *harm["families"].items()]
    for label, block in rows:
        lines.append(f"| {label} | {block['words']:,} | " + " | ".join(
            f"{block[n]['spans']} / {block[n]['names']} / {block[n]['initial_names']}"
            for n in names) + " |")
    if "head" in result:
        lines += _head_table(result["head"])
    return "\n".join(lines) + "\n"


def _head_table(head: dict[str, Any]) -> list[str]:
    lines = ["", f"The shipped head at its threshold ({head['threshold']}) on the same sources' "
             "cached features, before -> after: entities scored, fabricated ones flagged, true "
             "ones flagged (of them: no label at all, and of those at a sentence start). The "
             "head was fitted on these sources, so these are its flags, not LOSO figures.", "",
             "| source | entities | fabricated flagged | true flagged | no label | "
             "no label, sentence start |", "|---|---|---|---|---|---|"]
    total = {n: Counter[str]() for n in ("before", "after")}
    rows = list(head["sources"].items())
    for _, block in rows:
        for n in total:
            total[n].update(block[n])
    for source, block in [*rows, ("**all**", total)]:
        b, a = block["before"], block["after"]
        lines.append(
            f"| {source} | {b['entities']} -> {a['entities']} | "
            f"{b['fabricated_flagged']} -> {a['fabricated_flagged']} of {a['fabricated']} | "
            f"{b['true_flagged']} -> {a['true_flagged']} | "
            f"{b['unlabelled_flagged']} -> {a['unlabelled_flagged']} | "
            f"{b['initial_unlabelled_flagged']} -> {a['initial_unlabelled_flagged']} |")
    return lines


if __name__ == "__main__":
    main()
