"""``guardrail serve --ray``: aggregate tokens/s with 1 and 2 observer replicas.

    python -m bench.ray_throughput            # writes bench/results/ray_throughput.json
    python -m bench.ray_throughput --quick    # 2 short streams, one run per configuration

A local Ray instance (``num_cpus`` = this machine's cores) runs the application with one proxy
replica and 1, then 2, observer replicas (SmolLM2-135M, torch, the default products: float16
where the CPU runs them; one thread each). The policy
is the default ``harmful-content`` monitor alone (the router's own model would share the same
cores). ``--streams`` OpenAI clients stream SmolLM2's own answers
(plugins/harmful-content/.../own_answers.jsonl) at once from the loopback upstream, which sends a
word per chunk without pauses, so the guard is the bottleneck. *tokens/s*: tokens the observer
replicas read (their own count) over the wall time from the first request to the last stream's
end; median of ``--repeats`` runs after one warm-up stream. The mean batch (reads per
``@serve.batch`` call) says how much the replicas gathered.

On a 2-core machine the replicas share the cores with the proxy, the Serve proxy and the clients:
the figures show what the scheme costs and gains on one small machine, not on a cluster
(docs/scaling.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from .common import free_port, median, wait_healthy, write_result

NAME = "ray_throughput"
APP = "guardrail-bench"
STREAMS = 8
QUICK_STREAMS = 2
TOKENS_PER_STREAM = 120  # each answer cut to about this many SmolLM2 tokens
QUICK_TOKENS_PER_STREAM = 40
REPEATS = 3


def _answers(n: int, tokenizer: Any, budget: int) -> list[tuple[str, str]]:
    """(prompt, answer) of the first ``n`` of SmolLM2's own answers, each cut to a token budget."""
    rows = resources.files("guardrail_harmful_content").joinpath(
        "training/data/own_answers.jsonl").read_text("utf-8").splitlines()
    out = []
    for line in rows[:n]:
        row = json.loads(line)
        ids = tokenizer(row["response"], add_special_tokens=False)["input_ids"]
        text = tokenizer.decode(ids[:budget]) if len(ids) > budget else row["response"]
        out.append((row["prompt"], text))
    return out


def _policy() -> Any:
    from guardrail.guard import default_policy

    return default_policy().narrowed(["harm"])


def _stream(base_url: str, prompt: str) -> str | None:
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="k", max_retries=0, timeout=600)
    finish = None
    for chunk in client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": prompt}], stream=True):
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    return finish


def _all(base_url: str, prompts: list[str]) -> list[str | None]:
    finishes: list[str | None] = [None] * len(prompts)

    def run(i: int) -> None:
        finishes[i] = _stream(base_url, prompts[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return finishes


def _shard_totals(names: list[str]) -> dict[str, int]:
    from ray import serve

    stats = [serve.get_deployment_handle(n, APP).stats.remote().result(timeout_s=120)
             for n in names]
    return {key: sum(int(s[key]) for s in stats) for key in ("tokens", "reads", "batches")}


def _one_process(upstream: str, prompts: list[str], tokens: int, repeats: int,
                 workdir: Path) -> dict[str, Any]:
    """The same streams through one ``guardrail serve`` process (no Ray), for the ratio."""
    import yaml

    policy = workdir / "policy.yaml"
    policy.write_text(yaml.safe_dump(_policy().model_dump(mode="json", exclude_unset=True)))
    port = free_port()
    code = "import sys; from guardrail.cli import main; sys.exit(main())"
    proc = subprocess.Popen([sys.executable, "-c", code, "serve", "--policy", str(policy),
                             "--upstream", upstream, "--port", str(port)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.DEVNULL)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_healthy(port, proc, 120)
        _all(base_url, prompts[:1])
        runs: list[dict[str, Any]] = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            finishes = _all(base_url, prompts)
            wall = time.perf_counter() - t0
            runs.append({"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
                         "finishes": {f or "none": finishes.count(f) for f in set(finishes)}})
        return {"runs": runs, "tokens_per_s": median([r["tokens_per_s"] for r in runs])}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _config(observers: int, base_url: str, upstream: str, prompts: list[str],
            repeats: int) -> dict[str, Any]:
    from guardrail_server.ray import (
        DeployConfig,
        ObserverDeploy,
        ProxyDeploy,
        build_app,
        observer_shard_names,
    )
    from ray import serve

    config = DeployConfig(proxy=ProxyDeploy(replicas=1, num_cpus=0),
                          observer=ObserverDeploy(replicas=observers, num_cpus=0))
    names = observer_shard_names(config)
    serve.run(build_app(_policy(), upstream, config), name=APP, route_prefix="/")
    try:
        _all(base_url, prompts[:1])  # warm-up: every replica has loaded, one stream read
        runs: list[dict[str, Any]] = []
        for _ in range(repeats):
            before = _shard_totals(names)
            t0 = time.perf_counter()
            finishes = _all(base_url, prompts)
            wall = time.perf_counter() - t0
            after = _shard_totals(names)
            done = {k: after[k] - before[k] for k in after}
            runs.append({"wall_s": wall, "tokens": done["tokens"],
                         "tokens_per_s": done["tokens"] / wall,
                         "mean_batch": done["reads"] / max(1, done["batches"]),
                         "finishes": {f or "none": finishes.count(f) for f in set(finishes)}})
        return {"observer_replicas": observers, "runs": runs,
                "tokens_per_s": median([r["tokens_per_s"] for r in runs]),
                "mean_batch": median([r["mean_batch"] for r in runs])}
    finally:
        serve.delete(APP)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--streams", type=int)
    parser.add_argument("--repeats", type=int)
    args = parser.parse_args(argv)
    streams = args.streams or (QUICK_STREAMS if args.quick else STREAMS)
    repeats = args.repeats or (1 if args.quick else REPEATS)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the replicas inherit it: one thread each

    import ray
    from ray import serve
    from transformers import AutoTokenizer

    from guardrail.observer.hf import smollm2_dir
    from guardrail.testing.upstream import Script, UpstreamServer, split_words

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    budget = QUICK_TOKENS_PER_STREAM if args.quick else TOKENS_PER_STREAM
    answers = _answers(streams, tokenizer, budget)
    by_prompt = {f"stream-{i}: {p}": text for i, (p, text) in enumerate(answers)}

    def respond(body: Mapping[str, Any]) -> Script:
        return Script(chunks=split_words(by_prompt[body["messages"][-1]["content"]]))

    # every answer is streamed to its end (no halts on these), so the observer reads them whole
    tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"])
                 for t in by_prompt.values())
    load_before = os.getloadavg()[0]  # others' work on a shared machine skews every figure
    results = []
    with UpstreamServer(responder=respond) as upstream, \
            tempfile.TemporaryDirectory() as workdir:
        # the one-process baseline is left out of the quick smoke run (it starts its own server)
        single = None if args.quick else _one_process(upstream.base_url, list(by_prompt), tokens,
                                                      repeats, Path(workdir))
        ray.init(address="local", include_dashboard=False, object_store_memory=200 * 2**20,
                 logging_level=logging.WARNING, log_to_driver=False)
        try:
            port = free_port()  # Serve's HTTP proxy
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            for observers in (1, 2):
                results.append(_config(observers, f"http://127.0.0.1:{port}/v1",
                                       upstream.base_url, list(by_prompt), repeats))
        finally:
            serve.shutdown()
            ray.shutdown()
    one, two = results
    result = {"quick": args.quick, "streams": streams, "repeats": repeats,
              "tokens_per_stream": budget, "configs": results,
              "one_process": single,
              "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)],
              "ratio_2_to_1": two["tokens_per_s"] / one["tokens_per_s"],
              "ray": ray.__version__, "matmul": _default_products()}
    write_result(NAME, result)
    return result


def _default_products() -> str:
    """What ``observer.options.matmul: auto`` picks on this machine (the replicas run here)."""
    from guardrail.observer.llama_step import matmul_unsupported

    return "float32" if matmul_unsupported("float16") else "float16"


def render(result: dict[str, Any]) -> str:
    lines = ["## Ray Serve: aggregate throughput by observer replicas", "",
             f"`guardrail serve --ray` on a local Ray instance (Ray {result['ray']}), one proxy "
             "replica, `harmful-content` on SmolLM2-135M (torch, "
             f"{result.get('matmul', 'float32')} products, one thread per replica); "
             f"{result['streams']} concurrent streams of SmolLM2's own answers (about "
             f"{result['tokens_per_stream']} tokens each) from an upstream that does not pause; "
             f"median of {result['repeats']} run(s). Run by hand (`python -m "
             "bench.ray_throughput`), not by `make bench`.", "",
             "| observer replicas | tokens/s (all streams) | runs (min-max) | mean batch (reads "
             "per call) |", "| --- | --- | --- | --- |"]

    def spread(runs: list[dict[str, Any]]) -> str:
        rates = [r["tokens_per_s"] for r in runs]
        return f"{min(rates):.0f}-{max(rates):.0f}"

    if result.get("one_process"):
        single = result["one_process"]
        lines.append(f"| `guardrail serve`, one process, no Ray | "
                     f"{single['tokens_per_s']:.0f} | {spread(single['runs'])} | - |")
    for c in result["configs"]:
        lines.append(f"| {c['observer_replicas']} | {c['tokens_per_s']:.0f} | "
                     f"{spread(c['runs'])} | {c['mean_batch']:.1f} |")
    load = result.get("load_average")
    if load:
        lines += ["", f"Load average (1 min) at the start and the end of the run: {load[0]} and "
                  f"{load[1]}, on {result['machine']['cpu_count']} cores: other processes shared "
                  "the machine, and runs of one configuration spread as wide as the gaps "
                  "between the rows."]
    lines += ["", f"2 replicas / 1 replica: {result['ratio_2_to_1']:.2f}x. Each observer "
              "replica reads with one thread, so here a second replica can take the second "
              "core, which the proxy replica, Serve's HTTP proxy and the clients need too; on a "
              "cluster each replica brings its own CPU or GPU (docs/scaling.md). A mean batch "
              "near 1 says the observer replicas were rarely the queue: reads seldom waited for "
              "each other.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
