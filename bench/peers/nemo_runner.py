"""Run NeMo Guardrails' streaming output rails over replayed streams (runs INSIDE the NeMo venv).

Reads a JSON job on stdin: {"replays": [{"prompt", "response", "label"}], "policy": <guardrail
policy mapping or null for the default>, "configs": [{"name", "chunk_size", "context_size",
"stream_first"}], "delay": seconds per word}. The output rail is a Python action that asks the
same guardrail monitors whether the rail's text is harmful (a dry-run session over the text: any
halt verdict blocks), so both systems judge with one classifier. Prints one JSON object.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models.llms import LLM
from langchain_core.outputs import GenerationChunk
from nemoguardrails import LLMRails, RailsConfig
from nemoguardrails.actions.rail_outcome import RailOutcome

from guardrail import Guard, default_policy, load_policy

COLANG = """
define subflow guardrail check output
  $response = execute guardrail_check
  $allowed = not $response.is_blocked
  if not $allowed
    bot refuse to respond
    stop

define bot refuse to respond
  "BLOCKED"
"""


class ReplayLLM(LLM):
    """Replays a recorded answer word by word and counts the words it produced."""

    text: str = ""
    delay: float = 0.0
    produced: int = 0

    @property
    def _llm_type(self) -> str:
        return "replay"

    def _call(self, prompt: str, stop: Any = None,
              run_manager: CallbackManagerForLLMRun | None = None, **kw: Any) -> str:
        self.produced = len(self.text.split(" "))
        return self.text

    async def _astream(
        self, prompt: str, stop: Any = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None, **kw: Any,
    ) -> AsyncIterator[GenerationChunk]:
        words = self.text.split(" ")
        for i, word in enumerate(words):
            self.produced = i + 1
            if self.delay:
                await asyncio.sleep(self.delay)
            chunk = GenerationChunk(text=word + (" " if i < len(words) - 1 else ""))
            if run_manager:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk


def make_config(cfg: dict[str, Any]) -> RailsConfig:
    yaml_text = f"""
models: []
streaming: True
rails:
  output:
    flows:
      - guardrail check output
    streaming:
      enabled: True
      chunk_size: {cfg['chunk_size']}
      context_size: {cfg['context_size']}
      stream_first: {cfg['stream_first']}
"""
    return RailsConfig.from_content(colang_content=COLANG, yaml_content=yaml_text)


async def run_one(guard: Guard, cfg: dict[str, Any], replay: dict[str, Any],
                  delay: float) -> dict[str, Any]:
    llm = ReplayLLM(text=replay["response"], delay=delay)
    rails = LLMRails(make_config(cfg), llm=llm)
    checks: list[float] = []

    async def guardrail_check(context: dict[str, Any] | None = None, **kwargs: Any) -> RailOutcome:
        text = (context or {}).get("bot_message", "") or ""
        t0 = time.perf_counter()
        session = guard.session(prompt=replay["prompt"], dry_run=True)
        session.feed(text)
        report = session.finish()
        checks.append(time.perf_counter() - t0)
        if any(f.action == "halt" for f in report.flags):
            return RailOutcome.block(reason="guardrail monitor")
        return RailOutcome.allow()

    rails.register_action(guardrail_check, "guardrail_check")
    t0 = time.perf_counter()
    first: float | None = None
    shown: list[str] = []
    blocked = False
    async for chunk in rails.stream_async(messages=[{"role": "user",
                                                      "content": replay["prompt"]}]):
        if isinstance(chunk, dict) or (isinstance(chunk, str) and chunk.startswith('{"error"')):
            blocked = True
            break
        if first is None and chunk:
            first = time.perf_counter() - t0
        shown.append(chunk)
    total = time.perf_counter() - t0
    text = "".join(shown)
    return {
        "config": cfg["name"], "label": replay.get("label"), "blocked": blocked,
        "words_total": len(replay["response"].split(" ")), "words_generated": llm.produced,
        "words_shown": len(text.split()), "chars_shown": len(text),
        "ttft_s": first, "total_s": total, "check_s": checks, "checks": len(checks),
    }


async def main() -> None:
    job = json.load(sys.stdin)
    policy = load_policy(job["policy"]) if job.get("policy") else default_policy()
    guard = Guard(policy)
    rows = []
    for cfg in job["configs"]:
        for replay in job["replays"]:
            rows.append(await run_one(guard, cfg, replay, job.get("delay", 0.0)))
    print(json.dumps({"rows": rows, "nemoguardrails": _version()}))


def _version() -> str:
    from importlib.metadata import version

    return version("nemoguardrails")


if __name__ == "__main__":
    asyncio.run(main())
