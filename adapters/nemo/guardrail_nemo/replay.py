"""Replay recorded answers through real NeMo Guardrails and report what its reader saw.

    python -m guardrail_nemo.replay < job.json

The job (JSON on stdin): ``{"replays": [{"prompt", "response", "label"?}], "runs": [{"name",
"mode": "rail" | "model" | "regex", "policy": <guardrail policy mapping>, "patterns": [regex,
...] (mode regex), "chunk_size", "context_size", "stream_first", "config_path"?: a NeMo config
directory to load instead (its config.py registers the action)}]}``.

- ``rail``: our action as a streaming output rail (NeMo's windows decide when it runs);
- ``model``: ``GuardedChatModel`` in front of NeMo (per-token halting), no output rail;
- ``regex``: NeMo's own ``regex check output`` rail with ``patterns``, for comparison.

The main model is a chat model that streams the recorded answer word by word and counts what it
produced (``LLMRails(config, llm=...)`` takes precedence over the config's models). Prints one
JSON object: ``{"nemoguardrails": version, "rows": [...]}``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import yaml
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult

from guardrail import Guard

from ._action import COLANG, register
from ._model import GuardedChatModel

__all__ = ["ReplayChatModel", "main", "run_job"]


class ReplayChatModel(BaseChatModel):
    """Streams a recorded answer word by word; ``produced`` counts the words it generated."""

    text: str = ""
    produced: int = 0

    @property
    def _llm_type(self) -> str:
        return "replay"

    def _words(self) -> list[str]:
        words = self.text.split(" ")
        return [w + (" " if i < len(words) - 1 else "") for i, w in enumerate(words)]

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any
                  ) -> ChatResult:
        self.produced = len(self._words())
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content=self.text))])

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any
                ) -> Iterator[ChatGenerationChunk]:
        for i, word in enumerate(self._words()):
            self.produced = i + 1
            yield ChatGenerationChunk(message=AIMessageChunk(content=word))

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any
                       ) -> AsyncIterator[ChatGenerationChunk]:
        for i, word in enumerate(self._words()):
            self.produced = i + 1
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=word))
            if run_manager:
                await run_manager.on_llm_new_token(word, chunk=chunk)
            yield chunk
            await asyncio.sleep(0)


def _config(run: dict[str, Any]) -> Any:
    from nemoguardrails import RailsConfig

    if run.get("config_path"):  # a config directory as users write it (config.py registers)
        return RailsConfig.from_path(run["config_path"])

    flows = {"rail": ["guardrail check output"], "regex": ["regex check output"]}.get(
        run["mode"], [])
    rails: dict[str, Any] = {"output": {"flows": flows, "streaming": {
        "enabled": bool(flows), "chunk_size": run.get("chunk_size", 200),
        "context_size": run.get("context_size", 50),
        "stream_first": run.get("stream_first", True)}}}
    if run["mode"] == "regex":
        rails["config"] = {"regex_detection": {"output": {"patterns": run["patterns"],
                                                          "case_insensitive": True}}}
    content = {"models": [], "streaming": True, "rails": rails}
    colang = COLANG if run["mode"] == "rail" else ""
    return RailsConfig.from_content(colang_content=colang, yaml_content=yaml.safe_dump(content))


async def _one(run: dict[str, Any], replay: dict[str, Any]) -> dict[str, Any]:
    from nemoguardrails import LLMRails

    inner = ReplayChatModel(text=replay["response"])
    guard = Guard.from_policy(run["policy"]) if run.get("policy") else None
    llm: BaseChatModel = inner
    if run["mode"] == "model":
        assert guard is not None, "mode 'model' needs a policy"
        llm = GuardedChatModel(inner=inner, guard=guard)
    rails = LLMRails(_config(run), llm=llm)
    if run["mode"] == "rail" and not run.get("config_path"):
        register(rails, guard)
    shown, blocked, first = "", None, None
    t0 = time.perf_counter()
    async for chunk in rails.stream_async(messages=[{"role": "user",
                                                      "content": replay["prompt"]}]):
        text = chunk if isinstance(chunk, str) else json.dumps(chunk)
        if text.startswith('{"error"'):
            blocked = json.loads(text)["error"]
            break
        if first is None and text:
            first = time.perf_counter() - t0
        shown += text
    return {"run": run["name"], "label": replay.get("label"), "shown": shown,
            "blocked": blocked, "words_total": len(replay["response"].split(" ")),
            "words_generated": inner.produced, "ttft_s": first,
            "total_s": time.perf_counter() - t0}


async def _run(job: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for run in job["runs"]:
        for i, replay in enumerate(job["replays"]):
            rows.append({"index": i, **await _one(run, replay)})
    return rows


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    from importlib.metadata import version

    return {"nemoguardrails": version("nemoguardrails"), "rows": asyncio.run(_run(job))}


def main() -> None:
    print(json.dumps(run_job(json.load(sys.stdin))))


if __name__ == "__main__":
    main()
