"""The prompt's states for a harm head with a prompt term: each record's context read once by the
observer and pooled as the runtime pools it for a monitor (``Needs.context``, the weights'
``prompt_feature: context_mean``), cached to a file.

A record's context is its conversation (``messages``, up to and including the final user turn)
when it has one, else its prompt as one user message (``record_conversation``, as ``guardrail
eval`` reads records). The pooled span runs from the first token of the last user message's
content (an earlier user message's when the last is a short follow-up, under
``SHORT_TURN_TOKENS`` tokens) through the last context token (the assistant header included), in
the context the observer renders (its chat template with the generation prompt, cut to the
window's context budget). Its start is found by rendering the conversation with that content
replaced by two probe strings and taking the first token where the renderings differ; a cut
context pools what is left of the span. ``context_span`` takes it from the runtime's own
``span_start``. This is the definition of the runtime's ``Needs.context`` (docs/observer.md,
"The context's pooled states") and of the eighth pass's prompt features
(docs/harmful-content.md).

    python -m guardrail_harmful_content.training.context --pool POOL.jsonl... --out STATES.npz

The cache (``.npz``, no pickle): ``prompts`` (str: each context's key, ``context_key``: a
prompt's text, a conversation's JSON), ``states`` ``(prompts, layers, hidden)`` float32,
``layers``, ``model`` and ``feature``. A run adds the contexts the file lacks and saves as it
goes, so a cut run resumes; a file written for another model, layer set or feature is refused.
A cache written before conversations were read holds single-turn keys, which are unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from guardrail.messages import normalize_messages
from guardrail.observer.context import PROBES

from .pooled import PoolRecord

__all__ = ["FEATURE", "PROBES", "Context", "PromptStates", "asked_prompt", "attach_prompt_states",
           "context_key", "context_span", "context_states", "conversation_of",
           "extract_prompt_states", "load_prompt_states", "main", "prompt_messages",
           "record_conversation"]

FEATURE = "context_mean"  # the weights' prompt_feature
SAVE_EVERY = 200  # prompts read between two writes of the cache

Context = str | Sequence[Mapping[str, Any]]
"""What the observer reads before an answer: a prompt (one user message) or a conversation."""


@dataclass
class PromptStates:
    """Pooled context states: ``states[i]`` ``(len(layers), hidden)`` is that of the context
    whose ``context_key`` is ``prompts[i]``."""

    prompts: list[str]
    states: np.ndarray
    layers: tuple[int, ...]
    model: str
    feature: str = FEATURE

    def by_prompt(self) -> dict[str, dict[int, np.ndarray]]:
        return {p: {layer: self.states[i, j] for j, layer in enumerate(self.layers)}
                for i, p in enumerate(self.prompts)}


def prompt_messages(prompt: str) -> list[dict[str, str]]:
    """The conversation a prompt alone stands for: one user message."""
    return [{"role": "user", "content": prompt}]


def conversation_of(context: Context) -> list[dict[str, str]]:
    """A prompt as one user message, a conversation normalised (``normalize_messages``)."""
    return prompt_messages(context) if isinstance(context, str) else normalize_messages(context)


def record_conversation(record: Mapping[str, Any]) -> list[dict[str, str]]:
    """What the observer reads before a build or pool record's response: its ``messages``, else
    its ``prompt`` as one user message (``guardrail.toolkit.records.Record.conversation``)."""
    messages = record.get("messages")
    if messages is not None:
        return normalize_messages(messages)
    return prompt_messages(str(record["prompt"]))


def context_key(context: Context) -> str:
    """A context's key in the cache and among a pool's records: the user message's text for a
    conversation of one user message (a prompt; the key caches held before conversations were
    read), else the normalised conversation as compact JSON."""
    messages = conversation_of(context)
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return json.dumps(messages, ensure_ascii=False, separators=(",", ":"))


def asked_prompt(context: Context) -> str:
    """The last user message's content ('' without one): the runtime's ``MonitorContext.prompt``,
    whose blankness gives a stream the neutral prompt term."""
    messages = conversation_of(context)
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


def context_span(observer: Any, messages: Sequence[Any]) -> tuple[list[int], int]:
    """The context's ids as the observer reads them (cut to its context budget) and where the
    pooled span starts in them."""
    from guardrail.observer.context import span_start
    from guardrail.observer.model import render_context
    from guardrail.observer.window import context_budget

    ids = render_context(observer.hf_tokenizer, messages)
    cut = max(0, len(ids) - context_budget(observer.window))
    ids = ids[cut:]
    return ids, span_start(partial(render_context, observer.hf_tokenizer), messages, len(ids), cut)


def context_states(observer: Any, messages: Sequence[Any], layers: Sequence[int]
                   ) -> dict[int, np.ndarray]:
    """One forward of the context: each layer's rows averaged over the pooled span (float32)."""
    import torch

    ids, start = context_span(observer, messages)
    with torch.inference_mode():
        out = observer.model.base_model(input_ids=torch.tensor([ids], dtype=torch.long),
                                        output_hidden_states=True)
    return {layer: out.hidden_states[observer.hidden_index(layer)][0, start:].float().mean(0)
            .numpy() for layer in layers}


def load_prompt_states(path: Path) -> PromptStates:
    """A cache written by ``extract_prompt_states``."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return PromptStates([str(p) for p in data["prompts"]],
                                np.asarray(data["states"], dtype=np.float32),
                                tuple(int(x) for x in data["layers"]), str(data["model"]),
                                str(data["feature"]))
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(f"{path}: not a prompt-states cache ({exc})") from None


def _save(path: Path, found: PromptStates) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, prompts=np.asarray(found.prompts, dtype=np.str_), states=found.states,
             layers=np.asarray(found.layers, dtype=np.int64), model=np.str_(found.model),
             feature=np.str_(found.feature))
    os.replace(tmp, path)


def extract_prompt_states(observer: Any, prompts: Iterable[Context], layers: Sequence[int],
                          path: Path, progress: bool = True) -> PromptStates:
    """The pooled context states of every prompt or conversation (``context_states`` of a
    prompt's one-message conversation, of a conversation as it is), read once into the cache
    ``path`` (created, or added to), keyed by ``context_key``."""
    from tqdm import tqdm

    layers = tuple(int(x) for x in layers)
    model = str(getattr(observer, "name", ""))
    if path.exists():
        found = load_prompt_states(path)
        if (found.model, found.layers, found.feature) != (model, layers, FEATURE):
            raise ValueError(f"{path}: written for model {found.model!r}, layers "
                             f"{list(found.layers)}, feature {found.feature!r}; this run reads "
                             f"{model!r}, {list(layers)}, {FEATURE!r} (use another file)")
    else:
        found = PromptStates([], np.zeros((0, len(layers), observer.hidden_size), np.float32),
                             layers, model)
    have = set(found.prompts)
    contexts = {context_key(p): conversation_of(p) for p in prompts}
    todo = [key for key in contexts if key not in have]
    rows: list[np.ndarray] = []
    done: list[str] = []

    def flush() -> None:
        nonlocal found
        if done:
            found = PromptStates(found.prompts + done,
                                 np.concatenate([found.states, np.stack(rows)]), layers, model)
            done.clear()
            rows.clear()
        _save(path, found)

    for key in tqdm(todo, desc="prompt states", unit="prompt", disable=not progress):
        states = context_states(observer, contexts[key], layers)
        rows.append(np.stack([states[layer] for layer in layers]).astype(np.float32))
        done.append(key)
        if len(done) >= SAVE_EVERY:
            flush()
    if done or not path.exists():
        flush()
    return found


def attach_prompt_states(records: Sequence[PoolRecord],
                         states: Mapping[str, Mapping[int, np.ndarray]]) -> None:
    """Give each record its context's states (``PoolRecord.prompt``), found by its context's key
    (``extra["key"][0]``, ``selection.features.load_pool``); a record whose context the cache
    lacks is named."""
    for i, r in enumerate(records):
        key = str(r.extra["key"][0])
        if key not in states:
            raise ValueError(f"record {i} ({r.tag}): its prompt {key[:60]!r} is not in the "
                             "prompt-states cache (extract it: python -m "
                             "guardrail_harmful_content.training.context)")
        r.prompt = dict(states[key])


def _pool_contexts(pools: Sequence[Path]) -> list[list[dict[str, str]]]:
    """Each pool record's conversation, its line checked as ``guardrail eval`` checks it."""
    from guardrail.toolkit.records import DataError, read_records

    try:
        return [r.conversation() for pool in pools for r in read_records(pool)]
    except DataError as exc:  # it names the file and line
        raise ValueError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    from .inputs import load_observer

    parser = argparse.ArgumentParser(prog="python -m guardrail_harmful_content.training.context",
                                     description="Read every pool prompt's context once and "
                                                 "cache its pooled states (context_mean).")
    parser.add_argument("--pool", type=Path, nargs="+", required=True, help="pool JSON Lines")
    parser.add_argument("--out", type=Path, required=True, help="the cache (.npz)")
    parser.add_argument("--layers", type=int, nargs="+", default=[6, 9, 12, 15])
    parser.add_argument("--model", help="local HF model folder (default: the embedded SmolLM2)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        contexts = _pool_contexts(args.pool)
        found = extract_prompt_states(load_observer(args.model), contexts, args.layers, args.out,
                                      progress=not args.quiet)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"cache": str(args.out), "prompts": len(found.prompts),
                      "layers": list(found.layers), "model": found.model}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
