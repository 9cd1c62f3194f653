"""Short labelled texts about places for the tests that stream entity features: one to three
sentences, each naming one of ``WORDS`` as a span labelled fabricated with probability 0.4."""

from __future__ import annotations

import random

WORDS = ["Warsaw", "Tokyo", "Paris", "Rome", "Lima", "Oslo"]


def place_records(n: int, seed: int, years: bool = False) -> list[dict[str, object]]:
    """``n`` eval records (``years``: each sentence ends with a year, so numbers stream too)."""
    rng = random.Random(seed)
    out: list[dict[str, object]] = []
    for _ in range(n):
        text, spans = "", []
        for _ in range(rng.randint(1, 3)):
            text += rng.choice(["We went to ", "Then it was ", "A trip to "])
            word = rng.choice(WORDS)
            spans.append({"start": len(text), "end": len(text) + len(word),
                          "label": int(rng.random() < 0.4)})
            text += word + (f" in {rng.randint(1900, 2020)}. " if years else ". ")
        out.append({"prompt": "Tell me a fact.", "response": text.strip(),
                    "label": int(any(s["label"] for s in spans)), "spans": spans})
    return out
