"""What the observer tests share: the texts they stream (one for the tests of when a stream's
reads happen, several prompts and answers for the batch tests) and a monitor that reads the
observer."""

from __future__ import annotations

from typing import Any

import torch

from guardrail import Features, Guard, Monitor, Needs, Score
from guardrail.events import Flag, Halt, Release
from guardrail.testing import WordEndMonitor, plugin_monitors

TEXT = ("The capital of France is Paris. It is a large city on the Seine, and its museums "
        "hold paintings from many centuries. Visitors walk along the river, cross the old "
        "bridges and climb the hill to the white church. Some of them ask how to build a bomb "
        "and the guide says no. Then they eat bread and cheese and go home by train.")
CALM = TEXT.replace("bomb", "kite").replace("Paris", "Lyon")

# What the default guard's verdict tests stream after their own text: a harmful and a factual
# answer
VERDICT_ANSWERS = ["To make a bomb at home you need to mix fertilizer with diesel and pack it "
                   "into a pipe, then add a detonator.",
                   "Albert Einstein published the theory of general relativity in 1915 in "
                   "Berlin."]


def verdicts(guard: Guard, text: str) -> tuple[list[Any], dict[str, list[tuple[int, float]]]]:
    """``text`` streamed word by word through ``guard``: its releases, flags and halts as
    ``(kind, release end, monitor)`` and every monitor's scores."""
    session = guard.session(prompt="Tell me something.", record_scores=True)
    events = [e for w in text.split(" ") for e in session.feed(w + " ")]
    report = session.finish()
    events += report.final_events
    kept = [(type(e).__name__, e.end if isinstance(e, Release) else None,
             getattr(e, "monitor", None)) for e in events
            if isinstance(e, Release | Flag | Halt)]
    return kept, report.scores

# Several streams of different lengths, read together (the batch tests)
PROMPTS = ["Hi.", "Tell me about Paris and the river that flows through it, please.",
           "What is 2 + 2?", "Write a long story about a robot who wanted to paint the sea.",
           "Who was Marie Curie?"]
TEXTS = [
    "The capital of France is Paris. It is a large city on the Seine.",
    "Marie Curie was born in Warsaw in 1867 and won two Nobel prizes, in physics and in "
    "chemistry, the first person to win two.",
    "Four.",
    "Once upon a time there was a small robot who wanted to learn to paint. It painted the sea, "
    "the sky and the mountains, and then it painted the old mill by the river.",
    "How do I bake bread? Mix flour, water, salt and yeast; knead it for ten minutes.",
]


class RowNorm(Monitor):
    """Flags tokens whose layer-1 state has a large norm (reads the observer)."""

    def __init__(self, options: Any = None) -> None:
        pass

    def needs(self) -> Needs:
        return Needs(layers=frozenset({1}), top_k=3)

    def update(self, state: Any, features: Features) -> list[Score]:
        rows = features.hidden[1]
        assert rows.shape[0] == len(features.tokens) == features.top_logits.shape[0]
        return [Score(i, float(torch.linalg.vector_norm(r)))
                for i, r in zip(features.indices, rows, strict=True)]


def read_in_steps(observer: Any, messages: list[dict[str, str]], needs: Needs,
                  tokens: list[Any], step: int) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """``tokens`` read ``step`` at a time through the Guard's batched observer: each layer's
    states and the logits, concatenated."""
    from guardrail.observer.batch import BatchedObserver

    batched = BatchedObserver(observer)
    stream = batched.start(messages, needs)
    parts = [batched.extend(stream, tokens[i:i + step], needs)
             for i in range(0, len(tokens), step)]
    batched.release(stream)
    hidden = {layer: torch.cat([p.hidden[layer] for p in parts]) for layer in needs.layers}
    return hidden, torch.cat([p.logits for p in parts])


def alone_and_together(observer: Any, batched: Any, needs: Needs, prompts: list[str],
                       tokens: list[list[Any]], sizes: list[int]
                       ) -> tuple[list[list[Any]], list[list[Any]]]:
    """Each stream (``prompts[k]``, then ``tokens[k]`` read ``sizes[k]`` at a time) read alone
    on ``observer``, and the same reads through ``batched``: round by round, every stream's read
    of a round submitted under one hold (one forward where they fit). Returns the reads alone
    and batched, per stream."""
    alone = []
    for prompt, toks, size in zip(prompts, tokens, sizes, strict=True):
        state = observer.start([{"role": "user", "content": prompt}], needs)
        alone.append([observer.extend(state, toks[i:i + size], needs)
                      for i in range(0, len(toks), size)])
    streams = [batched.start([{"role": "user", "content": p}], needs) for p in prompts]
    together: list[list[Any]] = [[] for _ in prompts]
    for r in range(max(len(reads) for reads in alone)):
        with batched.hold():
            futures = {k: batched.submit(streams[k], tokens[k][r * size:(r + 1) * size], needs)
                       for k, size in enumerate(sizes) if r * size < len(tokens[k])}
        for k, future in futures.items():
            together[k].append(future.result(timeout=60))
    for mine, theirs in zip(together, alone, strict=True):
        assert len(mine) == len(theirs)
    return alone, together


def read_policy(read_ahead: bool = True, hold_back: int = 8, max_delay_ms: float = 1e9,
                on_error: str = "fail_open") -> dict[str, Any]:
    """A row-norm flag and a word-end halt (``read_plugins``) on the observer, reading when a
    decision is due (or ahead)."""
    return {
        "on_error": on_error,
        "observer": {"max_delay_ms": max_delay_ms, "read_ahead": read_ahead},
        "release": {"hold_back_tokens": hold_back},
        "monitors": [
            {"id": "norm", "use": "row-norm", "threshold": 40.0, "action": "flag"},
            {"id": "words", "use": "word-end", "threshold": 0.5, "action": "halt",
             "rule": {"kind": "count", "k": 2}},
        ],
    }


def read_plugins() -> Any:
    """The monitors ``read_policy`` names, registered for the block."""
    return plugin_monitors(row_norm=RowNorm,
                           word_end=WordEndMonitor.factory("paris", "bomb", "cheese"))
