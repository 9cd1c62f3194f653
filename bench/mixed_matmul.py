"""Mixed-precision products (``observer.options.matmul``) against float32, in one process.

    nice -n 10 python -m bench.mixed_matmul           # speed (bench/results/mixed_matmul.json)
    nice -n 10 python -m bench.mixed_matmul --parts drift   # scores (mixed_matmul_drift.json)
    python -m bench.mixed_matmul --parts forward --rounds 5  # a smoke test

Run by hand (not by ``make bench``). One SmolLM2-135M-Instruct (torch, one thread) shared by an
observer per variant, each with its own packed weights: ``float32`` (the reference; the
default, ``auto``, is float16 where it runs), ``bfloat16`` (oneDNN: bfloat16 weights and
rows, float32 accumulation, a bfloat16 result widened back), ``float16`` (FBGEMM: float16
weights widened in registers, float32 rows and result) and ``q4_1`` (the GGUF Q4_1 blocks the
float32 weights were converted from, the head's Q8_0, rebuilt in registers by
``guardrail/observer/blockq.c``: float32's products), ``q4_1_q8`` and ``q4_1_q16`` (the same
blocks in integer products, the rows quantized per block of 32 to int8 or int16, as llama.cpp
does on the CPU). Everything outside the products stays
float32 in every variant. The variants take turns round by round
(the order reversed every other round), so they meet the same machine load; medians.

- ``ops``: every product of one forward (30 blocks' q/k/v, o, gate/up, down and the 49,152-row
  output head) for 1-72 rows, CPU ms, with the candidate kernels that were not picked beside the
  three variants: torch's ``linear`` on float32 and on bfloat16 weights, and FBGEMM's float16
  kernel through ``torch.ops.quantized.linear_dynamic_fp16`` (the fallback where torch lacks the
  functional form the variant calls);
- ``forward``: one read of the default policy (its layers, the logits, top-k) of 9 new tokens
  over about 200 cached, ``TorchObserver.extend``, CPU ms;
- ``stream``: the default policy (``Guard.default()``'s monitors) on SmolLM2's own answers fed
  word by word (bench/live_pace.py's streams and driver, reads ahead): tokens/s and CPU ms per
  token fed as fast as the guard takes it, and the added latency paced at 50 tokens/s;
- ``states``: each variant's states (layers 6, 15, 30) and logits against float32's on one
  text read 1, 4 and 9 tokens at a time: relative distance per token, top token agreement;
- ``cost``: bench/stream_cost.py's hidden-state setting on the torch observer (the harm monitor
  alone, a 1,000- and a 4,000-token stream fed word by word, reads when due) and NeMo's windowed
  scan of the same text on the float32 observer: CPU-s per 1,000 tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from .common import median, p95, results_dir, write_result

NAME = "mixed_matmul"
DRIFT_NAME = "mixed_matmul_drift"
VARIANTS = ["float32", "bfloat16", "float16", "q4_1", "q4_1_tail_q8", "q4_1_q8", "q4_1_q16"]
ROWS = [1, 2, 3, 4, 9, 16, 32, 72]
CONTEXT = ("Summarise what the Kepler Space Telescope found, in a few sentences. " * 14).strip()
READ_TOKENS = 9


def _say(message: str) -> None:
    print(f"[mixed_matmul] {message}", file=sys.stderr, flush=True)


def observers(variants: list[str]) -> dict[str, Any]:
    """One TorchObserver per variant over one loaded SmolLM2 (each packs its own weights)."""
    from guardrail.observer.hf import load_smollm2
    from guardrail.observer.model import TorchObserver
    from guardrail.policy import ObserverSpec

    first = load_smollm2(ObserverSpec(options={"threads": 1, "matmul": "float32"}))
    out = {}
    for variant in variants:
        if variant == "float32":
            out[variant] = first
            continue
        obs = TorchObserver(first.name, first.model, first.hf_tokenizer, first.window,
                            matmul=variant)
        obs.threads = first.threads
        out[variant] = obs
    return out


def _products(packed: Any) -> list[tuple[int, Callable[[Any], Any]]]:
    """(input width, product) of each of a forward's products on ``packed``'s weights."""
    out = []
    for block in packed.blocks:
        out += [(576, block.qkv), (576, block.o), (576, block.gate_up), (1536, block.down)]
    return [*out, (576, packed.head)]


def _candidates(model: Any, packs: dict[str, Any]) -> dict[str, list[tuple[int, Any]]]:
    """The variants' products and the kernels not picked, on the model's weights."""
    import torch

    def weights() -> list[torch.Tensor]:
        out = []
        for layer in model.base_model.layers:
            a, m = layer.self_attn, layer.mlp
            out += [torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]), a.o_proj.weight,
                    torch.cat([m.gate_proj.weight, m.up_proj.weight]), m.down_proj.weight]
        return [*out, model.get_output_embeddings().weight]

    with torch.inference_mode():
        plain = [w.detach().contiguous() for w in weights()]
        bf16 = [w.to(torch.bfloat16) for w in plain]
        fp16 = [torch.ops.quantized.linear_prepack_fp16(w, None) for w in plain]
    linear = torch.nn.functional.linear
    cands: dict[str, list[tuple[int, Any]]] = {
        f"{v} packed": _products(p) for v, p in packs.items()}
    cands["float32 linear"] = [(int(w.shape[1]), lambda x, w=w: linear(x, w)) for w in plain]
    cands["bfloat16 linear"] = [
        (int(w.shape[1]), lambda x, w=w: linear(x.to(torch.bfloat16), w).float()) for w in bf16]
    cands["float16 quantized op"] = [
        (int(w.shape[1]), lambda x, p=p: torch.ops.quantized.linear_dynamic_fp16(x, p))
        for w, p in zip(plain, fp16, strict=True)]
    return cands


OPS_LOAD: list[float] = []  # the 1-minute load average after each round of ``ops``


def part_ops(obs: dict[str, Any], rounds: int, candidates: bool = True) -> dict[str, Any]:
    import torch

    first = next(iter(obs.values()))
    cands = _candidates(first.model, {v: o.packed for v, o in obs.items()})
    if not candidates:  # the variants' own products only
        cands = {name: c for name, c in cands.items() if name.endswith(" packed")}
    samples: dict[tuple[str, int], list[float]] = {}
    OPS_LOAD.clear()
    with torch.inference_mode():
        inputs = {(w, n): torch.randn(1, n, w) for w in (576, 1536) for n in ROWS}
        for r in range(rounds + 1):
            names = list(cands) if r % 2 == 0 else list(cands)[::-1]
            for n in ROWS:
                for name in names:
                    c0 = time.process_time()
                    for width, product in cands[name]:
                        product(inputs[(width, n)])
                    if r:  # round 0 warms up
                        samples.setdefault((name, n), []).append(
                            1000 * (time.process_time() - c0))
            OPS_LOAD.append(os.getloadavg()[0])
    out: dict[str, Any] = {}
    for name in cands:
        out[name] = {}
        for n in ROWS:
            ms = median(samples[(name, n)])
            base = median(samples[("float32 packed", n)])
            out[name][str(n)] = {"cpu_ms": round(ms, 2), "speedup": round(base / ms, 3)}
    _say(f"ops: { {k: v['9'] for k, v in out.items()} }")
    return out


def part_forward(obs: dict[str, Any], needs: Any, rounds: int) -> dict[str, Any]:
    import torch

    first = next(iter(obs.values()))
    messages = [{"role": "user", "content": CONTEXT}]
    words = first.tokenizer.tokenize("The telescope watched about 150,000 stars in one patch "
                                     "of sky for four years, and dips in their light revealed "
                                     "planets. " * 2)[:READ_TOKENS]
    states = {v: o.start(messages, needs) for v, o in obs.items()}
    cached = states["float32"].kv.length()
    samples: dict[str, list[tuple[float, float]]] = {v: [] for v in obs}
    with torch.inference_mode():
        for r in range(rounds + 1):
            for v in (list(obs) if r % 2 == 0 else list(obs)[::-1]):
                o, state = obs[v], states[v]
                w0, c0 = time.perf_counter(), time.process_time()
                o.extend(state, words, needs)
                cpu, wall = time.process_time() - c0, time.perf_counter() - w0
                o.truncate(state, 0)
                if r:
                    samples[v].append((1000 * cpu, 1000 * wall))
    base = median([c for c, _ in samples["float32"]])
    out = {v: {"cpu_ms": round(median([c for c, _ in s]), 2),
               "wall_ms": round(median([w for _, w in s]), 2),
               "speedup": round(base / median([c for c, _ in s]), 3)}
           for v, s in samples.items()}
    _say(f"forward ({READ_TOKENS} tokens over {cached}): {out}")
    return {"new_tokens": READ_TOKENS, "cached_tokens": cached, "rounds": rounds, "rows": out}


STATE_LAYERS = (6, 15, -1)  # HF layers 6, 15 and 30 (the last)
STATE_STEPS = (1, 4, 9)


def part_states(obs: dict[str, Any]) -> dict[str, Any]:
    """Each variant's states and logits against float32's: one text (the forward part's
    context as the prompt, SmolLM2's answer words read ``STATE_STEPS`` tokens at a time)."""
    import torch

    from guardrail.monitor import Needs

    needs = Needs(layers=frozenset(STATE_LAYERS), logits=True)
    messages = [{"role": "user", "content": CONTEXT}]
    base = obs["float32"]
    tokens = base.tokenizer.tokenize(
        "The telescope watched about 150,000 stars in one patch of sky for four years, and "
        "dips in their light revealed planets: thousands of them, many the size of Earth, some "
        "in the zone where water could be liquid. It showed that planets are common. " * 2)

    def read(o: Any, step: int) -> tuple[dict[int, Any], Any]:
        state = o.start(messages, needs)
        parts = [o.extend(state, tokens[i:i + step], needs)
                 for i in range(0, len(tokens), step)]
        return ({k: torch.cat([p.hidden[k] for p in parts]) for k in STATE_LAYERS},
                torch.cat([p.logits for p in parts]))

    def dist(a: Any, b: Any) -> dict[str, float]:
        r = (a - b).norm(dim=-1) / b.norm(dim=-1)
        return {"median": float(r.median()), "max": float(r.max())}

    with torch.inference_mode():
        want_h, want_l = read(base, 9)
        out: dict[str, Any] = {}
        for v, o in obs.items():
            if v == "float32":
                continue
            rows = {}
            for step in STATE_STEPS:
                h, logits = read(o, step)
                rows[str(step)] = {
                    **{f"layer {k if k >= 0 else 30}": dist(h[k], want_h[k])
                       for k in STATE_LAYERS},
                    "logits": dist(logits, want_l),
                    "top1_agree": float((logits.argmax(-1) == want_l.argmax(-1)).float().mean())}
            out[v] = rows
            _say(f"states {v}: {rows}")
    return {"tokens": len(tokens), "steps": list(STATE_STEPS), "rows": out}


def part_stream(obs: dict[str, Any], rounds: int, tokens: int) -> dict[str, Any]:
    from guardrail import Guard
    from guardrail.guard import default_policy

    from .live_pace import PACE, _answers, _stream

    policy = default_policy()
    guards = {v: Guard(policy, observer=o) for v, o in obs.items()}
    streams = _answers(guards["float32"].tokenizer, tokens)
    for guard in guards.values():
        _stream(guard, streams[0][0], streams[0][1][:12], None)  # warm-up
    out: dict[str, Any] = {}
    for mode, pace in (("fast", None), ("paced", PACE)):
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in guards}
        for r in range(rounds):
            for k, (prompt, deltas) in enumerate(streams):
                order = list(guards) if (k + r) % 2 == 0 else list(guards)[::-1]
                for v in order:
                    runs[v].append(_stream(guards[v], prompt, deltas, pace))
        for v, done in runs.items():
            n = sum(d["tokens"] for d in done)
            lat = [x * 1000 for d in done for x in d["latencies"]]
            row = out.setdefault(v, {})
            row[mode] = {"tokens": n,
                         "tokens_per_s": round(n / sum(d["wall"] for d in done), 1),
                         "cpu_ms_per_token": round(1000 * sum(d["cpu"] for d in done) / n, 2),
                         "latency_p50_ms": round(median(lat), 1),
                         "latency_p95_ms": round(p95(lat), 1),
                         "reads": sum(d["reads"] for d in done),
                         "halted": sum(bool(d["halted"]) for d in done)}
        _say(f"stream {mode}: { {v: out[v][mode] for v in out} }")
    return {"answer_tokens": tokens, "pace": PACE, "rounds": rounds, "rows": out}


def part_cost(obs: dict[str, Any], rounds: int, lengths: list[int]) -> dict[str, Any]:
    from guardrail import Guard

    from .common import timed
    from .stream_cost import make_deltas, nemo_texts, ours, scan

    policy = {"observer": {"model": "smollm2-135m"},
              "monitors": [{"id": "harmful-content", "use": "harmful-content"}]}
    guards = {v: Guard.from_policy(policy, observer=o) for v, o in obs.items()}
    for guard in guards.values():
        scan(guard, "warm up " * 8)
    cpu: dict[tuple[str, int], list[float]] = {}
    for n in lengths:
        deltas = make_deltas(n)
        texts = nemo_texts(deltas)
        for r in range(rounds):
            for v in (list(guards) if r % 2 == 0 else list(guards)[::-1]):
                _, c = timed(partial(ours, guards[v], deltas))
                cpu.setdefault((f"ours {v}", n), []).append(c)
                _, c = timed(partial(_scan_all, guards[v], texts))
                cpu.setdefault((f"nemo {v}", n), []).append(c)
            last = {k[0]: round(got[-1], 2) for k, got in cpu.items() if k[1] == n}
            _say(f"cost {n} round {r}: {last}")
    rows: dict[str, Any] = {}
    for (name, n), got in cpu.items():
        rows.setdefault(name, {})[str(n)] = {
            "cpu_s": [round(c, 2) for c in got], "median_cpu_s": round(median(got), 2),
            "cpu_s_per_1k_tokens": round(1000 * median(got) / n, 2)}
    return {"lengths": lengths, "rounds": rounds, "monitor": "harmful-content", "rows": rows}


HARM_DATA = "harmful-content/data/test.jsonl"  # under the guardrail cache (the built split)
ENTITY_DATA = "entity-data/test.sub.jsonl"  # bench/entity_eval's test records
ENTITY_ALL = "entity-data/test.jsonl"  # the whole entity test split (--large)
DRIFT_LARGE_NAME = "mixed_matmul_drift_large"
# --large: up to this many harm test records per (source, label), every ENTITY_EVERY-th entity
# test record (the whole splits, 2,113 + 868 records, would take hours per variant here)
LARGE_PER_CELL = 20
ENTITY_EVERY = 3
HARM_PER_CELL = 6  # harm records per (source, label)
ENTITY_RECORDS = {"country": 35, "city": 25, "garak": 40}


def drift_records(large: bool = False) -> tuple[list[Any], list[Any]]:
    """The fixed sample: harm test records, up to ``HARM_PER_CELL`` per source and label (the
    first in file order), and entity test records by kind; each labels only its own monitor.
    ``large``: up to ``LARGE_PER_CELL`` harm records per source and label and every
    ``ENTITY_EVERY``-th record of the whole entity test split (both built when missing)."""
    import json

    from guardrail.cache import cache_dir
    from guardrail.toolkit.records import Record, SpanLabel

    per_cell = LARGE_PER_CELL if large else HARM_PER_CELL
    if large:
        _build_test_splits()
    harm: list[Any] = []
    cells: dict[tuple[str, int], int] = {}
    for line in (cache_dir() / HARM_DATA).read_text("utf-8").splitlines():
        row = json.loads(line)
        cell = (row.get("source_tag", ""), int(row["label"]))
        if cells.get(cell, 0) < per_cell:
            cells[cell] = cells.get(cell, 0) + 1
            harm.append(Record(row["prompt"], row["response"], int(row["label"]),
                               extra={"monitors": ["harm"], "source": cell[0]}))
    entity: list[Any] = []
    kinds: dict[str, int] = {}
    lines = (cache_dir() / (ENTITY_ALL if large else ENTITY_DATA)).read_text(
        "utf-8").splitlines()
    for n, line in enumerate(lines):
        row = json.loads(line)
        kind = row.get("kind", "")
        if (n % ENTITY_EVERY == 0) if large else kinds.get(kind, 0) < ENTITY_RECORDS.get(kind, 0):
            kinds[kind] = kinds.get(kind, 0) + 1
            spans = tuple(SpanLabel(s["start"], s["end"], int(s["label"]))
                          for s in row["spans"])
            entity.append(Record(row["prompt"], row["response"], int(row["label"]), spans,
                                 extra={"monitors": ["facts"], "source": kind}))
    return harm, entity


def _build_test_splits() -> None:
    """Both plugins' offline data builds into the guardrail cache (seconds; the harm build is
    byte-identical every run, the entity build skipped when present)."""
    from guardrail_entity_hallucination.training.features import build_data
    from guardrail_harmful_content.training.data import BuildConfig, build_dataset

    from guardrail.cache import cache_dir

    build_dataset(cache_dir() / "harmful-content" / "data", BuildConfig())
    build_data(cache_dir() / "entity-data")


# what guardrail.toolkit.evaluate accumulates per monitor
_ACC = ("labels", "max", "fired", "first", "tokens", "tok_scores", "tok_labels", "span_scores",
        "span_labels")


def _read(guard: Any, prompt: str, deltas: list[str]) -> tuple[Any, list[tuple[int, int]]]:
    """A dry-run session over ``deltas``: its report (scores recorded) and token offsets."""
    session = guard.session(prompt=prompt, record_scores=True, dry_run=True)
    for delta in deltas:
        session.feed(delta)
    report = session.finish()
    return report, session.token_offsets()


def _first(report: Any, monitor: str) -> int | None:
    """The token of ``monitor``'s first verdict (where a halt would land), or None."""
    return min((f.tokens[1] for f in report.flags if f.monitor == monitor), default=None)


def part_drift(obs: dict[str, Any], large: bool = False) -> dict[str, Any]:
    """Each variant's scores and verdicts against float32's on the fixed sample (``large``:
    the larger one) and the demo's replays, the default policy; records read in one feed
    (one forward and the rest at the end: the per-token scores of a stream fed word by word,
    to float noise)."""
    from guardrail import Guard
    from guardrail.guard import default_policy
    from guardrail.toolkit.demo import _replays
    from guardrail.toolkit.evaluate import _accumulate, _metrics
    from guardrail.toolkit.records import random_splits

    harm, entity = drift_records(large)
    policy = default_policy()
    guards = {v: Guard(policy, observer=o) for v, o in obs.items()}
    specs = {spec.id: spec for spec, _ in guards["float32"].monitors}
    reports: dict[str, dict[str, list[Any]]] = {v: {} for v in guards}
    metrics: dict[str, dict[str, Any]] = {v: {} for v in guards}
    t0 = time.perf_counter()
    for name, records in (("harm", harm), ("entity", entity)):
        for v, guard in guards.items():
            acc: dict[str, dict[str, list[Any]]] = {mid: {k: [] for k in _ACC} for mid in specs}
            got = []
            for n, record in enumerate(records, 1):
                if n % 250 == 0:
                    _say(f"drift {name} {v}: {n} of {len(records)}")
                report, offsets = _read(guard, record.prompt, [record.response])
                got.append(report)
                for spec in specs.values():
                    _accumulate(acc[spec.id], record, spec, report, offsets)
            reports[v][name] = got
            metrics[v][name] = {mid: _metrics(guard, spec, acc[mid], None)
                                for mid, spec in specs.items()}
            _say(f"drift {name} {v}: {len(records)} records, "
                 f"{time.perf_counter() - t0:.0f} s")
    replays = _replays()
    for v, guard in guards.items():
        reports[v]["demo"] = [_read(guard, r["prompt"], random_splits(r["response"], seed=k))[0]
                              for k, r in enumerate(replays)]
    out: dict[str, Any] = {
        "records": {"large": large, "harm": len(harm), "entity": len(entity),
                    "demo": len(replays),
                    "harm_by_label": [sum(r.label == y for r in harm) for y in (0, 1)],
                    "entity_spans": sum(len(r.spans) for r in entity)},
        "thresholds": {mid: guards["float32"].threshold_of(spec) for mid, spec in specs.items()},
        "metrics": metrics, "variants": {}}
    base = reports["float32"]
    for v in guards:
        if v == "float32":
            continue
        row: dict[str, Any] = {}
        for name in ("harm", "entity", "demo"):
            row[name] = _compare(base[name], reports[v][name], out["thresholds"])
        row["demo_outcomes"] = [
            {"title": r["title"], "expect": r.get("expect"),
             "float32": _outcome(a), v: _outcome(b)}
            for r, a, b in zip(replays, base["demo"], reports[v]["demo"], strict=True)]
        out["variants"][v] = row
        _say(f"drift {v}: {row}")
    return out


def _outcome(report: Any) -> dict[str, Any]:
    """A replay's outcome as the demo shows it (in a dry run: what would have happened)."""
    halts = [f for f in report.flags if f.action == "halt"]
    first = min(halts, key=lambda f: f.tokens[1]) if halts else None
    return {"halt_at": first.tokens[1] if first else None,
            "halt_by": first.monitor if first else None,
            "flags": {m: sum(f.monitor == m for f in report.flags)
                      for m in sorted({f.monitor for f in report.flags})}}


def _compare(base: list[Any], other: list[Any], thresholds: dict[str, float]
             ) -> dict[str, Any]:
    """Score differences and verdict changes of one variant's reports against float32's."""
    out: dict[str, Any] = {}
    for monitor, threshold in thresholds.items():
        diffs: list[float] = []
        agree = total = 0
        changed_first = fired_changed = 0
        moved: list[int] = []
        for a, b in zip(base, other, strict=True):
            sa, sb = dict(a.scores.get(monitor, [])), dict(b.scores.get(monitor, []))
            for k in sa.keys() & sb.keys():
                diffs.append(abs(sa[k] - sb[k]))
                agree += (sa[k] >= threshold) == (sb[k] >= threshold)
                total += 1
            fa, fb = _first(a, monitor), _first(b, monitor)
            if fa != fb:
                changed_first += 1
                if fa is None or fb is None:
                    fired_changed += 1
                else:
                    moved.append(abs(fa - fb))
        out[monitor] = {
            "scored_tokens": total,
            "max_abs_diff": round(max(diffs, default=0.0), 5),
            "median_abs_diff": round(median(diffs), 6) if diffs else None,
            "p99_abs_diff": round(sorted(diffs)[int(0.99 * (len(diffs) - 1))], 5)
            if diffs else None,
            "token_decisions_agree": round(agree / total, 5) if total else None,
            "token_decisions_differ": total - agree,
            "first_verdict_changed": changed_first,
            "fired_changed": fired_changed,
            "first_verdict_moved_tokens": sorted(moved),
            "fired": [sum(_first(r, monitor) is not None for r in rs) for rs in (base, other)],
        }
    return out


def _scan_all(guard: Any, texts: list[str]) -> None:
    from .stream_cost import scan

    for text in texts:
        scan(guard, text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", nargs="+", default=["ops", "forward", "stream", "cost"],
                        choices=["ops", "forward", "stream", "cost", "states", "drift"],
                        help="drift: written to mixed_matmul_drift.json (not run by default)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per part")
    parser.add_argument("--tokens", type=int, default=354, help="stream: answer tokens")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1000, 4000],
                        help="cost: stream lengths (tokens)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the parts of the last result that are not run now")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=None,
                        help="matmul variants (float32 always; default: all that run here)")
    parser.add_argument("--name", default=None, help="result name (default: mixed_matmul, "
                        "mixed_matmul_drift; a q4_1 run: mixed_matmul_q4_1, rendered after)")
    parser.add_argument("--no-candidates", action="store_true",
                        help="ops: the variants' products only, not the kernels not picked")
    parser.add_argument("--large", action="store_true", help="drift: the larger sample "
                        f"(written to {DRIFT_LARGE_NAME}.json)")
    args = parser.parse_args(argv)
    import torch

    from guardrail.guard import build_monitors, default_policy
    from guardrail.monitor import Needs
    from guardrail.observer.llama_step import matmul_unsupported

    torch.set_num_threads(1)
    variants = ["float32", *[v for v in (args.variants or VARIANTS) if v != "float32"]]
    for v in list(variants):
        if (why := matmul_unsupported(v)) is not None:
            if args.variants:
                parser.error(f"--variants {v}: {why}")
            _say(f"skipping {v}: {why}")
            variants.remove(v)
    obs = observers(variants)
    needs = Needs()
    for _, monitor in build_monitors(default_policy()):
        needs = needs.union(monitor.needs())
    result: dict[str, Any] = {"variants": variants, "torch": torch.__version__,
                              "threads": torch.get_num_threads(),
                              "load_1m_start": round(os.getloadavg()[0], 2)}
    previous = results_dir() / f"{args.name or NAME}.json"
    if args.merge and previous.exists():  # keep the parts not run now
        result = {**result, **json.loads(previous.read_text())}
    path = None
    for part in args.parts:
        t0 = time.perf_counter()
        if part == "ops":
            result["ops"] = part_ops(obs, args.rounds or 9, not args.no_candidates)
            result["ops_load_1m"] = [round(min(OPS_LOAD), 2), round(max(OPS_LOAD), 2)]
        elif part == "forward":
            result["forward"] = part_forward(obs, needs, args.rounds or 41)
        elif part == "stream":
            result["stream"] = part_stream(obs, args.rounds or 2, args.tokens)
        elif part == "cost":
            result["cost"] = part_cost(obs, args.rounds or 2, args.lengths)
        elif part == "states":
            result["states"] = part_states(obs)
        else:
            drift = part_drift(obs, args.large)
            name = args.name or (DRIFT_LARGE_NAME if args.large else DRIFT_NAME)
            _say(f"wrote {write_result(name, {**drift, 'torch': torch.__version__})}")
            continue
        result["load_1m_end"] = round(os.getloadavg()[0], 2)
        _say(f"{part}: {time.perf_counter() - t0:.0f} s")
        # after every part: a run stopped early keeps them
        path = write_result(args.name or NAME, result)
    if path is not None:
        _say(f"wrote {path}")


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def _forward_table(forward: dict[str, Any], variants: list[str], ratio: str,
                   ratio_of: Callable[[dict[str, Any]], float]) -> list[str]:
    """The forward part's table: one read of the default policy per variant, CPU and wall ms
    and ``ratio`` (``ratio_of`` a row)."""
    lines = [f"One read of the default policy (all 30 blocks, the logits, top-k) of "
             f"{forward['new_tokens']} new tokens over {forward['cached_tokens']} cached "
             f"(`TorchObserver.extend`, medians of {forward['rounds']}):", "",
             f"| matmul | CPU ms | wall ms | {ratio} |", "|---|---|---|---|"]
    for v in variants:
        r = forward["rows"][v]
        lines.append(f"| {v} | {r['cpu_ms']:.1f} | {r['wall_ms']:.1f} | {ratio_of(r):.2f}x |")
    return [*lines, ""]


def render(result: dict[str, Any]) -> str:
    variants = result.get("variants", VARIANTS)
    lines = ["## Mixed-precision products (`observer.options.matmul`)", "",
             "Run by hand (`nice -n 10 python -m bench.mixed_matmul`): one SmolLM2-135M-Instruct "
             "(torch, one thread) read by an observer per `observer.options.matmul` variant, each "
             "on its own packed weights: `float32` (the reference), `bfloat16` (oneDNN: bfloat16 "
             "weights and rows, float32 accumulation, the result widened back to float32) and "
             "`float16` (FBGEMM: float16 weights widened in registers, float32 rows and result). "
             "All else in a forward stays float32. The variants take turns round by round in one "
             f"process; medians. torch {result.get('torch')}, 1-minute load "
             f"{result.get('load_1m_start')} at the start and {result.get('load_1m_end')} at the "
             "end (the machine was shared). Ratios are against float32 in the same run "
             "(above 1: faster).", ""]
    ops = result.get("ops")
    if ops:
        rows = list(next(iter(ops.values())))
        lines += ["All of one forward's products (30 blocks' q/k/v, o, gate/up, down and the "
                  "49,152 x 576 output head), CPU ms by rows per product, with the kernels "
                  "tried and not picked:", "",
                  "| kernel | " + " | ".join(f"{n} rows" for n in rows) + " |",
                  "|---|" + "---|" * len(rows)]
        for name, by_rows in ops.items():
            lines.append(f"| {name} | " + " | ".join(
                f"{by_rows[n]['cpu_ms']:.1f} ({by_rows[n]['speedup']:.2f}x)" for n in rows)
                + " |")
        lines.append("")
    forward = result.get("forward")
    if forward:
        lines += _forward_table(forward, variants, "ratio", lambda r: r["speedup"])
    stream = result.get("stream")
    if stream:
        rows = stream["rows"]
        base = rows["float32"]
        lines += [f"One stream: the default policy on SmolLM2's own answers "
                  f"({stream['answer_tokens']} tokens, word deltas, reads ahead; "
                  f"bench/live_pace.py's streams and driver), {stream['rounds']} rounds. "
                  "*Fast*: fed as fast as the guard takes it; *paced*: at "
                  f"{stream['pace']:.0f} tokens/s, the added latency per released token "
                  "(p50 / p95) and the reads it took.", "",
                  "| matmul | tokens/s | ratio | CPU ms/token | ratio | paced: added latency "
                  "ms | reads |", "|---|---|---|---|---|---|---|"]
        for v in variants:
            f, p = rows[v]["fast"], rows[v]["paced"]
            lines.append(
                f"| {v} | {f['tokens_per_s']:.1f} | "
                f"{_ratio(f['tokens_per_s'], base['fast']['tokens_per_s'])} | "
                f"{f['cpu_ms_per_token']:.2f} | "
                f"{_ratio(base['fast']['cpu_ms_per_token'], f['cpu_ms_per_token'])} | "
                f"{p['latency_p50_ms']:.0f} / {p['latency_p95_ms']:.0f} | {p['reads']} |")
        lines.append("")
    cost = result.get("cost")
    if cost:
        rows = cost["rows"]
        lengths = [str(n) for n in cost["lengths"]]
        lines += ["Stream cost (bench/stream_cost.py's hidden-state setting on the torch "
                  "observer: the `harmful-content` monitor alone, reading to block 15, a stream "
                  "fed word by word with reads when due, against NeMo's windowed scan of the "
                  "same text, 200 tokens per check with 50 of context, scored by the same "
                  f"guard), CPU-s per 1,000 tokens, medians of {cost['rounds']}; *vs NeMo*: "
                  "against NeMo's scan on the float32 observer.", "",
                  "| scheme | " + " | ".join(f"{n} tokens | vs NeMo" for n in lengths) + " |",
                  "|---|" + "---|---|" * len(lengths)]
        for v in variants:
            for scheme in ("ours", "nemo"):
                by_n = rows[f"{scheme} {v}"]
                cells = []
                for n in lengths:
                    c = by_n[n]["cpu_s_per_1k_tokens"]
                    nemo = rows["nemo float32"][n]["cpu_s_per_1k_tokens"]
                    cells.append(f"{c:.2f} | {c / nemo:.2f}x")
                lines.append(f"| {scheme}, {v} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def render_drift(result: dict[str, Any]) -> str:
    rec = result["records"]
    if rec.get("large"):
        title = "### Mixed-precision products: a larger sample against float32"
        command = "--parts drift --large --variants float16"
        sample = (f"{rec['harm']} records of the harm test split (up to {LARGE_PER_CELL} per "
                  f"source and label; {rec['harm_by_label'][0]} benign, "
                  f"{rec['harm_by_label'][1]} harmful) and {rec['entity']} of the entity test "
                  f"split (every {ENTITY_EVERY}rd; {rec['entity_spans']} labelled spans)")
    else:
        title = "### Mixed-precision products: scores and verdicts against float32"
        command = "--parts drift"
        sample = (f"a fixed sample: {rec['harm']} records of the harm test split (up to "
                  f"{HARM_PER_CELL} per source and label; {rec['harm_by_label'][0]} benign, "
                  f"{rec['harm_by_label'][1]} harmful), {rec['entity']} entity test records "
                  f"({rec['entity_spans']} labelled spans; bench/entity_eval's test file)")
    lines = [title, "",
             f"Run by hand (`nice -n 10 python -m bench.mixed_matmul {command}`): the default "
             "policy (facts, harm, router) as dry-run sessions with each `matmul` variant "
             f"against float32, on {sample} and the demo's "
             f"{rec['demo']} replays. Records are read in one feed, the replays as the demo "
             "feeds them. *Max / p99 / median*: absolute difference of a token's score; "
             "*decisions*: tokens on the same side of the monitor's threshold; *first verdict*: "
             "records whose first verdict (for harm, where it halts) moved, as fired or not / "
             "moved by tokens; *fired*: records with a verdict, float32 then the variant.", "",
             "| matmul | records | monitor | max | p99 | median | decisions agree | first "
             "verdict changed | fired or not / moved by | fired |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for v, row in result["variants"].items():
        for name in ("harm", "entity", "demo"):
            for monitor, c in row[name].items():
                moved = ", ".join(str(m) for m in c["first_verdict_moved_tokens"]) or "-"
                agree = c["token_decisions_agree"]
                lines.append(
                    f"| {v} | {name} | {monitor} | {_small(c['max_abs_diff'])} | "
                    f"{c['p99_abs_diff']} | {c['median_abs_diff']} | "
                    f"{agree if agree is not None else '-'} ({c['token_decisions_differ']} "
                    f"differ) | {c['first_verdict_changed']} | {c['fired_changed']} / "
                    f"{moved} | {c['fired'][0]} / {c['fired'][1]} |")
    lines += ["", "The monitors' metrics on the sample, each variant (harm: response AUC and "
              "macro-F1 of halting at all, on the harm records; facts: span AUC on the entity "
              "spans):", "", "| matmul | harm AUC | harm macro-F1 | harm false halts | "
              "facts span AUC | facts recall at 10% FPR |", "|---|---|---|---|---|---|"]
    for v, m in result["metrics"].items():
        harm, facts = m["harm"]["harm"], m["entity"]["facts"]
        lines.append(f"| {v} | {harm.get('auc', 0):.4f} | {harm.get('macro_f1', 0):.4f} | "
                     f"{harm.get('false_halt_rate', 0):.4f} | {facts.get('span_auc', 0):.4f} | "
                     f"{facts.get('recall_at_10fpr', 0):.4f} |")
    others = list(result["variants"])
    lines += ["", "The demo's replays (dry run: where each would halt, by which monitor, and flags "
              "by monitor), each variant:", "",
              "| replay | expects | " + " | ".join(["float32", *others]) + " |",
              "|---|---|" + "---|" * (1 + len(others))]
    outcomes = [row["demo_outcomes"] for row in result["variants"].values()]
    for k, d in enumerate(outcomes[0]):
        cells = []
        for o in [d["float32"], *[outcomes[j][k][v] for j, v in enumerate(others)]]:
            flags = ", ".join(f"{m} {n}" for m, n in o["flags"].items()) or "no flags"
            halt = f"halt at {o['halt_at']} ({o['halt_by']})" if o["halt_at"] is not None \
                else "no halt"
            cells.append(f"{halt}; {flags}")
        lines.append(f"| {d['title']} | {d['expect']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _small(x: float) -> str:
    """A score difference: four places, or the order of one too small for them."""
    return f"{x:.4f}" if x == 0 or x >= 5e-5 else f"{x:.0e}"


def render_serve(result: dict[str, Any]) -> str:
    """bench/serve_pace.py run with ``--variant`` per matmul (its result, copied here)."""
    rows = {"float32": result["ours"],
            **{name: v["rows"] for name, v in result.get("variants", {}).items()}}
    lines = ["### Mixed-precision products behind `guardrail serve`", "",
             "bench/serve_pace.py (run by hand: `--levels "
             f"{' '.join(str(n) for n in result['levels'])} --rounds {result['rounds']} "
             "--no-nemo --variant 'bfloat16={\"matmul\": \"bfloat16\"}' --variant "
             "'float16={\"matmul\": \"float16\"}'`, its result copied to "
             "`mixed_matmul_serve.json`): the default policy behind `guardrail serve`, one "
             "proxy per variant taking turns round by round, each upstream at 25 words/s (a "
             "word per chunk, the benchmark's unit then). "
             "Columns as in \"Hidden-state policies under concurrency\".", "",
             "| matmul | streams | pace min / median | below pace | added gap p95, ms | "
             "CPU-s / 1k tokens | reads / forward | read wait, ms | crossings | leaks | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, by_level in rows.items():
        for n, r in by_level.items():
            lines.append(
                f"| {name} | {n} | {r['pace_min']} / {r['pace_median']} | "
                f"{r['streams_below_pace']} of {r['streams_run']} | {r['added_gap_p95_ms']} | "
                f"{r['cpu_s_per_1k_tokens']} | {r.get('reads_per_forward')} | "
                f"{r.get('read_wait_ms')} | {r['crossings']} | {r['leaks_past_hold_back']} | "
                f"{r.get('load_1m_mean')} |")
    return "\n".join(lines)


def render_q4_1(result: dict[str, Any]) -> str:
    """``--variants float16 q4_1 --name mixed_matmul_q4_1``: the speed parts on a later machine
    (AVX2, no AVX-512), kept apart from the run above."""
    head = ("### Mixed-precision products with `q4_1`\n\nRun by hand (`nice -n 10 python -m "
            "bench.mixed_matmul --parts ops forward stream --variants float16 q4_1 --name "
            "mixed_matmul_q4_1`) on this project's later machine (an AMD EPYC with AVX2 and no "
            "AVX-512: no bfloat16 kernels), as the section above: `q4_1` keeps the weights as "
            "the GGUF Q4_1 blocks the float32 weights were converted from (the head as its Q8_0 "
            "blocks) and rebuilds them in registers (guardrail/observer/blockq.c): float32's "
            "products at 5.5 and 9 bits a weight. The variants take turns round by round in one "
            f"process; medians. torch {result.get('torch')}, 1-minute load "
            f"{result.get('load_1m_start')} at the start and {result.get('load_1m_end')} at the "
            "end (the machine was shared with two other jobs). Ratios are against float32 in the "
            "same run (above 1: faster).\n\n")
    body = render(result).split("\n", 4)[4]  # without the title and the first paragraph
    return head + body


def _q4_1_drift(result: dict[str, Any], title: str, command: str) -> str:
    """``render_drift`` under another title, naming the run's own command."""
    rest = render_drift(result).split("\n", 1)[1]
    rest = rest.replace("--parts drift`", f"--parts drift --variants q4_1 --name {command}")
    return f"### Mixed-precision products with `q4_1`: {title}\n{rest}"


def render_q4_1_drift(result: dict[str, Any]) -> str:
    return _q4_1_drift(result, "scores and verdicts against float32", f"{Q4_1_DRIFT_NAME}`")


def render_q4_1_panel(result: dict[str, Any]) -> str:
    """``--variants float16 q4_1 --name mixed_matmul_q4_1b``: the same after the kernel's
    many-row path moved to a rebuilt panel and a register-blocked micro-kernel."""
    head = ("### Mixed-precision products with `q4_1`: the panel kernel\n\nRun by hand (`nice -n "
            "10 python -m bench.mixed_matmul --parts ops forward --variants float16 q4_1 --name "
            "mixed_matmul_q4_1b`) on the same machine as the section above, after the kernel's "
            "path for 5 rows or more changed: a chunk of output rows' weights is rebuilt once "
            "per call into a float32 panel and multiplied by a micro-kernel holding 3 rows x 4 "
            "outputs of sums in registers (up to 4 rows unchanged). The variants take turns "
            f"round by round in one process; medians. torch {result.get('torch')}, 1-minute "
            f"load {result.get('load_1m_start')} at the start and {result.get('load_1m_end')} "
            "at the end (the machine was shared with two other jobs). Ratios are against "
            "float32 in the same run (above 1: faster).\n\n")
    body = render(result).split("\n", 4)[4]
    return head + body


def render_q4_1_panel_drift(result: dict[str, Any]) -> str:
    return _q4_1_drift(result, "the panel kernel's scores and verdicts",
                       f"{Q4_1_PANEL_DRIFT_NAME}`, the panel kernel")


def render_q4_1_int(result: dict[str, Any]) -> str:
    """``--parts ops forward states --no-candidates --variants float16 q4_1 q4_1_q8 q4_1_q16
    --name mixed_matmul_q4_1_int``: the integer products against float16 and q4_1."""
    variants = result["variants"]
    lo, hi = result.get("ops_load_1m", [None, None])
    lines = ["### Integer products on SmolLM2's Q4_1 blocks (`q4_1_q8`, `q4_1_q16`)", "",
             "Run by hand (`nice -n 10 python -m bench.mixed_matmul --parts ops forward states "
             "--no-candidates --variants float16 q4_1 q4_1_q8 q4_1_q16 --name "
             f"{Q4_1_INT_NAME}`) on the machine of the sections above (AMD EPYC, Zen 3: AVX2, "
             "FMA, F16C, no AVX-512 or VNNI; two cores shared with other jobs): `q4_1_q8` and "
             "`q4_1_q16` multiply the same Q4_1 blocks (the head's Q8_0) in integers, each row "
             "quantized per block of 32 to int8 or int16 on every product "
             "(guardrail/observer/blockq.c, \"Integer products\"). One thread; the variants "
             f"take turns round by round in one process; medians. torch {result.get('torch')}, "
             f"1-minute load {result.get('load_1m_start')} at the start, {lo}-{hi} during the "
             f"products part and {result.get('load_1m_end')} at the end.", ""]
    ops = result.get("ops")
    if ops:
        rows = list(next(iter(ops.values())))
        half = ops["float16 packed"]
        lines += ["All of one forward's products (30 blocks' q/k/v, o, gate/up, down and the "
                  "49,152 x 576 output head), CPU ms by rows per product, and float16's time "
                  "over the variant's (above 1: faster than float16, the default):", "",
                  "| matmul | " + " | ".join(f"{n} rows" for n in rows) + " |",
                  "|---|" + "---|" * len(rows)]
        for v in variants:
            by_rows = ops[f"{v} packed"]
            lines.append(f"| {v} | " + " | ".join(
                f"{by_rows[n]['cpu_ms']:.1f} ({half[n]['cpu_ms'] / by_rows[n]['cpu_ms']:.2f}x)"
                for n in rows) + " |")
        lines.append("")
    forward = result.get("forward")
    if forward:
        f16 = forward["rows"]["float16"]["cpu_ms"]
        lines += _forward_table(forward, variants, "vs float16", lambda r: f16 / r["cpu_ms"])
    states = result.get("states")
    if states:
        lines += [f"States and logits against float32's products ({states['tokens']} tokens of "
                  "answer after the forward part's prompt, read 1, 4 and 9 tokens at a time): "
                  "relative distance per token (`|a - b| / |b|`), median / max, and the share "
                  "of tokens whose top logit is float32's:", "",
                  "| matmul | tokens a read | layer 6 | layer 15 | layer 30 | logits | top "
                  "token |", "|---|---|---|---|---|---|---|"]
        for v, by_step in states["rows"].items():
            for step, r in by_step.items():
                cells = [f"{r[k]['median']:.1e} / {r[k]['max']:.1e}"
                         for k in ("layer 6", "layer 15", "layer 30", "logits")]
                lines.append(f"| {v} | {step} | " + " | ".join(cells)
                             + f" | {r['top1_agree']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def render_q4_1_int_drift(result: dict[str, Any]) -> str:
    rest = render_drift(result).split("\n", 1)[1]
    variants = " ".join(result["variants"])
    rest = rest.replace("--parts drift`", f"--parts drift --variants {variants} --name "
                        f"{Q4_1_INT_DRIFT_NAME}`")
    return f"### Integer products on SmolLM2's Q4_1 blocks: scores and verdicts\n{rest}"


def render_tail_drift(result: dict[str, Any]) -> str:
    rest = render_drift(result).split("\n", 1)[1]
    rest = rest.replace("--parts drift`", f"--parts drift --variants q4_1_tail_q8 --name "
                        f"{TAIL_DRIFT_NAME}`")
    return ("### Integer products past the layers read (`q4_1_tail_q8`): scores and verdicts\n"
            f"{rest}")


TAIL_DRIFT_NAME = "mixed_matmul_tail_drift"
Q4_1_INT_NAME = "mixed_matmul_q4_1_int"
Q4_1_INT_DRIFT_NAME = "mixed_matmul_q4_1_int_drift"
Q4_1_NAME = "mixed_matmul_q4_1"
Q4_1_DRIFT_NAME = "mixed_matmul_q4_1_drift"
Q4_1_PANEL_NAME = "mixed_matmul_q4_1b"
Q4_1_PANEL_DRIFT_NAME = "mixed_matmul_q4_1b_drift"
EXTRA_RESULTS = {DRIFT_NAME: render_drift, DRIFT_LARGE_NAME: render_drift,
                 "mixed_matmul_serve": render_serve, Q4_1_NAME: render_q4_1,
                 Q4_1_DRIFT_NAME: render_q4_1_drift, Q4_1_PANEL_NAME: render_q4_1_panel,
                 Q4_1_PANEL_DRIFT_NAME: render_q4_1_panel_drift,
                 Q4_1_INT_NAME: render_q4_1_int, Q4_1_INT_DRIFT_NAME: render_q4_1_int_drift,
                 TAIL_DRIFT_NAME: render_tail_drift}


if __name__ == "__main__":
    main()
