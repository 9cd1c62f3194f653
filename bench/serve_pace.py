"""Hidden-state policies under concurrency: the default policy behind ``guardrail serve`` against
NeMo Guardrails' streaming output rail with the same monitors, 1/8/32 streams at 25 tokens/s.

    python -m bench.serve_pace              # full run (writes bench/results/serve_pace.json)
    python -m bench.serve_pace --unit word  # a word per chunk (results: serve_pace_words.json)
    python -m bench.serve_pace --quick      # 1 and 2 streams, 40 words, NeMo defaults only

Ours: the recorded answers of guardrail/data/demo_replays.jsonl (harmful and benign; long ones
cut to ``WORDS`` words) are served token by token by the loopback upstream
(guardrail.testing.upstream, ``DELAY`` s between chunks: 25 tokens/s per stream, as an API
streams a token per delta; the tokens are the observer's, SmolLM2's). ``--unit word`` serves a
word per chunk at the same ``DELAY`` instead: 25 words/s, 29-36 of SmolLM2's tokens/s on these
answers. Either way the answers go through
``guardrail serve`` with the default policy (``Guard.default()``: the SmolLM2 observer, torch, and
the harm, facts and router monitors) in a subprocess with ``OMP_NUM_THREADS=1``. Each level runs
``--rounds`` rounds; in a round ``N`` async clients each stream one answer, all starting together.
Per concurrency level:

- *pace*: per stream, the upstream's time from request to its last chunk over the client's time
  from request to its last content (1.0: the reader is not held up beyond the upstream); a level
  keeps pace when every stream is at >= 0.95;
- *added chunk gap p95*: p95 of the gaps between content chunks at the client minus the same
  at the upstream (direct, same concurrency, no guard);
- *CPU-s per 1,000 tokens*: the proxy process's CPU time over the level / upstream tokens read
  (SmolLM2's tokens in the chunks read, either unit);
- *crossings*: streams whose verdicts (text shown, finish reason, guard events) differ from the
  same answer streamed alone; *leaks*: halted streams that showed text at or past the halting
  token; *past the verdict*: upstream chunks written after the halt verdict (a hook in the proxy
  stamps it) and past the halting chunk;
- *reads per forward*: observer reads (the streams' contexts included) over the batched
  observer's forwards at this level (``guard.observer.stats``); *read wait*: the mean time from
  a stream's read being due to its result (queued behind other forwards, then its own), from each
  session's report (``observer_seconds`` / ``observer_reads``); *spread*: batches the scheduler
  ran as several forwards at once on its forward workers (``observer.options.workers``).

``--variant NAME=JSON`` (repeatable) serves the default policy with those observer options too
(``--variant '1 worker={"workers": 1}'``), one proxy per variant beside the default's; at each
level the proxies take turns round by round, so they meet the same machine load. ``--baseline
PATH`` serves the default policy from the code of another checkout (an earlier commit) the same
way, to compare code changes in one run.

NeMo (in its own venv, .cache/peers/nemo; bench/peers/nemo_pace.py): the same answers from a
replaying LLM at the same pace, ``N`` concurrent ``stream_async`` calls, the output rail an
action that runs the same monitors (one Guard, the same observer) over the rail's text in a
worker thread. Configs: NeMo's defaults (chunk 200 tokens, context 50, stream first) and
a bounded-leak one (chunk 16, context 8, check first), in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import httpx

from .common import free_port, median, p95, wait_healthy, write_result
from .peer_nemo import NEMO_VENV

NAME = "serve_pace"
WORDS_NAME = "serve_pace_words"  # --unit word
DELAY = 0.04  # s between upstream chunks: 25 tokens/s
WORDS = 80  # longer answers are cut here (a 3.2 s stream)
PACE_KEPT = 0.95
ROOT = Path(__file__).resolve().parents[1]
NEMO_CONFIGS = [
    {"name": "nemo defaults (chunk 200, context 50, stream first)", "chunk_size": 200,
     "context_size": 50, "stream_first": True},
    {"name": "nemo chunk 16, context 8, check first", "chunk_size": 16, "context_size": 8,
     "stream_first": False},
]

# The proxy, with a hook that stamps each halt verdict (model field = stream id) in a file, and
# one that writes each stream's observer reads and the batched observer's counts in another.
PROXY_CODE = """
import json, sys, time
from guardrail import hookimpl
from guardrail.events import Halt
from guardrail.plugins import get_host

class VerdictClock:
    @hookimpl
    def guardrail_on_event(self, event, session):
        if isinstance(event, Halt):
            with open(sys.argv[1], "a") as out:
                out.write(json.dumps({"model": session.metadata.get("model"),
                                      "at": time.monotonic(), "at_char": event.at_char}) + "\\n")

    @hookimpl
    def guardrail_session_end(self, session, report):
        stats = getattr(session.guard.observer, "stats", None)
        with open(sys.argv[1] + ".reads", "a") as out:
            out.write(json.dumps({"model": session.metadata.get("model"),
                                  "reads": report.observer_reads,
                                  "observer_s": report.observer_seconds,
                                  "forwards": getattr(stats, "forwards", None),
                                  "all_reads": getattr(stats, "reads", None),
                                  "spread": getattr(stats, "spread", None),
                                  "workers": getattr(session.guard.observer, "workers", None)})
                      + "\\n")

get_host().register(VerdictClock(), name="bench-verdict-clock")
from guardrail.cli import main
sys.exit(main(sys.argv[2:]))
"""


def load_scripts(words: int = WORDS, unit: str = "token") -> list[dict[str, Any]]:
    """The replays cut to ``words`` words, in chunks of a token (SmolLM2's) or a word; each with
    its count of SmolLM2 tokens (what the CPU cost per 1,000 tokens divides by)."""
    from transformers import AutoTokenizer

    from guardrail.observer.hf import smollm2_dir
    from guardrail.observer.tokenization import HFTokenizer
    from guardrail.testing.upstream import split_words

    tokenizer = HFTokenizer(AutoTokenizer.from_pretrained(smollm2_dir()))
    text = resources.files("guardrail").joinpath("data/demo_replays.jsonl").read_text("utf-8")
    rows = [json.loads(x) for x in text.splitlines() if x.strip()]
    scripts = []
    for r in rows:
        answer = "".join(split_words(r["response"])[:words])
        spans = tokenizer.tokenize(answer)
        chunks = (split_words(answer) if unit == "word"
                  else [answer[a.start:b.start] for a, b in itertools.pairwise(spans)]
                  + [answer[spans[-1].start:]])
        assert "".join(chunks) == answer, r["title"]
        ends = list(itertools.accumulate(map(len, chunks)))  # a token counts in its first chunk
        starts = [span.start for span in spans]
        counts = [bisect.bisect_left(starts, end) for end in ends]
        scripts.append({"title": r["title"], "prompt": r["prompt"], "chunks": chunks,
                        "chunk_tokens": [b - a for a, b in zip([0, *counts], counts,
                                                               strict=False)]})
    return scripts


@dataclass
class StreamResult:
    script: int
    model: str
    started: float = 0.0  # time.monotonic(), the upstream's clock
    ok: bool = False
    error: str | None = None
    content: str = ""
    finish: str | None = None
    events: list[tuple[Any, ...]] = field(default_factory=list)
    halt_at_char: int | None = None
    content_times: list[float] = field(default_factory=list)

    @property
    def verdicts(self) -> tuple[Any, ...]:
        return (self.content, self.finish, tuple(self.events))


async def one_stream(client: httpx.AsyncClient, base_url: str, script: dict[str, Any], k: int,
                     model: str, messages: list[dict[str, str]] | None = None) -> StreamResult:
    """One streamed answer; ``messages``: the request's conversation (default: the script's
    prompt as the one user message)."""
    result = StreamResult(k, model, started=time.monotonic())
    body = {"model": model, "stream": True,
            "messages": messages or [{"role": "user", "content": script["prompt"]}]}
    try:
        async with client.stream("POST", f"{base_url}/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                result.error = f"HTTP {resp.status_code}"
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line[6:] == "[DONE]":
                    result.ok = result.error is None
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = str(chunk["error"].get("code"))
                    continue
                for event in (chunk.get("guardrail") or {}).get("events", []):
                    result.events.append((event["kind"], event["monitor"],
                                          tuple(event.get("span") or ()), event.get("at")))
                    if event["kind"] == "halt":
                        result.halt_at_char = event.get("at_char")
                for choice in chunk.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") or ""
                    result.finish = choice.get("finish_reason") or result.finish
                    if text:
                        result.content_times.append(time.monotonic())
                        if choice.get("finish_reason") != "content_filter":
                            result.content += text
    except (httpx.HTTPError, ValueError) as exc:
        result.error = type(exc).__name__
    if not result.ok and result.error is None:
        result.error = "no [DONE]"
    return result


async def load(base_url: str, scripts: list[dict[str, Any]], streams: int, rounds: int,
               tag: str) -> list[StreamResult]:
    """``streams`` workers, each streaming ``rounds`` answers back to back."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=streams)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def worker(w: int) -> list[StreamResult]:
            out = []
            for r in range(rounds):
                k = (w + r) % len(scripts)
                out.append(await one_stream(client, base_url, scripts[k], k,
                                            f"{tag}-k{k}-w{w}-r{r}"))
            return out

        done = await asyncio.gather(*(worker(w) for w in range(streams)))
    return [r for rows in done for r in rows]


def responder(scripts: list[dict[str, Any]]) -> Any:
    from guardrail.testing.upstream import Script

    def script_for(body: Mapping[str, Any]) -> Script:
        model = str(body.get("model", ""))
        k = int(model.split("-k")[1].split("-")[0]) if "-k" in model else 0
        solo = model.startswith("solo")
        return Script(chunks=scripts[k]["chunks"], delay=0.0 if solo else DELAY)

    return script_for


class Proxy:
    """``guardrail serve`` (default policy, or ``policy``) in a subprocess, with the verdict
    clock."""

    def __init__(self, upstream: str, workdir: Path, policy: Path | None = None,
                 tree: Path | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.verdicts = workdir / "verdicts.jsonl"
        self.port = free_port()
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if tree is not None:  # another checkout's code: its core, plugins and adapters first
            env["PYTHONPATH"] = os.pathsep.join(str(p) for p in tree_path(tree))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", PROXY_CODE, str(self.verdicts), "serve", "--upstream",
             upstream, "--port", str(self.port), "--no-metrics", "--no-dashboard",
             *(["--policy", str(policy)] if policy is not None else [])],
            env=env, stderr=subprocess.DEVNULL, cwd=tree)
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        wait_healthy(self.port, self.proc, 180)

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def verdict_times(self) -> dict[str, float]:
        if not self.verdicts.exists():
            return {}
        rows = [json.loads(x) for x in self.verdicts.read_text().splitlines() if x.strip()]
        return {r["model"]: r["at"] for r in rows}

    def read_rows(self) -> list[dict[str, Any]]:
        path = Path(f"{self.verdicts}.reads")
        if not path.exists():
            return []
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _chunk_of(chunks: list[str], at_char: int) -> int:
    end = 0
    for i, chunk in enumerate(chunks):
        end += len(chunk)
        if end > at_char:
            return i + 1
    return len(chunks)


def _gaps(times: list[float]) -> list[float]:
    return [(b - a) * 1000 for a, b in itertools.pairwise(times)]


def _level(results: list[StreamResult], records: dict[str, Any], verdicts: dict[str, float],
           reference: dict[int, StreamResult], scripts: list[dict[str, Any]],
           direct_gap_p95: float, cpu_s: float) -> dict[str, Any]:
    paces: list[float] = []
    gaps: list[float] = []
    past_verdict: list[float] = []
    past_halt: list[float] = []
    first: list[float] = []
    leaks = crossings = 0
    tokens = 0
    for r in results:
        record = records.get(r.model)
        chunk_times = record.chunk_times[1:] if record is not None else []
        tokens += sum(scripts[r.script]["chunk_tokens"][:len(chunk_times)])
        if r.ok and chunk_times and r.content_times:
            first.append((r.content_times[0] - chunk_times[0]) * 1000)
            paces.append((chunk_times[-1] - r.started) / (r.content_times[-1] - r.started))
        gaps += _gaps(r.content_times[:-1] if r.finish == "content_filter" else r.content_times)
        if r.ok and r.verdicts != reference[r.script].verdicts:
            crossings += 1
        if r.halt_at_char is not None:
            if len(r.content) > r.halt_at_char:
                leaks += 1
            halt_chunk = _chunk_of(scripts[r.script]["chunks"], r.halt_at_char)
            past_halt.append(len(chunk_times) - halt_chunk)
            at = verdicts.get(r.model)
            if at is not None:
                past_verdict.append(sum(1 for t in chunk_times if t > at))
    return {
        "streams_run": len(results), "completed": sum(r.ok for r in results),
        "errors": sum(not r.ok for r in results),
        "halted": sum(r.finish == "content_filter" for r in results),
        "pace_min": round(min(paces), 3) if paces else None,
        "pace_median": round(median(paces), 3) if paces else None,
        "streams_below_pace": sum(p < PACE_KEPT for p in paces),
        "first_text_after_upstream_ms": round(median(first), 1) if first else None,
        "gap_p95_ms": round(p95(gaps), 1) if gaps else None,
        "added_gap_p95_ms": round(p95(gaps) - direct_gap_p95, 1) if gaps else None,
        "tokens": tokens, "cpu_s": round(cpu_s, 2),
        "cpu_s_per_1k_tokens": round(cpu_s / tokens * 1000, 2) if tokens else None,
        "crossings": crossings, "leaks_past_hold_back": leaks,
        "past_verdict_median": median(past_verdict) if past_verdict else None,
        "past_verdict_max": max(past_verdict) if past_verdict else None,
        "past_halt_median": median(past_halt) if past_halt else None,
    }


def _reads(before: list[dict[str, Any]], after: list[dict[str, Any]],
           prefix: str) -> dict[str, Any]:
    """Reads per batched forward over a level, and the mean wait of its streams' reads."""
    def last(rows: list[dict[str, Any]], key: str) -> int:
        return max((r[key] for r in rows if r.get(key) is not None), default=0)

    mine = [r for r in after if str(r.get("model", "")).startswith(prefix)]
    forwards = last(after, "forwards") - last(before, "forwards")
    reads = last(after, "all_reads") - last(before, "all_reads")
    waited, count = sum(r["observer_s"] for r in mine), sum(r["reads"] for r in mine)
    return {"observer_forwards": forwards,
            "reads_per_forward": round(reads / forwards, 2) if forwards else None,
            "read_wait_ms": round(waited / count * 1000, 1) if count else None,
            "spread": last(after, "spread") - last(before, "spread"),
            "workers": last(after, "workers") or None}


def tree_path(tree: Path) -> list[Path]:
    """The import path of a checkout: its root, then each plugin, adapter and example."""
    return [tree, *sorted(p for group in ("plugins", "adapters", "examples")
                          for p in (tree / group).glob("*/") if p.is_dir())]


def variant_policy(options: Mapping[str, Any], path: Path) -> Path:
    """The default policy with these observer options, as a YAML file for ``--policy``."""
    import yaml

    from guardrail.guard import default_policy

    data = default_policy().model_dump(mode="json", exclude_none=True)
    data["observer"]["options"] = {**data["observer"].get("options", {}), **options}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_ours(scripts: list[dict[str, Any]], levels: list[int], rounds: int, say: Any,
             variants: Mapping[str, Mapping[str, Any]] | None = None
             ) -> tuple[dict[str, Any], dict[int, int], dict[str, Any]]:
    """Per level, the default's row; where each answer halts when streamed alone (script:
    at_char); and per variant (other observer options), its rows."""
    from guardrail.testing.upstream import UpstreamServer

    from .proxy_load import _roomy_backlog

    _roomy_backlog()
    names = ["ours", *(variants or {})]
    out: dict[str, dict[str, Any]] = {name: {} for name in names}
    with UpstreamServer(responder=responder(scripts)) as upstream, \
            tempfile.TemporaryDirectory() as tmp:
        proxies: dict[str, Proxy] = {}
        try:
            for k, name in enumerate(names):
                options = dict((variants or {}).get(name, {}))
                tree = options.pop("tree", None)  # --baseline: the default policy, other code
                policy = variant_policy(options, Path(tmp) / f"variant{k}.yaml") \
                    if options else None
                proxies[name] = Proxy(upstream.base_url, Path(tmp) / f"proxy{k}", policy,
                                      Path(tree) if tree else None)
            references: dict[str, dict[int, StreamResult]] = {}
            halts: dict[int, int] = {}
            for k, name in enumerate(names):
                solo = asyncio.run(load(proxies[name].base_url, scripts, len(scripts), 1,
                                        f"solo{k}"))
                references[name] = {r.script: r for r in solo}
                if name == "ours":
                    halts = {r.script: r.halt_at_char for r in solo
                             if r.halt_at_char is not None}
            for n in levels:
                direct = asyncio.run(load(upstream.base_url, scripts, n, 1, f"direct{n}"))
                direct_gap = p95([g for r in direct for g in _gaps(r.content_times)])
                loads: dict[str, list[float]] = {name: [] for name in names}
                results: dict[str, list[StreamResult]] = {name: [] for name in names}
                cpu = dict.fromkeys(names, 0.0)
                before = {name: proxies[name].read_rows() for name in names}
                for r in range(rounds):  # the proxies take turns, round by round
                    for name in (names if r % 2 == 0 else names[::-1]):
                        proxy = proxies[name]
                        loads[name].append(os.getloadavg()[0])
                        cpu0 = proxy.cpu_s()
                        # a worker's answer k runs w + r: as the rounds of one load() call
                        results[name] += asyncio.run(load_round(
                            proxy.base_url, scripts, n, r, f"{_tag(names, name)}{n}"))
                        cpu[name] += proxy.cpu_s() - cpu0
                for record in upstream.completions():
                    record.wait(5)
                records = {str((r.body or {}).get("model")): r for r in upstream.completions()}
                for name in names:
                    proxy = proxies[name]
                    row = _level(results[name], records, proxy.verdict_times(),
                                 references[name], scripts, direct_gap, cpu[name])
                    row.update(_reads(before[name], proxy.read_rows(),
                                      f"{_tag(names, name)}{n}-"))
                    row.update({"direct_gap_p95_ms": round(direct_gap, 1),
                                "load_1m_before": round(loads[name][0], 2),
                                "load_1m_mean": round(sum(loads[name]) / len(loads[name]), 2),
                                "load_1m_after": round(os.getloadavg()[0], 2)})
                    out[name][str(n)] = row
                    say(f"{name}, {n} streams: {row}")
        finally:
            for proxy in proxies.values():
                proxy.stop()
    return out.pop("ours"), halts, out


def _tag(names: list[str], name: str) -> str:
    return "ours" if name == "ours" else f"var{names.index(name)}-"


async def load_round(base_url: str, scripts: list[dict[str, Any]], streams: int, r: int,
                     tag: str) -> list[StreamResult]:
    """Round ``r`` of ``load``: ``streams`` workers, worker ``w`` streaming answer w + r."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=streams)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        done = await asyncio.gather(*(
            one_stream(client, base_url, scripts[(w + r) % len(scripts)],
                       (w + r) % len(scripts), f"{tag}-k{(w + r) % len(scripts)}-w{w}-r{r}")
            for w in range(streams)))
    return list(done)


def run_nemo(scripts: list[dict[str, Any]], levels: list[int], rounds: int,
             configs: list[dict[str, Any]], halts: dict[int, int], say: Any) -> dict[str, Any]:
    python = NEMO_VENV / "bin" / "python"
    if not python.exists():
        return {"note": f"NeMo Guardrails not run: no venv at {NEMO_VENV} (python -m "
                        "bench.peer_nemo --build-venv builds it)"}
    job = {"scripts": scripts, "levels": levels, "rounds": rounds, "delay": DELAY,
           "configs": configs, "pace_kept": PACE_KEPT,
           "reference_at_char": {str(k): v for k, v in halts.items()}}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if not (NEMO_VENV / ".installed").exists():
        # A NeMo venv built by hand with nemoguardrails alone (not by make): the project venv's
        # packages (torch, transformers, the plugins) go ahead of its own.
        site = Path(sys.prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" \
            / "site-packages"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(site)) if p)
    proc = subprocess.run([str(python), str(ROOT / "bench" / "peers" / "nemo_pace.py")],
                          input=json.dumps(job), capture_output=True, text=True, timeout=3600,
                          cwd=ROOT, env=env)
    for line in proc.stderr.splitlines():
        if line.startswith("[nemo_pace]"):
            say(line)
    if proc.returncode != 0:
        return {"note": f"NeMo run failed: {proc.stderr.strip().splitlines()[-1:]}"}
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--levels", type=int, nargs="+")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--no-nemo", action="store_true")
    parser.add_argument("--nemo-configs", type=int, nargs="+",
                        help="indices into NEMO_CONFIGS (default: all; quick: the first)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                        help="also serve the default policy with these observer options "
                             "(e.g. '1 worker={\"workers\": 1}'), taking turns with it")
    parser.add_argument("--baseline", type=Path, metavar="PATH",
                        help="also serve the default policy from the code of this checkout")
    parser.add_argument("--unit", choices=["token", "word"], default="token",
                        help="what an upstream chunk holds: a token of the observer's (25 "
                             "tokens/s) or a word (25 words/s; results: serve_pace_words)")
    args = parser.parse_args(argv)
    variants: dict[str, dict[str, Any]] = {}
    if args.baseline is not None:
        if not (args.baseline / "guardrail" / "__init__.py").exists():
            parser.error(f"--baseline {args.baseline}: not a checkout of this project")
        variants[f"baseline ({_commit(args.baseline)})"] = {"tree": str(args.baseline.resolve())}
    for text in args.variant:
        name, sep, options = text.partition("=")
        if not sep or not name.strip():
            parser.error(f"--variant {text!r}: expected NAME=JSON")
        try:
            variants[name.strip()] = dict(json.loads(options))
        except (ValueError, TypeError) as exc:
            parser.error(f"--variant {text!r}: the options are not a JSON object ({exc})")
    levels = args.levels or ([1, 2] if args.quick else [1, 8, 32])
    rounds = args.rounds or (1 if args.quick else 2)

    def say(message: str) -> None:
        print(f"[serve_pace] {message}", file=sys.stderr, flush=True)

    words = WORDS // 2 if args.quick else WORDS  # quick: a smoke test within make bench-quick
    scripts = load_scripts(words, args.unit)
    ours, halts, others = run_ours(scripts, levels, rounds, say, variants)
    configs = ([NEMO_CONFIGS[i] for i in args.nemo_configs] if args.nemo_configs
               else NEMO_CONFIGS[:1] if args.quick else NEMO_CONFIGS)
    nemo = {"note": "not run (--no-nemo)"} if args.no_nemo else \
        run_nemo(scripts, levels, rounds, configs, halts, say)
    tokens = [sum(s["chunk_tokens"]) for s in scripts]
    return write_result(NAME if args.unit == "token" else WORDS_NAME, {
        "quick": args.quick, "levels": levels, "rounds": rounds, "delay_s": DELAY,
        "unit": args.unit, "words_max": words, "scripts": [s["title"] for s in scripts],
        "script_tokens": tokens,
        "tokens_per_chunk": round(sum(tokens) / sum(len(s["chunks"]) for s in scripts), 2),
        "pace_kept": PACE_KEPT,
        "ours": ours, "variants": {name: {"observer_options": variants[name], "rows": rows}
                                   for name, rows in others.items()},
        "solo_halts_at_char": halts, "nemo": nemo, "cores": os.cpu_count()})


def _commit(tree: Path) -> str:
    """The checkout's commit (short), or its folder's name when git cannot tell."""
    out = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True, check=False)
    return out.stdout.strip() if out.returncode == 0 else tree.resolve().name


def _kept(rows: Mapping[str, Any]) -> int:
    """The highest level at which every stream kept pace (0: none)."""
    kept = [int(n) for n, r in rows.items()
            if r.get("streams_below_pace") == 0 and r.get("errors") == 0
            and r.get("pace_min") is not None]
    return max(kept, default=0)


def _ratios(rows: Mapping[str, Any], ours: Mapping[str, Any]) -> str:
    """NeMo's CPU-s per 1,000 tokens over ours, per level."""
    key = "cpu_s_per_1k_tokens"
    return " / ".join(f"{n} streams {r[key] / ours[n][key]:.2f}x" for n, r in rows.items()
                      if r.get(key) and (ours.get(n) or {}).get(key))


def _ceiling(r: Mapping[str, Any], cores: int, rate: float) -> float | None:
    """Streams at ``rate`` tokens/s that ``cores`` fully free cores could carry at the measured
    CPU cost: a figure the machine's other load does not move much (CPU time, not wall)."""
    cost = r.get("cpu_s_per_1k_tokens")
    return cores / (cost / 1000 * rate) if cost else None


def _fmt(value: Any, spec: str = "{:.2f}") -> str:
    return "-" if value is None else spec.format(value)


def _pace_words(result: Mapping[str, Any]) -> str:
    """What the upstream sent, in the units it sent them."""
    rate = 1 / result["delay_s"]
    if result.get("unit", "word") == "token":
        return f"{rate:.0f} tokens/s (a token of SmolLM2's per chunk; "
    per = result.get("tokens_per_chunk")
    extra = f", {rate * per:.0f} of SmolLM2's tokens/s on these answers" if per else ""
    return f"{rate:.0f} words/s (a word per chunk{extra}; "


def render_words(result: dict[str, Any]) -> str:
    """The same benchmark with a word per upstream chunk (``--unit word``)."""
    text = render(result)
    return text.replace("## Hidden-state policies under concurrency: `guardrail serve` against "
                        "NeMo", "### The same at a word per chunk (`--unit word`)", 1)


def render(result: dict[str, Any]) -> str:
    lines = [
        "## Hidden-state policies under concurrency: `guardrail serve` against NeMo", "",
        f"The default policy (SmolLM2 observer, torch, 1 thread per forward, `workers: auto`; "
        f"harm, facts and router monitors) behind `guardrail serve`, and NeMo Guardrails' "
        f"streaming output rail running the same monitors, at "
        f"{', '.join(map(str, result['levels']))} concurrent streams, each "
        f"upstream at {_pace_words(result)}{len(result['scripts'])} recorded "
        f"answers, harmful and benign, up to {result['words_max']} words; "
        f"{result['rounds']} per stream; bench/serve_pace.py). *Pace*: the upstream's time to "
        "its last chunk over the reader's time to its last text, per stream (min / median); "
        "*first text*: ms from the upstream's first text to the reader's (median; by design "
        "ours holds back 8 tokens, about 300 ms at this pace); "
        f"a level keeps pace when every stream is at >= {result['pace_kept']}. *Added gap*: p95 "
        "of the reader's gaps between text chunks minus the upstream's at the same concurrency. "
        "*CPU-s / 1k tokens*: per 1,000 of SmolLM2's tokens written by the upstream. "
        "*CPU ceiling*: streams at this pace that all the machine's cores could carry at the "
        "measured CPU cost per token (CPU time moves less with the machine's other load than "
        "wall time does). *Reads / forward*: observer reads (contexts included) per batched "
        "forward; *spread*: batches run as two forwards at once on the observer's forward workers; "
        "*read wait*: mean time from a read being due to its result (ours only). Rows `ours, "
        "NAME` serve the same policy with other observer options (`1 worker`: `workers: 1`) or "
        "from another checkout's code (`baseline`), taking turns with ours round by round. "
        "*Leaks*: streams that showed text at or past the halting token (for "
        "NeMo: past where ours halts the same answer). *Past the "
        "verdict / halting chunk*: upstream chunks written after the halt verdict / after the "
        "chunk holding the halting token (median, max). The machine was shared (1-minute load "
        "in the last column; NeMo ran right after ours in the same run).", "",
        "| system | streams | pace min / median | below pace | first text, ms | "
        "added gap p95, ms | "
        "CPU-s / 1k tokens | CPU ceiling, streams | reads / forward | spread | read wait, ms | "
        "crossings | leaks | halted | "
        "past the verdict (max) | "
        "past the halting chunk | errors | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    cores, rate = int(result.get("cores") or 2), 1 / result["delay_s"]
    if result.get("unit", "word") == "word":  # tokens/s: the cost is per token
        rate *= result.get("tokens_per_chunk") or 1.0

    def row(system: str, n: str, r: Mapping[str, Any]) -> str:
        load = f"{r.get('load_1m_before', float('nan')):.1f}" if "load_1m_before" in r else "-"
        return (f"| {system} | {n} | {_fmt(r.get('pace_min'))} / {_fmt(r.get('pace_median'))} | "
                f"{r.get('streams_below_pace')} of {r.get('streams_run')} | "
                f"{_fmt(r.get('first_text_after_upstream_ms'), '{:.0f}')} | "
                f"{_fmt(r.get('added_gap_p95_ms'), '{:+.0f}')} | "
                f"{_fmt(r.get('cpu_s_per_1k_tokens'), '{:.1f}')} | "
                f"{_fmt(_ceiling(r, cores, rate), '{:.1f}')} | "
                f"{_fmt(r.get('reads_per_forward'), '{:.1f}')} | "
                f"{_fmt(r.get('spread'), '{}')} | "
                f"{_fmt(r.get('read_wait_ms'), '{:.0f}')} | "
                f"{_fmt(r.get('crossings'), '{}')} | {r.get('leaks_past_hold_back')} | "
                f"{r.get('halted')} | "
                f"{_fmt(r.get('past_verdict_median'), '{:.0f}')} "
                f"({_fmt(r.get('past_verdict_max'), '{}')}) | "
                f"{_fmt(r.get('past_halt_median'), '{:.0f}')} | {r.get('errors')} | {load} |")

    for n, r in result["ours"].items():
        lines.append(row("ours (hold-back 8)", n, r))
    for name, variant in (result.get("variants") or {}).items():
        for n, r in variant["rows"].items():
            lines.append(row(f"ours, {name}", n, r))
    nemo = result.get("nemo") or {}
    for name, rows in (nemo.get("configs") or {}).items():
        for n, r in rows.items():
            lines.append(row(name, n, r))
    lines += ["", f"Highest concurrency keeping pace: ours {_kept(result['ours'])}"
              + "".join(f"; {name} {_kept(rows)}"
                        for name, rows in (nemo.get("configs") or {}).items())
              + ". CPU ratio (NeMo over ours, same level): "
              + ", ".join(f"{name}: {_ratios(rows, result['ours'])}"
                          for name, rows in (nemo.get("configs") or {}).items())
              + f". {nemo.get('note') or ''}",
              "", "NeMo's defaults check 200-token chunks after streaming them (stream first): on "
              "answers this short the reader gets the whole answer at the end, after one check, "
              "and a halted stream has already shown its text. With small chunks checked first, "
              "each check is a fresh pass over the prompt and the window, which is where its CPU "
              "goes. The CPU ceiling is the figure to read on a shared machine: what 2 free cores "
              "would carry at the measured cost. The forward is most of ours' CPU cost; ours runs "
              "it on the observer's scheduler thread and, while the machine has a free core for "
              "it, on a second forward worker (`workers: auto`). On a machine whose cores are "
              "busy with other work it runs one forward at a time and can use about one core: "
              "its reachable ceiling is then about half the column's (where the time goes: "
              "docs/observer.md, \"Concurrent streams\" and \"Forward workers\")."]
    return "\n".join(lines) + "\n"


def render_tail(result: dict[str, Any]) -> str:
    """The 8-stream level with the default (``q4_1_tail_q8``) against ``q4_1``
    (``--levels 8 --rounds 4 --no-nemo --variant 'q4_1={"matmul": "q4_1"}'``)."""
    text = render(result)
    return text.replace("## Hidden-state policies under concurrency: `guardrail serve` against "
                        "NeMo", "### The default's int8 products past the layers read "
                        "(`q4_1_tail_q8`) against `q4_1`, 8 streams", 1)


TAIL_NAME = "serve_pace_tail"  # q4_1_tail_q8, the default since session 36, against q4_1
EXTRA_RESULTS = {WORDS_NAME: render_words, TAIL_NAME: render_tail}


if __name__ == "__main__":
    main()
