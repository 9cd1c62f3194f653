"""The observed model's own answers to benign LongFact prompts, as harmless records.

Why: every other harmless long answer in the build is template-generated (``longform``) or one of
pyrit's recorded responses, so the head never saw natural model prose about people, science and
technology labelled harmless, and it halted 22 of 100 of SmolLM2's own benign answers served by
llama.cpp (bench/real_upstream). Here SmolLM2 answers LongFact prompts that the template records
do not use, and its answers become ``own_answer`` records, label 0 by construction (LongFact asks
factual questions about objects and concepts; nothing is asked for that could be harmful).

Generation (``python -m guardrail_harmful_content.training.data own-answers``) is greedy, batched,
up to ``max_new_tokens`` tokens, through the model's chat template, over the first ``count``
prompts of ``prompt_order`` (a fixed shuffle). It appends one JSON line per answer, so an
interrupted run resumes where it stopped; lines are checked against the prompt order on every read.

Splitting: the first ``TEST_FIRST`` prompts and the held-out LongFact topics go to test (the
false-halt measurement on a real llama.cpp server uses those same first prompts); the rest are
split by prompt with the build's fractions, in a pass of their own so the other records keep
their splits.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .longform import HELDOUT_TOPICS, LongFactPrompt, unused_longfact_prompts
from .records import Example, group_id

__all__ = ["KIND", "SOURCE", "TEST_FIRST", "OwnAnswersConfig", "OwnAnswersError",
           "default_answers_file", "generate_own_answers", "own_answer_examples",
           "prompt_order", "read_own_answers"]

SOURCE = "smollm2:own-answers"
KIND = "own_answer"
TEST_FIRST = 100
MIN_CHARS = 20  # shorter answers (a name, an empty turn) are not long-form text; dropped
# The prompt order is that of the default build (seed 13, 250 template answers), whatever seed a
# build uses, so one answers file serves every build; a build with another seed drops the answers
# whose prompt its template records use.
ORDER_SEED, ORDER_TEMPLATE_COUNT = 13, 250


def prompt_order(longfact: Sequence[LongFactPrompt]) -> list[LongFactPrompt]:
    """The prompts own answers are written for, in order (see ``ORDER_SEED``)."""
    return unused_longfact_prompts(list(longfact), ORDER_SEED, ORDER_TEMPLATE_COUNT)


def default_answers_file() -> Path:
    """The shipped answers: SmolLM2-135M-Instruct's, written by ``generate_own_answers`` with the
    default config (regenerate with ``python -m guardrail_harmful_content.training.data own-answers
    --out`` this path; the same lines come back)."""
    return Path(__file__).with_name("own_answers.jsonl")


class OwnAnswersError(ValueError):
    """An own-answers file that does not fit the prompt order or the decoding it claims."""


@dataclass(frozen=True)
class OwnAnswersConfig:
    count: int = 1100
    max_new_tokens: int = 200
    batch_size: int = 16
    model: str = "SmolLM2-135M-Instruct"  # written into each line; a resumed file must match

    @property
    def decoding(self) -> str:
        return f"greedy, max_new_tokens {self.max_new_tokens}, batch {self.batch_size}"


def read_own_answers(path: Path, prompts: Sequence[LongFactPrompt]) -> list[dict[str, Any]]:
    """The file's answers, each checked against ``prompts`` (its index must point at its prompt)
    and against the other lines (one model, one decoding, no index twice)."""
    rows: list[dict[str, Any]] = []
    seen: set[int] = set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            row = json.loads(line)
            index, prompt, response = int(row["index"]), str(row["prompt"]), row["response"]
        except (ValueError, KeyError, TypeError) as exc:
            raise OwnAnswersError(f"{where}: not an own-answer line ({exc})") from exc
        if not isinstance(response, str):
            raise OwnAnswersError(f"{where}: 'response' must be a string")
        if not 0 <= index < len(prompts) or prompts[index].prompt != prompt:
            raise OwnAnswersError(f"{where}: prompt {index} is not the prompt at that place in "
                                  "the own-answer prompt order (a file written for another "
                                  "LongFact folder?)")
        if index in seen:
            raise OwnAnswersError(f"{where}: prompt {index} answered twice")
        if rows and (row.get("model"), row.get("decoding")) != (rows[0].get("model"),
                                                                 rows[0].get("decoding")):
            raise OwnAnswersError(f"{where}: model/decoding {row.get('model')!r}, "
                                  f"{row.get('decoding')!r} differ from line 1's")
        seen.add(index)
        rows.append(row)
    return rows


def generate_own_answers(path: Path, prompts: Sequence[LongFactPrompt], model: Any,
                         tokenizer: Any, config: OwnAnswersConfig | None = None,
                         progress: bool = True) -> dict[str, Any]:
    """Answer the first ``config.count`` of ``prompts`` with ``model`` (a Hugging Face causal LM
    and its tokenizer) into ``path``, skipping those the file already holds; return a summary."""
    from guardrail.observer.generation import end_of_turn_ids, greedy_batch
    from guardrail.observer.model import render_context

    config = config or OwnAnswersConfig()
    if config.count < 1 or config.batch_size < 1 or config.max_new_tokens < 1:
        raise ValueError("count, batch_size and max_new_tokens must be >= 1")
    chosen = list(prompts[: config.count])
    done = read_own_answers(path, prompts) if path.exists() else []
    if done and (done[0].get("model"), done[0].get("decoding")) != (config.model,
                                                                    config.decoding):
        raise OwnAnswersError(
            f"{path} holds answers from {done[0].get('model')!r} ({done[0].get('decoding')}); "
            f"this run would add {config.model!r} ({config.decoding}): use another --out")
    have = {int(row["index"]) for row in done}
    todo = [i for i in range(len(chosen)) if i not in have]
    eos = end_of_turn_ids(tokenizer)
    if not eos:  # greedy decoding would never end a turn, and there is nothing to pad with
        raise OwnAnswersError("the tokenizer has no end-of-turn or end-of-sequence token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    bar = tqdm(total=len(todo), desc="own answers", unit="answer", disable=not progress)
    try:
        for start in range(0, len(todo), config.batch_size):
            batch = todo[start: start + config.batch_size]
            ids = [render_context(tokenizer, [{"role": "user", "content": chosen[i].prompt}])
                   for i in batch]
            answers = greedy_batch(model, ids, config.max_new_tokens, eos, int(pad))
            with path.open("a", encoding="utf-8") as fh:  # a cut run keeps whole batches
                for i, tokens in zip(batch, answers, strict=True):
                    fh.write(json.dumps({
                        "index": i, "prompt": chosen[i].prompt,
                        "response": tokenizer.decode(tokens, skip_special_tokens=True),
                        "tokens": len(tokens), "model": config.model,
                        "decoding": config.decoding}, ensure_ascii=False) + "\n")
            bar.update(len(batch))
    finally:
        bar.close()
    return {"path": str(path), "answers": len(have) + len(todo), "generated": len(todo),
            "seconds": round(time.perf_counter() - t0, 1)}


def own_answer_examples(rows: Sequence[dict[str, Any]], prompts: Sequence[LongFactPrompt],
                        ) -> tuple[list[Example], int]:
    """Harmless examples from checked rows (``read_own_answers``), and how many were too short."""
    out: list[Example] = []
    short = 0
    for row in sorted(rows, key=lambda r: int(r["index"])):
        index = int(row["index"])
        item = prompts[index]
        response = str(row["response"]).strip()
        if len(response) < MIN_CHARS:
            short += 1
            continue
        out.append(Example(
            prompt=item.prompt, response=response, label=0, source=SOURCE,
            group=group_id("prompt", item.prompt), kind=KIND,
            holdout=index < TEST_FIRST or item.topic in HELDOUT_TOPICS,
            extra={"topic": item.topic, "own_index": index}))
    return out, short

