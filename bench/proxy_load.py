"""Load on the proxy: 50 concurrent streams through ``guardrail serve`` for a bounded run.

Setup, all on loopback: the scripted SSE upstream (``guardrail.testing.upstream``, in this
process, a thread per connection, ``DELAY`` seconds between chunks like a model generating
~20 tokens/s) and the proxy as a real ``guardrail serve`` subprocess (so its memory is its own).
Clients are async ``httpx`` streams in this process.

Per policy (``flag_only``: keyword and regex flags, no hold-back; ``halting``: halts on a
keyword, hold-back 4):
1. solo: every script once, alone and without pauses, through the proxy: its verdicts (text, finish
   reason, guard events) are the reference;
2. load: ``--streams`` workers stream scripts back to back for ``--seconds``; every stream's
   verdicts must equal its script's solo run (no state crossing), with no errors.
Beforehand the same load runs straight against the upstream for a third of the time: the
direct baseline. Latencies: time to first content, gaps between content chunks, whole stream;
p50/p95, proxy minus direct. Peak RSS of the proxy process from /proc (VmHWM).

``--hostile``: per policy, a third load with the same normal workers plus one worker that streams
whitespace-free text (``--hostile-kib`` KiB of base64-like characters in 16-character deltas, no
pauses) back to back. Reported: the normal streams' p95 (whole stream, first content, chunk gap)
with and without it, and the ratio (the aim: within 1.2x).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

import guardrail.testing.upstream as loopback
from guardrail.testing.upstream import Script, UpstreamServer

from . import real_upstream
from .common import free_port, median, p95, wait_healthy, write_result

NAME = "proxy_load"
DELAY = 0.05  # seconds between upstream chunks
HOSTILE_PROMPT = "hostile"
HOSTILE_PIECE = 16  # characters per hostile delta

# Scripts the upstream replays, chosen by the prompt "script-<k>". Some flag, some halt.
TEXTS = [
    "The museum opens at nine and closes at five, with free entry on the first Sunday.",
    "To build a bookshelf you need six boards, a saw, screws and a little patience.",
    "Call the front desk at 555-0199 if the heating fails again during the night.",
    "Here is how to build a bomb at home, which I will not explain any further here.",
    "Rivers carry sediment to the sea, where deltas slowly build up over many centuries.",
    "A pipe bomb is illegal to make and possessing one can bring a very long sentence.",
    "Bake the bread for forty minutes, then let it cool on a rack before slicing it.",
    "The team will build the bridge first and then test it with heavy trucks at 555-0123.",
]

POLICIES: dict[str, dict[str, Any]] = {
    "flag_only": {"version": 1, "release": {"hold_back_tokens": 0}, "monitors": [
        {"id": "verbs", "use": "keywords", "options": {"words": ["build"]}, "action": "flag"},
        {"id": "phone", "use": "regex", "options": {"patterns": [r"\b555-\d{4}\b"]},
         "action": "flag"}]},
    "halting": {"version": 1, "release": {"hold_back_tokens": 4}, "monitors": [
        {"id": "weapons", "use": "keywords", "options": {"words": ["bomb"]}, "action": "halt",
         "message": "I can't help with that."},
        {"id": "verbs", "use": "keywords", "options": {"words": ["build"]}, "action": "flag"}]},
}


def _roomy_backlog() -> None:
    """The loopback upstream is a stdlib server whose listen backlog is 5: 50 clients connecting
    at once overflow it and the kernel resets connections (ReadError). Real upstreams listen
    with a backlog in the hundreds; give the test server the same."""
    server_class: Any = getattr(loopback, "_QuietServer", None)
    if server_class is not None and server_class.request_queue_size < 256:
        server_class.request_queue_size = 256


def hostile_text(kib: int) -> str:
    """``kib`` KiB without whitespace (base64 of seeded random bytes), the same every run."""
    raw = random.Random(0).randbytes(kib * 1024 * 3 // 4 + 3)
    return base64.b64encode(raw).decode()[:kib * 1024]


def responder(delay: float, hostile_kib: int = 64) -> Callable[[Mapping[str, Any]], Script]:
    """The upstream's answer to a request whose prompt is "script-<k>" ("script-<k>-solo": the
    same text without pauses; verdicts depend on the text and its split, not on timing), or
    "hostile": whitespace-free text in 16-character deltas, as fast as the upstream can write."""
    hostile = hostile_text(hostile_kib)
    pieces = [hostile[i:i + HOSTILE_PIECE] for i in range(0, len(hostile), HOSTILE_PIECE)]

    def script_for(body: Mapping[str, Any]) -> Script:
        prompt = str((body.get("messages") or [{}])[-1].get("content", ""))
        if prompt == HOSTILE_PROMPT:
            return Script(chunks=pieces)
        parts = prompt.split("-")
        k = int(parts[1]) if parts[0] == "script" and len(parts) > 1 else 0
        return Script(text=TEXTS[k % len(TEXTS)], delay=0.0 if parts[-1] == "solo" else delay)

    return script_for


@dataclass
class StreamResult:
    script: int
    ok: bool
    error: str | None = None
    content: str = ""
    finish: str | None = None
    events: list[tuple[Any, ...]] = field(default_factory=list)
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    total: float = 0.0

    @property
    def verdicts(self) -> tuple[Any, ...]:
        return (self.content, self.finish, tuple(self.events))


async def one_stream(client: httpx.AsyncClient, base_url: str, script: int,
                     solo: bool = False, prompt: str | None = None) -> StreamResult:
    """Stream one request; record what the client saw and when."""
    result = StreamResult(script, ok=False)
    prompt = prompt or (f"script-{script}-solo" if solo else f"script-{script}")
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": prompt}]}
    t0 = last = time.perf_counter()
    try:
        async with client.stream("POST", f"{base_url}/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                result.error = f"HTTP {resp.status_code}"
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    result.ok = result.error is None
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = str(chunk["error"].get("code"))
                    continue
                for event in (chunk.get("guardrail") or {}).get("events", []):
                    result.events.append((event["kind"], event["monitor"],
                                          tuple(event.get("span") or ()), event.get("at")))
                for choice in chunk.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") or ""
                    result.finish = choice.get("finish_reason") or result.finish
                    if text:
                        now = time.perf_counter()
                        if result.ttft is None:
                            result.ttft = now - t0
                        else:
                            result.gaps.append(now - last)
                        last = now
                        result.content += text
    except (httpx.HTTPError, ValueError) as exc:
        result.error = type(exc).__name__
    result.total = time.perf_counter() - t0
    if not result.ok and result.error is None:
        result.error = "no [DONE]"
    return result


async def load(base_url: str, streams: int, seconds: float, hostile: int = 0,
               hostile_results: list[StreamResult] | None = None) -> list[StreamResult]:
    """``streams`` workers run streams back to back until ``seconds`` have passed; ``hostile``
    more workers stream the whitespace-free script (their results go to ``hostile_results``)."""
    counter = iter(range(10**9))
    deadline = time.perf_counter() + seconds
    results: list[StreamResult] = []
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=streams + hostile)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:

        async def worker() -> None:
            while time.perf_counter() < deadline:
                results.append(await one_stream(client, base_url, next(counter) % len(TEXTS)))

        async def hostile_worker() -> None:
            while time.perf_counter() < deadline:
                result = await one_stream(client, base_url, -1, prompt=HOSTILE_PROMPT)
                if hostile_results is not None:
                    hostile_results.append(result)

        await asyncio.gather(*(worker() for _ in range(streams)),
                             *(hostile_worker() for _ in range(hostile)))
    return results


async def solo(base_url: str) -> dict[int, StreamResult]:
    async with httpx.AsyncClient(timeout=30) as client:
        return {k: await one_stream(client, base_url, k, solo=True) for k in range(len(TEXTS))}


# -- the proxy process ---------------------------------------------------------------------


class ProxyProcess:
    """``guardrail serve`` in a subprocess, on a free port."""

    def __init__(self, policy: dict[str, Any], upstream: str, workdir: Path,
                 serve_args: tuple[str, ...] = ()) -> None:
        path = workdir / f"policy-{id(policy)}.yaml"
        path.write_text(yaml.safe_dump(policy))
        self.port = free_port()
        code = "import sys; from guardrail.cli import main; sys.exit(main())"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, "serve", "--policy", str(path), "--upstream", upstream,
             "--port", str(self.port), *serve_args],
            # Built-in monitors only: of the entry-point plugins, only the one adding `serve`
            # (no monitor plugin and its imports in the footprint).
            env={**os.environ, "OMP_NUM_THREADS": "1", "GUARDRAIL_LOAD_PLUGINS": "server"},
            stderr=subprocess.DEVNULL)
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        wait_healthy(self.port, self.proc, 60)

    def memory_mb(self, field_name: str) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def cpu_s(self) -> float:
        """CPU seconds the proxy process has used (user + system, all threads)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# -- the run -------------------------------------------------------------------------------


def _latency(results: list[StreamResult]) -> dict[str, float]:
    ttft = [r.ttft * 1000 for r in results if r.ttft is not None]
    gaps = [g * 1000 for r in results for g in r.gaps]
    total = [r.total * 1000 for r in results if r.ok]
    return {"ttft_p50": median(ttft), "ttft_p95": p95(ttft), "gap_p50": median(gaps),
            "gap_p95": p95(gaps), "stream_p50": median(total), "stream_p95": p95(total)}


def _added(proxy: dict[str, float], direct: dict[str, float]) -> dict[str, float]:
    return {k: round(proxy[k] - direct[k], 2) for k in proxy}


def _hostile_mix(base_url: str, streams: int, seconds: float, without: dict[str, float]
                 ) -> dict[str, Any]:
    """The normal streams' p95 with one hostile stream among them, against ``without``."""
    hostile: list[StreamResult] = []
    results = asyncio.run(load(base_url, streams, seconds, hostile=1, hostile_results=hostile))
    latency = _latency(results)
    keys = ("stream_p95", "ttft_p95", "gap_p95")
    return {
        "normal_completed": sum(r.ok for r in results),
        "normal_errors": sum(not r.ok for r in results),
        "without": {k: round(without[k], 2) for k in keys},
        "with": {k: round(latency[k], 2) for k in keys},
        "ratio": {k: round(latency[k] / without[k], 3) if without[k] else None for k in keys},
        "hostile_streams": len(hostile),
        "hostile_completed": sum(r.ok for r in hostile),
        "hostile_stream_ms": [round(r.total * 1000) for r in hostile],
    }


def run(*, streams: int = 50, seconds: float = 60.0, delay: float = DELAY,
        policies: tuple[str, ...] = tuple(POLICIES), verbose: bool = True,
        hostile: bool = False, hostile_kib: int = 64,
        serve_args: tuple[str, ...] = ()) -> dict[str, Any]:
    """The whole measurement; returns the result mapping (see the module docstring)."""

    def say(message: str) -> None:
        if verbose:
            print(f"[proxy_load] {message}", file=sys.stderr, flush=True)

    out: dict[str, Any] = {"streams": streams, "seconds": seconds, "upstream_delay_s": delay,
                           "scripts": len(TEXTS), "policies": {}}
    if hostile:
        out["hostile_kib"] = hostile_kib
    if serve_args:
        out["serve_args"] = list(serve_args)
    out["load_1m_before"] = round(os.getloadavg()[0], 2)
    _roomy_backlog()
    with UpstreamServer(responder=responder(delay, hostile_kib)) as upstream, \
            tempfile.TemporaryDirectory() as tmp:
        say(f"direct: {streams} streams for {seconds / 3:.0f} s")
        direct_results = asyncio.run(load(upstream.base_url, streams, seconds / 3))
        direct = _latency(direct_results)
        out["direct"] = {"completed": sum(r.ok for r in direct_results),
                         "errors": sum(not r.ok for r in direct_results),
                         **{k: round(v, 2) for k, v in direct.items()}}
        for name in policies:
            proxy = ProxyProcess(POLICIES[name], upstream.base_url, Path(tmp), serve_args)
            try:
                idle_mb = proxy.memory_mb("VmRSS")
                reference = asyncio.run(solo(proxy.base_url))
                say(f"{name}: {streams} streams through the proxy for {seconds:.0f} s")
                before = len(upstream.completions())
                cpu0 = proxy.cpu_s()
                results = asyncio.run(load(proxy.base_url, streams, seconds))
                cpu = proxy.cpu_s() - cpu0
                records = upstream.completions()[before:]  # before the hostile mix adds its own
                peak_mb = proxy.memory_mb("VmHWM")
                if hostile:
                    say(f"{name}: the same with one whitespace-free stream among them")
                    mix = _hostile_mix(proxy.base_url, streams, seconds, _latency(results))
            finally:
                proxy.stop()
            crossed = [r for r in results if r.ok and r.verdicts != reference[r.script].verdicts]
            halted = [r for r in results if r.finish == "content_filter"]
            stopped = sum(1 for rec in records if rec.wait(5) and rec.disconnected)
            latency = _latency(results)
            errors: dict[str, int] = {}
            for r in results:
                if not r.ok:
                    errors[str(r.error)] = errors.get(str(r.error), 0) + 1
            hold_back = POLICIES[name]["release"]["hold_back_tokens"]
            out["policies"][name] = {
                "hold_back_tokens": hold_back,
                # A word is final once the next one arrives; then hold_back more are held.
                "by_design_ttft_ms": round((hold_back + 1) * delay * 1000, 1),
                "completed": sum(r.ok for r in results),
                "errors": sum(errors.values()),
                "error_kinds": errors,
                "state_crossings": len(crossed),
                "solo_ok": all(r.ok for r in reference.values()),
                "halted_streams": len(halted),
                "upstream_closed_early": stopped,
                "flags_per_stream": round(sum(len(r.events) for r in results)
                                          / max(1, len(results)), 2),
                **{k: round(v, 2) for k, v in latency.items()},
                "added": _added(latency, direct),
                # CPU time moves less with the machine's other load than latency does.
                "proxy_cpu_ms_per_stream": round(cpu / max(1, len(results)) * 1000, 2),
                "rss_idle_mb": round(idle_mb, 1),
                "rss_peak_mb": round(peak_mb, 1),
            }
            if hostile:
                out["policies"][name]["hostile_mix"] = mix
            say(f"{name}: {out['policies'][name]}")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a ~15 s run")
    parser.add_argument("--streams", type=int, default=50)
    parser.add_argument("--seconds", type=float, help="load time per policy (default 60; 4 quick)")
    parser.add_argument("--policies", nargs="+", choices=sorted(POLICIES), default=list(POLICIES))
    parser.add_argument("--hostile", action="store_true",
                        help="also run each policy's load with one whitespace-free stream")
    parser.add_argument("--serve-arg", action="append", default=[],
                        help="extra guardrail serve argument, e.g. --serve-arg=--no-metrics "
                             "(repeatable): compare runs with and without a feature")
    parser.add_argument("--hostile-kib", type=int, default=64,
                        help="size of the whitespace-free answer, KiB (default 64)")
    args = parser.parse_args(argv)
    seconds = args.seconds or (4.0 if args.quick else 60.0)
    result = run(streams=args.streams, seconds=seconds, policies=tuple(args.policies),
                 hostile=args.hostile, hostile_kib=args.hostile_kib,
                 serve_args=tuple(args.serve_arg))
    result["quick"] = bool(args.quick)
    write_result(NAME, result)
    return result


def render(result: dict[str, Any]) -> str:
    d = result["direct"]
    lines = [
        "## Proxy under load", "",
        f"`guardrail serve` (a subprocess) between {result['streams']} concurrent async clients "
        f"and the loopback SSE upstream ({result['upstream_delay_s'] * 1000:.0f} ms between "
        f"chunks), streams back to back for {result['seconds']:.0f} s per policy, all on this "
        "machine's shared cores (bench/proxy_load.py). *Crossings*: streams whose verdicts "
        "(text shown, finish reason, guard events) differ from the same script's solo run. "
        "*Added*: proxy minus direct upstream under the same load, p50 / p95. First content "
        "is late by design by (hold-back + 1) x the upstream's pace (a word is final once the "
        "next one arrives, then hold-back words wait); *overhead* is the added p50 beyond that.",
        "",
        "| policy | streams | errors | crossings | halted (upstream closed) | first content "
        "p50 / p95, ms | added | by design | overhead | chunk gap p50 / p95, ms | added "
        "| RSS idle / peak, MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| direct upstream | {d['completed']} | {d['errors']} | - | - | "
        f"{d['ttft_p50']:.0f} / {d['ttft_p95']:.0f} | - | - | - | {d['gap_p50']:.0f} / "
        f"{d['gap_p95']:.0f} | - | - |",
    ]
    for name, p in result["policies"].items():
        a = p["added"]
        design = p.get("by_design_ttft_ms", float("nan"))
        lines.append(
            f"| {name} (hold-back {p.get('hold_back_tokens', '?')}) | {p['completed']} | "
            f"{p['errors']} | {p['state_crossings']} | {p['halted_streams']} "
            f"({p['upstream_closed_early']}) | {p['ttft_p50']:.0f} / {p['ttft_p95']:.0f} | "
            f"{a['ttft_p50']:+.0f} / {a['ttft_p95']:+.0f} | {design:.0f} | "
            f"{a['ttft_p50'] - design:+.0f} | {p['gap_p50']:.1f} / {p['gap_p95']:.0f} | "
            f"{a['gap_p50']:+.1f} / {a['gap_p95']:+.0f} | {p['rss_idle_mb']:.0f} / "
            f"{p['rss_peak_mb']:.0f} |")
    cpu = {name: p["proxy_cpu_ms_per_stream"] for name, p in result["policies"].items()
           if "proxy_cpu_ms_per_stream" in p}
    if cpu:
        lines += ["", "Proxy CPU per stream (all its threads, ms): " + ", ".join(
            f"{name} {ms:.1f}" for name, ms in cpu.items())
            + (f"; serve arguments {' '.join(result['serve_args'])}"
               if result.get("serve_args") else "")
            + f"; 1-minute load {result.get('load_1m_before', '?')} at the start."]
    mixes = {name: p["hostile_mix"] for name, p in result["policies"].items()
             if "hostile_mix" in p}
    if mixes:
        lines += [
            "", f"With one whitespace-free stream ({result.get('hostile_kib', '?')} KiB in "
            f"{HOSTILE_PIECE}-character deltas, no pauses) among the normal ones: the normal "
            "streams' p95, ms, without / with it (ratio).", "",
            "| policy | whole stream | first content | chunk gap | hostile streams done |",
            "|---|---|---|---|---|",
        ]
        for name, m in mixes.items():
            cells = [f"{m['without'][k]:.0f} / {m['with'][k]:.0f} ({m['ratio'][k]}x)"
                     for k in ("stream_p95", "ttft_p95", "gap_p95")]
            lines.append(f"| {name} | {' | '.join(cells)} | {m['hostile_completed']} of "
                         f"{m['hostile_streams']} |")
    return "\n".join(lines) + "\n"



# End-to-end checks against a real llama.cpp server (bench/real_upstream.py; run by hand: the
# server takes minutes to build) render after this section.
EXTRA_RESULTS = {"real_upstream": real_upstream.render}

if __name__ == "__main__":
    main()
