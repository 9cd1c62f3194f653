"""Which prompt span should the harm head's prompt term pool in a multi-turn conversation?

The shipped head adds ``t = sum_j prompt_weight[j] . c_j`` to every prefix logit, ``c_j`` the mean
of layer ``layers[j]``'s rows over the context's pooled span (``guardrail/observer/context.py``).
This compares four spans, each equal to the shipped one for a conversation of one user message:

- ``last``: the last user message's content through the assistant header (shipped);
- ``first``: from the first user message's content through the assistant header (everything but
  the system prompt);
- ``extend8``: ``last``, started at earlier user messages' content while the user contents it
  covers hold fewer than 8 tokens (a short follow-up reaches back to the request before it);
- ``users``: the user turns only: each earlier user message's content, then ``last``; a
  token-weighted mean that skips the assistant turns.

For each span, every record streams through the real default guard narrowed to ``harm``
(``guardrail eval --monitor harm``: dry run, random-sized deltas, the shipped rule), with the
stream's prompt term replaced by the span's (clipped to the head's range, as the monitor clips).
The term the runtime itself computed is kept and compared with each span's (``runtime_gap``: the
runtime's own span is the one within float error). The spans' rows come from one plain Hugging
Face forward over the rendered context; where a span starts and ends is found as ``context.py``
finds it, by rendering the conversation with a message's content replaced by two probe strings.

Data: ``bench/prompt_span_dev.jsonl`` (96 hand-written multi-turn conversations with an answer,
half harmful compliance; written for this decision, not a held-out set), and a seeded sample of
single-turn records of the harm test split (50 harmful, 50 benign; built by
``python -m guardrail_harmful_content.training.data build --out DIR`` when
``~/.cache/guardrail/harmful-content/data/test.jsonl`` is missing), where every span is the
shipped one by construction, to confirm that nothing changes there. Run by hand (about 8 minutes
on one CPU thread); writes ``bench/results/prompt_span.json``::

    OMP_NUM_THREADS=1 nice -n 10 python -m bench.prompt_span [--limit N] [--single N]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .common import ROOT, write_result

NAME = "prompt_span"
DEV = ROOT / "bench" / "prompt_span_dev.jsonl"
TEST_SPLIT = Path("~/.cache/guardrail/harmful-content/data/test.jsonl").expanduser()
SPANS = ("last", "first", "extend8", "users")
SHORT = 8  # tokens: a last user message shorter than this is a "short follow-up"

Render = Callable[[Sequence[Any]], list[int]]
Segments = list[tuple[int, int]]


def _bounds(render: Render, messages: list[dict[str, str]], k: int, length: int
            ) -> tuple[int, int]:
    """Where message ``k``'s content lies in ``render(messages)`` (``length`` ids): its start is
    the first token where two renderings with probe contents differ, its end where their common
    tail begins (as ``context.prompt_start`` finds the start)."""
    from guardrail.observer.context import PROBES

    a, b = (render([*messages[:k], {**messages[k], "content": p}, *messages[k + 1:]])
            for p in PROBES)
    same = min(len(a), len(b))
    start = next((i for i in range(same) if a[i] != b[i]), same)
    tail = next((i for i in range(same) if a[-1 - i] != b[-1 - i]), same)
    return start, max(start, length - tail)


def span_segments(render: Render, messages: list[dict[str, str]], span: str) -> Segments:
    """The rows ``span`` pools, as ``[start, end)`` segments of ``render(messages)``."""
    from guardrail.observer.context import prompt_start

    length = len(render(messages))
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not users:  # every span: the runtime's start without a user message
        return [(prompt_start(render, messages), length)]
    bounds = {k: _bounds(render, messages, k, length) for k in users}
    shipped = bounds[users[-1]][0]
    if span == "last" or len(users) < 2:
        return [(shipped, length)]
    if span == "first":
        return [(bounds[users[0]][0], length)]
    if span == "extend8":
        j, covered = len(users) - 1, bounds[users[-1]][1] - bounds[users[-1]][0]
        while covered < SHORT and j > 0:
            j -= 1
            covered += bounds[users[j]][1] - bounds[users[j]][0]
        return [(bounds[users[j]][0], length)]
    if span == "users":
        return [bounds[k] for k in users[:-1]] + [(shipped, length)]
    raise ValueError(span)


def _rows(inner: Any, ids: list[int], layers: Sequence[int]) -> dict[int, np.ndarray]:
    """Each layer's rows over ``ids``, from one plain HF forward (float32)."""
    import torch

    with torch.inference_mode():
        out = inner.model.base_model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return {layer: out.hidden_states[inner.hidden_index(layer)][0].float().numpy()
            for layer in layers}


def record_terms(guard: Any, monitor: Any, messages: list[dict[str, str]]
                 ) -> tuple[dict[str, float], dict[str, Any]]:
    """Each span's unclipped prompt term for one conversation, and facts about it."""
    from guardrail.observer.model import render_context

    inner = guard.observer.inner
    render: Render = lambda m: render_context(inner.hf_tokenizer, m)  # noqa: E731
    ids = render(messages)
    if len(ids) > inner.window - inner.window // 4:
        raise ValueError(f"a context of {len(ids)} tokens would be cut; keep conversations short")
    rows = _rows(inner, ids, monitor.layers)
    terms, facts = {}, {}
    for span in SPANS:
        segments = span_segments(render, messages, span)
        pooled = [np.concatenate([rows[layer][a:b] for a, b in segments]).astype(np.float64)
                  .mean(0) for layer in monitor.layers]
        terms[span] = math.fsum(float(w @ c) for w, c in zip(monitor._prompt, pooled,
                                                              strict=True))
        facts[span] = sum(b - a for a, b in segments)
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    last = _bounds(render, messages, users[-1], len(ids)) if users else (0, 0)
    return terms, {"rows": facts, "last_user_tokens": last[1] - last[0],
                   "user_turns": len(users)}


class _Override:
    """Replaces each harm stream's prompt term by the one a span gives (keyed by the stream's
    conversation), clipped as the monitor clips; keeps the term the runtime computed."""

    def __init__(self, cls: Any) -> None:
        self.cls = cls
        self.runtime: dict[str, float] = {}
        self.terms: dict[str, float] = {}
        self.pending: dict[int, str] = {}
        self._start, self._term = cls.start, cls._prompt_term
        override = self

        def start(monitor: Any, context: Any) -> Any:
            state = override._start(monitor, context)
            if state is not None and state.prompt is None:
                override.pending[id(state)] = json.dumps(context.messages, sort_keys=True)
            return state

        def prompt_term(monitor: Any, state: Any, features: Any) -> float:
            key = override.pending.pop(id(state), None) if state is not None else None
            term = override._term(monitor, state, features)
            if key is not None:
                override.runtime[key] = term
                _, low, high = monitor._prompt_range
                state.prompt = term = min(max(override.terms[key], low), high)
            return term

        cls.start, cls._prompt_term = start, prompt_term

    def restore(self) -> None:
        self.cls.start, self.cls._prompt_term = self._start, self._term


def _key(record: Any) -> str:
    return json.dumps(record.conversation(), sort_keys=True)


def _eval(guard: Any, records: list[Any], data: Path) -> tuple[dict[str, Any], list[dict]]:
    """``guardrail eval``'s harm metrics on ``data`` and each record's would-be halt."""
    from guardrail.toolkit.evaluate import evaluate

    rows: list[dict[str, Any]] = []

    def seen(i: int, record: Any, report: Any, offsets: Any) -> None:
        flags = [f for f in report.flags if f.monitor == "harm"]
        rows.append({"halted": bool(flags), "tokens": len(offsets),
                     "at": min((f.tokens[1] for f in flags), default=None)})

    result = evaluate(guard, data, on_stream=seen)
    metrics = result["monitors"]["harm"]
    keep = ("macro_f1", "precision", "recall", "false_halt_rate", "fraction_seen", "auc")
    return {k: metrics.get(k) for k in keep}, rows


def _describe(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    return {"n": len(values), "mean": statistics.fmean(values),
            "sd": statistics.pstdev(values) if len(values) > 1 else 0.0,
            "min": ordered[0], "median": statistics.median(ordered), "max": ordered[-1]}


def _groups(records: list[Any], facts: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Record indices per reported group: label, kind, short follow-ups."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, (r, f) in enumerate(zip(records, facts, strict=True)):
        groups["all"].append(i)
        groups[f"label {r.label}"].append(i)
        kind = r.extra.get("kind")
        if kind:
            groups[f"kind {kind}"].append(i)
        if f["last_user_tokens"] < SHORT and f["user_turns"] > 1:
            groups[f"short follow-up, label {r.label}"].append(i)
    return dict(groups)


def run_set(guard: Any, monitor: Any, override: _Override, records: list[Any], data: Path,
            spans: Sequence[str]) -> dict[str, Any]:
    """Every span's figures on one set of records."""
    terms, facts = [], []
    for r in records:
        t, f = record_terms(guard, monitor, r.conversation())
        terms.append(t)
        facts.append(f)
    _, low, high = monitor._prompt_range
    clip = lambda t: min(max(t, low), high)  # noqa: E731
    groups = _groups(records, facts)
    out: dict[str, Any] = {"records": len(records), "groups": {g: len(ix)
                                                               for g, ix in groups.items()}}
    per_span: dict[str, Any] = {}
    halts: dict[str, list[dict]] = {}
    for span in spans:
        override.terms = {_key(r): t[span] for r, t in zip(records, terms, strict=True)}
        override.runtime.clear()
        t0 = time.perf_counter()
        metrics, rows = _eval(guard, records, data)
        halts[span] = rows
        if span == spans[0]:  # the runtime's own term against each span's
            read = [(override.runtime[_key(r)], t) for r, t in zip(records, terms, strict=True)
                    if _key(r) in override.runtime]
            out["runtime_gap"] = {"streams": len(read), **{
                s: max(abs(term - clip(t[s])) for term, t in read) for s in spans}}
        by_group = {}
        for g, ix in groups.items():
            values = [clip(terms[i][span]) for i in ix]
            label = [records[i].label for i in ix]
            by_group[g] = {"term": _describe(values),
                           "halted": sum(rows[i]["halted"] for i in ix),
                           "harmful": sum(y == 1 for y in label)}
        per_span[span] = {
            **metrics,
            "term": _describe([clip(t[span]) for t in terms]),
            "clipped": sum(clip(t[span]) != t[span] for t in terms),
            "rows_mean": statistics.fmean(f["rows"][span] for f in facts),
            "groups": by_group,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        shown = " ".join(f"{k} {'-' if v is None else round(v, 3)}" for k, v in metrics.items())
        print(f"[prompt_span] {data.name} {span}: {shown}", file=sys.stderr)
    out["spans"] = per_span
    base = halts["last"]
    out["changed_vs_last"] = {
        span: {"verdicts": sum(a["halted"] != b["halted"] for a, b in zip(base, halts[span],
                                                                        strict=True)),
               "halt_tokens": sum(a["at"] != b["at"] for a, b in zip(base, halts[span],
                                                                   strict=True)),
               "max_term_gap": max(abs(t[span] - t["last"]) for t in terms)}
        for span in spans}
    out["per_record"] = [
        {"kind": r.extra.get("kind"), "label": r.label, "prompt": r.prompt[:60],
         "last_user_tokens": f["last_user_tokens"],
         "terms": {s: round(clip(t[s]), 3) for s in spans},
         "halted": {s: halts[s][i]["halted"] for s in spans}}
        for i, (r, t, f) in enumerate(zip(records, terms, facts, strict=True))]
    return out


def single_turn_sample(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` single-turn test records, half harmful, seeded."""
    if not TEST_SPLIT.exists():
        raise SystemExit(f"{TEST_SPLIT} is missing: python -m "
                         "guardrail_harmful_content.training.data build --out "
                         f"{TEST_SPLIT.parent}")
    rows = [json.loads(line) for line in TEST_SPLIT.open(encoding="utf-8") if line.strip()]
    rng = random.Random(seed)
    picked = []
    for label in (1, 0):
        pool = [r for r in rows if r.get("label") == label]
        picked += rng.sample(pool, min(len(pool), n // 2))
    return [{"prompt": r["prompt"], "response": r["response"], "label": r["label"],
             "kind": r.get("kind"), "source_tag": r.get("source_tag")} for r in picked]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit", type=int, help="only the first N dev records")
    parser.add_argument("--single", type=int, default=100, help="single-turn test records")
    parser.add_argument("--no-write", action="store_true", help="print, do not write results")
    args = parser.parse_args(argv)

    from guardrail_harmful_content.monitor import HarmfulContentMonitor

    from guardrail import Guard
    from guardrail.guard import default_policy
    from guardrail.toolkit.records import read_records

    guard = Guard(default_policy().narrowed(["harm"]))
    monitor = guard.monitors[0][1]
    assert isinstance(monitor, HarmfulContentMonitor) and monitor._prompt_range is not None
    override = _Override(HarmfulContentMonitor)
    result: dict[str, Any] = {"spans": list(SPANS), "short_tokens": SHORT,
                              "rule": {"threshold": guard.threshold_of(guard.monitors[0][0]),
                                       "k": monitor.k},
                              "clamp": dict(zip(("neutral", "low", "high"),
                                                monitor._prompt_range, strict=True))}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            dev = DEV
            if args.limit:
                dev = Path(tmp) / "dev.jsonl"
                dev.write_text("".join(DEV.read_text().splitlines(True)[:args.limit]))
            result["dev"] = run_set(guard, monitor, override, list(read_records(dev)), dev,
                                    SPANS)
            single = Path(tmp) / "single_turn.jsonl"
            single.write_text("".join(json.dumps(r) + "\n"
                                      for r in single_turn_sample(args.single)))
            result["single_turn"] = run_set(guard, monitor, override,
                                            list(read_records(single)), single, SPANS)
            result["single_turn"]["sample"] = f"test split, seed 0, {args.single} records"
    finally:
        override.restore()
    if args.no_write:
        print(json.dumps({k: v for k, v in result.items()}, indent=1)[:4000])
    else:
        print(write_result(NAME, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
