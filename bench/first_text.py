"""First text behind ``guardrail serve``: how long after the upstream's first token the reader
gets its first text, with the default policy.

A session reads its conversation with the observer; since 2026-12-05 the proxy starts that read
when it sends the request upstream (``Guard.prepare``), so it runs while the upstream works on
its first token, where before it began with the first text. This benchmark serves the demo's
replays (cut to ``WORDS`` words, a token per chunk at 25 tokens/s) from the loopback upstream,
which waits ``--first-delay`` seconds before it answers (an API's time to first token), through
``guardrail serve`` from this checkout and from ``--baseline PATH`` (another checkout, e.g. the
commit before), both in subprocesses with ``OMP_NUM_THREADS=1``, taking turns round by round.

Conversations: the replay's question alone; the same after a system prompt of about 330
tokens (an assistant's instructions), which every request shares, so after the first the
observer reuses its cached keys and values (the prefix cache); and the same system prompt opened
by a line unique to the request (as a retrieved passage would be), which no request shares. Per
proxy, conversation and concurrency (1 and 4 streams at once): *first text after the
upstream's*, ms from the upstream's first content chunk to the reader's first content (medians
and p90 over the streams; hold-back 8 means the reader's first text waits for about 8 tokens,
320 ms at 25 tokens/s, whatever the guard does), and the same from the request.

    python -m bench.first_text --baseline /path/to/checkout   # bench/results/first_text.json
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from .common import median, write_result
from .serve_pace import DELAY, Proxy, StreamResult, load_scripts, one_stream

NAME = "first_text"
WORDS = 40
SYSTEM = (
    "You are the support assistant of a regional bank. Answer in plain, friendly English and "
    "keep answers short unless the customer asks for detail. Never ask for or repeat a full "
    "card number, a PIN, a password or a one-time code; if a customer types one, tell them to "
    "change it and do not repeat it. You can explain accounts, cards, transfers, fees, loans, "
    "mortgages and savings products in general terms, and you can tell customers where to find "
    "things in the mobile app and the online bank. You cannot see a customer's accounts, move "
    "money or change settings: for anything about a specific account, send the customer to the "
    "secure messages in the app or to the phone line, which is open from eight in the morning "
    "to eight in the evening on weekdays and from nine to five on Saturdays. If a customer "
    "describes a lost or stolen card, tell them to freeze it in the app at once and to call the "
    "card line, which is open day and night. If a customer seems to be the target of a scam (a "
    "caller who claims to be from the bank, a message with a link, pressure to move money to a "
    "'safe account'), tell them to stop, hang up and call the number on the back of their card. "
    "Do not give investment, tax or legal advice; say that an adviser can help and how to book "
    "one. Be patient with customers who are upset, and never promise refunds or outcomes that "
    "only a member of staff can decide. If you do not know an answer, say so and say where the "
    "customer can find out. Today's date and the customer's name are not known to you."
)
# "context + question": the system prompt opened by a line unique to the request (a retrieved
# passage, a user profile), so no stream reuses another's cached prefix (docs/observer.md,
# "Shared conversation prefixes").
CONVERSATIONS = ("question", "system + question", "context + question")
LEVELS = (1, 4)


def _body_messages(conversation: str, prompt: str, tag: str) -> list[dict[str, str]]:
    messages = [{"role": "user", "content": prompt}]
    if conversation == "system + question":
        return [{"role": "system", "content": SYSTEM}, *messages]
    if conversation == "context + question":
        return [{"role": "system", "content": f"Request {tag}. {SYSTEM}"}, *messages]
    return messages


async def _round(base_url: str, scripts: list[dict[str, Any]], conversation: str, streams: int,
                 r: int, tag: str) -> list[StreamResult]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=streams)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        ks = [(w + r) % len(scripts) for w in range(streams)]
        done = await asyncio.gather(*(
            one_stream(client, base_url, scripts[k], k, f"{tag}-k{k}-w{w}-r{r}",
                       messages=_body_messages(conversation, scripts[k]["prompt"],
                                               f"{tag}-k{k}-w{w}-r{r}"))
            for w, k in enumerate(ks)))
    return list(done)


def _responder(scripts: list[dict[str, Any]], first_delay: float) -> Any:
    from guardrail.testing.upstream import Script

    def script_for(body: Mapping[str, Any]) -> Script:
        k = int(str(body.get("model", "")).split("-k")[1].split("-")[0])
        return Script(chunks=scripts[k]["chunks"], delay=DELAY, first_delay=first_delay)

    return script_for


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


def _row(results: list[StreamResult], records: dict[str, Any]) -> dict[str, Any]:
    after_upstream: list[float] = []
    after_request: list[float] = []
    errors = 0
    for r in results:
        record = records.get(r.model)
        if not r.ok or record is None or len(record.chunk_times) < 2 or not r.content_times:
            errors += 1
            continue
        after_upstream.append((r.content_times[0] - record.chunk_times[1]) * 1000)
        after_request.append((r.content_times[0] - r.started) * 1000)
    if not after_upstream:
        return {"streams": len(results), "errors": errors}
    return {"streams": len(results), "errors": errors,
            "first_text_after_upstream_ms": round(median(after_upstream), 1),
            "first_text_after_upstream_p90_ms": round(_p90(after_upstream), 1),
            "first_text_after_request_ms": round(median(after_request), 1)}


def run(baseline: Path | None, first_delay: float, rounds: int, say: Any) -> dict[str, Any]:
    from guardrail.testing.upstream import UpstreamServer

    scripts = load_scripts(WORDS)
    names = ["ours"] + (["baseline"] if baseline is not None else [])
    out: dict[str, Any] = {name: {} for name in names}
    with UpstreamServer(responder=_responder(scripts, first_delay)) as upstream, \
            tempfile.TemporaryDirectory() as tmp:
        proxies: dict[str, Proxy] = {}
        try:
            for k, name in enumerate(names):
                proxies[name] = Proxy(upstream.base_url, Path(tmp) / f"proxy{k}",
                                      tree=baseline if name == "baseline" else None)
            # warm up: the first forwards of a fresh process pay for loading and packing
            for name in names:
                asyncio.run(_round(proxies[name].base_url, scripts, "question", 1, 0,
                                   f"warm-{name}"))
            for conversation in CONVERSATIONS:
                for n in LEVELS:
                    results: dict[str, list[StreamResult]] = {name: [] for name in names}
                    for r in range(rounds):  # the proxies take turns, round by round
                        for name in (names if r % 2 == 0 else names[::-1]):
                            tag = f"{name}-{conversation.replace(' ', '')}-{n}"
                            results[name] += asyncio.run(_round(
                                proxies[name].base_url, scripts, conversation, n, r, tag))
                    for record in upstream.completions():
                        record.wait(5)
                    records = {str((rec.body or {}).get("model")): rec
                               for rec in upstream.completions()}
                    for name in names:
                        row = _row(results[name], records)
                        row["load_1m"] = round(os.getloadavg()[0], 2)
                        out[name].setdefault(conversation, {})[str(n)] = row
                        say(f"{name}, {conversation}, {n} streams: {row}")
        finally:
            for proxy in proxies.values():
                proxy.stop()
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", type=Path, metavar="PATH",
                        help="another checkout whose code serves the same policy, in turns")
    parser.add_argument("--first-delay", type=float, default=0.5,
                        help="seconds the upstream waits before it answers (default 0.5)")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    rows = run(args.baseline, args.first_delay, args.rounds, print)
    return write_result(NAME, {"first_delay_s": args.first_delay, "rounds": args.rounds,
                               "words": WORDS, "chunk_delay_s": DELAY,
                               "baseline": str(args.baseline) if args.baseline else None,
                               "seconds": round(time.monotonic() - t0, 1), "rows": rows})


def render(result: dict[str, Any]) -> str:
    """The docs/benchmarks.md section."""
    rows = result["rows"]
    lines = ["## First text behind `guardrail serve`", "",
             f"The default policy behind `guardrail serve`; the loopback upstream waits "
             f"{result['first_delay_s']} s before it answers (its time to first token), then "
             f"streams a token per chunk at 25 tokens/s (the demo's replays cut to "
             f"{result['words']} words). *ours*: the proxy reads the conversation while the "
             "upstream works on its first token (`Guard.prepare`); *baseline*: the code before, "
             "which reads it at the first text. Both proxies in one run, taking turns round by "
             f"round ({result['rounds']} rounds). ms from the upstream's first content chunk to "
             "the reader's first content (median / p90; hold-back 8 tokens is about 320 ms of "
             "it at this pace), and from the request (median) (bench/first_text.py).", "",
             "| conversation | streams | proxy | first text after the upstream's, ms "
             "(median / p90) | after the request, ms | 1-minute load |",
             "|---|---|---|---|---|---|"]
    conversations = rows.get("ours", {})
    for conversation, levels in conversations.items():
        for n in levels:
            for name in rows:
                row = rows[name].get(conversation, {}).get(n, {})
                if "first_text_after_upstream_ms" not in row:
                    continue
                lines.append(
                    f"| {conversation} | {n} | {name} | "
                    f"{row['first_text_after_upstream_ms']:.0f} / "
                    f"{row['first_text_after_upstream_p90_ms']:.0f} | "
                    f"{row['first_text_after_request_ms']:.0f} | {row.get('load_1m', '')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
