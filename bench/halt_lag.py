"""How far the upstream runs past a halt, per driver: the sync and async OpenAI wrappers, the
LangChain runnable and ``guardrail serve``, with the default (hidden-state) policy and a keyword
policy.

    python -m bench.halt_lag            # full run (writes bench/results/halt_lag.json)
    python -m bench.halt_lag --quick    # one repeat, sync wrapper and proxy only

A recorded harmful replay that the default guard halts (guardrail/data/demo_replays.jsonl, the
knockout guide) is served word by word by the loopback upstream (guardrail.testing.upstream, a
real HTTP server, ``DELAY`` s between chunks: 25 words/s). The upstream stamps every chunk it
writes and the moment it sees the client hang up; a hook on the guard stamps the halt verdict.
Per run:

- *halting chunk*: the chunk that holds the halting token;
- *at the verdict*: chunks the upstream had written when the guard decided (minus the halting
  chunk: how far the guard was behind the upstream, a cost of the guard's speed, not the driver);
- *past the verdict*: chunks the upstream wrote after the verdict, before it saw the close (what
  the driver controls: every driver pulls one read at a time and closes the upstream at once);
- *verdict to close*: ms from the verdict to the upstream noticing the hang-up.

The default policy runs on one observer (torch, 1 thread) with reads when a decision is due; the
keyword policy halts on a word near the same place, with the same hold-back. The drivers and
policies take turns; the proxy runs in this process (uvicorn in a thread) so its verdicts can be
stamped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from guardrail import hookimpl

from .common import median, write_result

NAME = "halt_lag"
DELAY = 0.04  # s between upstream chunks: 25 words/s
REPLAY = "harmful: knockout guide (recorded, pyrit violence eval)"
KEYWORD = "mandibular"  # word 18 of the replay; the default guard halts around word 20
DRIVERS = ("openai", "openai-async", "langchain", "proxy")
QUICK_DRIVERS = ("openai", "proxy")


class HaltClock:
    """A guard plugin that stamps the first halt verdict of the current run."""

    def __init__(self) -> None:
        self.at: float | None = None
        self.halt: Any = None

    def reset(self) -> None:
        self.at, self.halt = None, None

    @hookimpl
    def guardrail_on_event(self, event: Any, session: Any) -> None:
        from guardrail.events import Halt

        if isinstance(event, Halt) and self.at is None:
            self.at, self.halt = time.monotonic(), event


def _guards(clock: HaltClock) -> dict[str, Any]:
    from guardrail import Guard
    from guardrail.guard import default_policy
    from guardrail.plugins import get_host

    host = get_host()
    host.register(clock, name="bench-halt-clock")
    base = default_policy(host)
    assert base.observer is not None
    observer = base.observer.model_copy(update={"options": {**base.observer.options,
                                                            "threads": 1}})
    default = Guard(base.model_copy(update={"observer": observer}), host=host)
    keyword = Guard.from_policy({
        "release": {"hold_back_tokens": base.release.hold_back_tokens},
        "monitors": [{"id": "weapons", "use": "keywords", "options": {"words": [KEYWORD]},
                      "action": "halt", "message": "I can't help with that."}]}, host=host)
    return {"default": default, "keyword": keyword}


# -- drivers: each streams one request to the end (or the halt) -----------------------------


def _openai(guard: Any, base_url: str, prompt: str) -> None:
    import openai

    client = guard.wrap(openai.OpenAI(base_url=base_url, api_key="bench", max_retries=0))
    for _ in client.chat.completions.create(
            model="scripted", stream=True, messages=[{"role": "user", "content": prompt}]):
        pass


def _openai_async(guard: Any, base_url: str, prompt: str) -> None:
    import openai

    async def go() -> None:
        client = guard.wrap(openai.AsyncOpenAI(base_url=base_url, api_key="bench",
                                               max_retries=0))
        stream = await client.chat.completions.create(
            model="scripted", stream=True, messages=[{"role": "user", "content": prompt}])
        async with stream:
            async for _ in stream:
                pass

    asyncio.run(go())


def _langchain(guard: Any, base_url: str, prompt: str) -> None:
    from langchain_openai import ChatOpenAI

    model = ChatOpenAI(base_url=base_url, api_key="bench", model="scripted",
                       max_retries=0)
    for _ in guard.wrap_model(model).stream([("user", prompt)]):
        pass


@contextmanager
def _proxy(guard: Any, upstream_url: str) -> Iterator[Callable[[Any, str, str], None]]:
    """The proxy in this process; the driver is a plain openai client talking to it."""
    import openai
    from guardrail_server import create_app, running

    app = create_app(guard, upstream=upstream_url, metrics=False, dashboard=False)
    with running(app) as proxy:
        client = openai.OpenAI(base_url=proxy.base_url, api_key="bench", max_retries=0)

        def drive(_guard: Any, _base_url: str, prompt: str) -> None:
            for _ in client.chat.completions.create(
                    model="scripted", stream=True,
                    messages=[{"role": "user", "content": prompt}]):
                pass

        yield drive


DRIVE: dict[str, Callable[[Any, str, str], None]] = {
    "openai": _openai, "openai-async": _openai_async, "langchain": _langchain}


def _once(drive: Callable[[Any, str, str], None], guard: Any, server: Any, clock: HaltClock,
          replay: dict[str, Any], chunks: list[str]) -> dict[str, Any]:
    from guardrail.testing.upstream import Script

    clock.reset()
    server.enqueue(Script(chunks=chunks, delay=DELAY))
    before = len(server.completions())
    t0 = time.perf_counter()
    drive(guard, server.base_url, replay["prompt"])
    wall = time.perf_counter() - t0
    record = server.completions()[before]
    record.wait()
    content_times = record.chunk_times[1:len(chunks) + 1]  # the first chunk carries the role
    written = len(content_times)
    row: dict[str, Any] = {"chunks": len(chunks), "written": written, "wall_s": round(wall, 3),
                           "halted": clock.halt is not None}
    if clock.halt is None or clock.at is None:
        return row
    end, halt_chunk = 0, len(chunks)
    for i, chunk in enumerate(chunks):
        end += len(chunk)
        if end > clock.halt.at_char:
            halt_chunk = i + 1
            break
    at_verdict = sum(1 for t in content_times if t <= clock.at)
    row.update({
        "halt_chunk": halt_chunk, "at_verdict": at_verdict,
        "behind_at_verdict": at_verdict - halt_chunk,
        "past_verdict": written - at_verdict, "past_halt": written - halt_chunk,
        "verdict_to_close_ms": (round((record.disconnected_at - clock.at) * 1000, 1)
                                if record.disconnected_at is not None else None)})
    return row


def main(argv: list[str] | None = None) -> Path:
    import guardrail_server  # noqa: F401 - imported before any run (see _proxy)

    from guardrail.testing.upstream import UpstreamServer, split_words

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--drivers", nargs="+", choices=DRIVERS)
    parser.add_argument("--policies", nargs="+", choices=("default", "keyword"))
    args = parser.parse_args(argv)
    drivers = args.drivers or (QUICK_DRIVERS if args.quick else DRIVERS)
    repeats = args.repeats or (1 if args.quick else 3)
    lines = resources.files("guardrail").joinpath("data/demo_replays.jsonl").read_text("utf-8")
    replay = next(r for r in map(json.loads, filter(str.strip, lines.splitlines()))
                  if r["title"] == REPLAY)
    chunks = split_words(replay["response"])
    clock = HaltClock()
    guards = {k: v for k, v in _guards(clock).items() if k in (args.policies or (k,))}
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    load_before = os.getloadavg()[0]
    with UpstreamServer() as server:
        for rep in range(repeats):
            for policy in (list(guards) if rep % 2 == 0 else list(reversed(guards))):
                guard = guards[policy]
                for driver in drivers:
                    if driver == "proxy":
                        with _proxy(guard, server.base_url) as drive:
                            row = _once(drive, guard, server, clock, replay, chunks)
                    else:
                        row = _once(DRIVE[driver], guard, server, clock, replay, chunks)
                    runs.setdefault((policy, driver), []).append(row)
                    print(f"[halt_lag] {policy} / {driver}: {row}", file=sys.stderr)
    rows = []
    for (policy, driver), done in runs.items():
        halted = [r for r in done if r.get("halted")]

        def med(key: str, halted: list[dict[str, Any]] = halted) -> float | None:
            values = [r[key] for r in halted if r.get(key) is not None]
            return median(values) if values else None

        rows.append({"policy": policy, "driver": driver, "runs": done, "halted": len(halted),
                     "chunks": done[0]["chunks"], "halt_chunk": med("halt_chunk"),
                     "written_median": median([r["written"] for r in done]),
                     "behind_at_verdict_median": med("behind_at_verdict"),
                     "past_verdict_median": med("past_verdict"),
                     "past_verdict_max": max((r["past_verdict"] for r in halted), default=None),
                     "past_halt_median": med("past_halt"),
                     "verdict_to_close_ms_median": med("verdict_to_close_ms"),
                     "wall_median_s": median([r["wall_s"] for r in done])})
    return write_result(NAME, {"quick": args.quick, "delay_s": DELAY, "replay": REPLAY,
                               "keyword": KEYWORD, "repeats": repeats, "rows": rows,
                               "load_1m": [round(load_before, 2),
                                           round(os.getloadavg()[0], 2)]})


def _load(result: dict[str, Any]) -> str:
    load = result.get("load_1m")
    return "-" if not load else f"{load[0]:.1f} at the start, {load[-1]:.1f} at the end"


def _cell(value: float | None, fmt: str = "{:.0f}") -> str:
    return "-" if value is None else fmt.format(value)


def render(result: dict[str, Any]) -> str:
    out = [
        "## How far the upstream runs past a halt",
        "",
        f"Each driver against the loopback upstream serving the recorded replay "
        f"\"{result['replay']}\" one word per chunk, {result['delay_s'] * 1000:.0f} ms apart "
        "(bench/halt_lag.py). The upstream stamps each chunk it writes and when it sees the "
        "hang-up; a guard hook stamps the halt verdict. *Behind at the verdict*: chunks the "
        "upstream had written past the halting chunk when the guard decided (the guard's speed); "
        "*past the verdict*: chunks written after the verdict before the upstream saw the close "
        "(the driver's part: every driver pulls one read at a time and closes at once). Default "
        "policy: torch observer, 1 thread, reads when due; keyword: halts on "
        f"\"{result.get('keyword', '?')}\" with the same hold-back. Medians of "
        f"{result.get('repeats', '?')} runs, policies and drivers taking turns; the machine was "
        f"shared while we measured (1-minute load {_load(result)}). Where the upstream finished "
        "before the verdict, *written* is the whole answer and there was nothing left to close.",
        "",
        "| policy | driver | chunks | halting chunk | written | behind at the verdict | "
        "past the verdict (max) | verdict to close, ms | wall s | halted |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if "policy" not in r:  # a result from before drivers were compared
            continue
        out.append(
            f"| {r['policy']} | {r['driver']} | {r['chunks']} | {_cell(r['halt_chunk'])} | "
            f"{r['written_median']:.0f} | {_cell(r['behind_at_verdict_median'])} | "
            f"{_cell(r['past_verdict_median'])} ({_cell(r['past_verdict_max'])}) | "
            f"{_cell(r['verdict_to_close_ms_median'], '{:.1f}')} | {r['wall_median_s']:.1f} | "
            f"{r['halted']} of {len(r['runs'])} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
