"""NeMo Guardrails' streaming output rail under concurrency (runs INSIDE the NeMo venv; driven by
bench/serve_pace.py).

Reads a JSON job on stdin: {"scripts": [{"title", "prompt", "chunks", "chunk_tokens"}],
"levels": [1, 8, ...], "rounds": int, "delay": s per chunk, "configs": [{"name", "chunk_size",
"context_size", "stream_first"}], "pace_kept": float, "reference_at_char": {script index:
at_char}}. Per config and level, N concurrent ``stream_async`` calls, each over a replaying LLM
at the given pace. The output rail is an action that runs the default policy's monitors (one
Guard, one observer) over the rail's text as a dry-run session in a worker thread, blocking on
any halt verdict. Prints one JSON object with the same per-level fields as ours.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models.llms import LLM
from langchain_core.outputs import GenerationChunk
from nemo_runner import make_config  # beside this file: the same rail config
from nemoguardrails import LLMRails
from nemoguardrails.actions.rail_outcome import RailOutcome

from guardrail import Guard, default_policy


@dataclass
class Stream:
    script: int
    started: float
    token_times: list[float] = field(default_factory=list)
    content_times: list[float] = field(default_factory=list)
    shown: str = ""
    blocked: bool = False
    verdict_at: float | None = None
    ok: bool = False
    error: str | None = None


CURRENT: contextvars.ContextVar[Stream] = contextvars.ContextVar("stream")


class PacedLLM(LLM):
    """Replays the current stream's script chunk by chunk at ``delay`` s per chunk."""

    scripts: list[list[str]] = []
    delay: float = 0.0

    @property
    def _llm_type(self) -> str:
        return "paced-replay"

    def _call(self, prompt: str, stop: Any = None,
              run_manager: CallbackManagerForLLMRun | None = None, **kw: Any) -> str:
        return "".join(self.scripts[CURRENT.get().script])

    async def _astream(self, prompt: str, stop: Any = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None, **kw: Any
                       ) -> AsyncIterator[GenerationChunk]:
        stream = CURRENT.get()
        for piece in self.scripts[stream.script]:
            await asyncio.sleep(self.delay)
            stream.token_times.append(time.monotonic())
            chunk = GenerationChunk(text=piece)
            if run_manager:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk


def make_rails(guard: Guard, cfg: dict[str, Any], scripts: list[dict[str, Any]],
               delay: float) -> LLMRails:
    llm = PacedLLM(scripts=[s["chunks"] for s in scripts], delay=delay)
    rails = LLMRails(make_config(cfg), llm=llm)

    def check(prompt: str, text: str) -> bool:
        session = guard.session(prompt=prompt, dry_run=True)
        session.feed(text)
        report = session.finish()
        return any(f.action == "halt" for f in report.flags)

    async def guardrail_check(context: dict[str, Any] | None = None, **kwargs: Any
                              ) -> RailOutcome:
        stream = CURRENT.get()
        text = (context or {}).get("bot_message", "") or ""
        # In a worker thread, as ours runs: the event loop keeps the other streams moving.
        if await asyncio.to_thread(check, scripts[stream.script]["prompt"], text):
            stream.verdict_at = stream.verdict_at or time.monotonic()
            return RailOutcome.block(reason="guardrail monitor")
        return RailOutcome.allow()

    rails.register_action(guardrail_check, "guardrail_check")
    return rails


async def one(rails: LLMRails, scripts: list[dict[str, Any]], k: int) -> Stream:
    stream = Stream(k, time.monotonic())
    CURRENT.set(stream)
    try:
        async for chunk in rails.stream_async(
                messages=[{"role": "user", "content": scripts[k]["prompt"]}]):
            if isinstance(chunk, dict) or (isinstance(chunk, str)
                                           and chunk.startswith('{"error"')):
                stream.blocked = True
                stream.verdict_at = stream.verdict_at or time.monotonic()
                break
            if chunk:
                stream.content_times.append(time.monotonic())
                stream.shown += chunk
        stream.ok = True
    except Exception as exc:  # noqa: BLE001 - counted as an error, the run goes on
        stream.error = f"{type(exc).__name__}: {exc}"
    return stream


async def level(rails: LLMRails, scripts: list[dict[str, Any]], n: int, rounds: int
                ) -> list[Stream]:
    async def worker(w: int) -> list[Stream]:
        out = []
        for r in range(rounds):
            out.append(await asyncio.create_task(one(rails, scripts, (w + r) % len(scripts))))
        return out

    done = await asyncio.gather(*(worker(w) for w in range(n)))
    return [s for rows in done for s in rows]


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] if ordered else 0.0


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _gaps(times: list[float]) -> list[float]:
    return [(b - a) * 1000 for a, b in itertools.pairwise(times)]


def _chunk_of(chunks: list[str], at_char: int) -> int:
    end = 0
    for i, chunk in enumerate(chunks):
        end += len(chunk)
        if end > at_char:
            return i + 1
    return len(chunks)


def summarise(streams: list[Stream], chunks: list[list[str]], chunk_tokens: list[list[int]],
              reference: dict[int, tuple[str, bool]], ref_at_char: dict[int, int],
              cpu_s: float, pace_kept: float) -> dict[str, Any]:
    paces = [(s.token_times[-1] - s.started) / (s.content_times[-1] - s.started)
             for s in streams if s.ok and s.token_times and s.content_times]
    gaps = [g for s in streams for g in _gaps(s.content_times)]
    first = [(s.content_times[0] - s.token_times[0]) * 1000
             for s in streams if s.ok and s.token_times and s.content_times]
    upstream_gaps = [g for s in streams for g in _gaps(s.token_times)]
    past_verdict = [sum(1 for t in s.token_times if t > s.verdict_at)
                    for s in streams if s.blocked and s.verdict_at is not None]
    # the observer's tokens in the chunks written (a chunk is a token or a word: serve_pace)
    tokens = sum(sum(chunk_tokens[s.script][:len(s.token_times)]) for s in streams)
    leaks = sum(1 for s in streams if s.script in ref_at_char
                and len(s.shown) > ref_at_char[s.script])
    past_halt = [len(s.token_times) - _chunk_of(chunks[s.script], ref_at_char[s.script])
                 for s in streams if s.blocked and s.script in ref_at_char]
    return {
        "streams_run": len(streams), "completed": sum(s.ok for s in streams),
        "errors": sum(not s.ok for s in streams), "halted": sum(s.blocked for s in streams),
        "error_kinds": sorted({s.error for s in streams if s.error})[:3],
        "pace_min": round(min(paces), 3) if paces else None,
        "pace_median": round(_median(paces), 3) if paces else None,
        "streams_below_pace": sum(p < pace_kept for p in paces),
        "first_text_after_upstream_ms": round(_median(first), 1) if first else None,
        "gap_p95_ms": round(_p95(gaps), 1) if gaps else None,
        "added_gap_p95_ms": round(_p95(gaps) - _p95(upstream_gaps), 1) if gaps else None,
        "tokens": tokens, "cpu_s": round(cpu_s, 2),
        "cpu_s_per_1k_tokens": round(cpu_s / tokens * 1000, 2) if tokens else None,
        "crossings": sum(1 for s in streams if s.ok and s.script in reference
                         and (s.shown, s.blocked) != reference[s.script]),
        "leaks_past_hold_back": leaks,
        "past_verdict_median": _median(past_verdict) if past_verdict else None,
        "past_verdict_max": max(past_verdict) if past_verdict else None,
        "past_halt_median": _median(past_halt) if past_halt else None,
    }


async def main() -> None:
    job = json.load(sys.stdin)
    guard = Guard(default_policy())
    scripts = job["scripts"]
    ref_at_char = {int(k): v for k, v in (job.get("reference_at_char") or {}).items()}
    out: dict[str, Any] = {"configs": {}, "nemoguardrails": _version()}
    for cfg in job["configs"]:
        rails = make_rails(guard, cfg, scripts, job["delay"])
        solo = await level(rails, scripts, 1, len(scripts))  # warm-up and the reference
        reference = {s.script: (s.shown, s.blocked) for s in solo if s.ok}
        rows: dict[str, Any] = {}
        for n in job["levels"]:
            load = os.getloadavg()[0]
            cpu0 = time.process_time()
            streams = await level(rails, scripts, n, job["rounds"])
            cpu = time.process_time() - cpu0
            rows[str(n)] = summarise(streams, [s["chunks"] for s in scripts],
                                     [s["chunk_tokens"] for s in scripts], reference,
                                     ref_at_char, cpu, job["pace_kept"])
            rows[str(n)]["load_1m_before"] = round(load, 2)
            print(f"[nemo_pace] {cfg['name']}, {n} streams: {rows[str(n)]}", file=sys.stderr,
                  flush=True)
        out["configs"][cfg["name"]] = rows
    print(json.dumps(out))


def _version() -> str:
    from importlib.metadata import version

    return version("nemoguardrails")


if __name__ == "__main__":
    asyncio.run(main())
