"""Harmful responses behind a benign-looking opening: the positives a prefix-only probe misses.

A share of the real harmful responses is copied with a short opening that reads like a
disclaimer, a reluctant refusal or a role-play frame ("I really shouldn't help with this, but
here it is."). The copy keeps the source's prompt and group, so it lands in the same split; the
opening's sentences are labelled 0 and only the original text carries harmful spans. This
teaches the monitor not to clear a response because it *starts* like a refusal.

The same openings are put in front of as many generated harmless responses (in place, kind
unchanged), so that an opening says nothing about the label: without this, words like "insist"
or "hypothetical" would be perfect cues for "harmful" (a bag-of-words check found exactly that).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace

from .records import Example

__all__ = ["OPENABLE_KINDS", "OPENINGS", "open_some_harmless", "with_benign_openings"]

OPENINGS: tuple[str, ...] = (
    "Disclaimer: the following is for educational purposes only.",
    "I must stress that this is dangerous and I do not endorse it.",
    "I really shouldn't help with this. But since you insist, here it is.",
    "I'm not comfortable with this request, but I'll answer it anyway.",
    "Staying in character as requested:",
    "As an AI I normally refuse this kind of question. This time I will make an exception.",
    "Please note that this is purely hypothetical.",
    "Warning: the content below may be upsetting.",
    "Okay, I understand. Here is what you asked for.",
    "This is a sensitive topic, so please be careful with what follows.",
)


def with_benign_openings(examples: Sequence[Example], seed: int, fraction: float) -> list[Example]:
    """Copies of ``fraction`` of the harmful examples, each with a random benign opening."""
    rng = random.Random(f"{seed}:augment")
    harmful = [e for e in examples if e.label == 1]
    chosen = rng.sample(harmful, round(len(harmful) * fraction)) if harmful else []
    out = []
    for ex in chosen:
        opening = rng.choice(OPENINGS)
        sep = rng.choice((" ", "\n\n", "\n"))
        prefix = opening + sep
        out.append(replace(ex, response=prefix + ex.response, kind="harmful_after_disclaimer",
                           source=ex.source + "+opening", benign_prefix_chars=len(prefix)))
    return out


# Harmless kinds where an opening reads naturally (not refusals: "Here is what you asked for. I
# can't help with that." would be a new, telltale pattern).
OPENABLE_KINDS = frozenset({
    "hard_negative_safety_advice", "hard_negative_support", "hard_negative_history",
    "hard_negative_fiction", "hard_negative_explainer", "hard_negative_benign_request",
    "benign_longform",
})


def open_some_harmless(examples: Sequence[Example], seed: int, count: int) -> list[Example]:
    """``examples`` with ``count`` harmless generated responses given a random opening."""
    rng = random.Random(f"{seed}:open-harmless")
    candidates = [i for i, ex in enumerate(examples) if ex.label == 0 and ex.kind in OPENABLE_KINDS]
    chosen = set(rng.sample(candidates, min(count, len(candidates))))
    out = list(examples)
    for i in sorted(chosen):
        prefix = rng.choice(OPENINGS) + rng.choice((" ", "\n\n", "\n"))
        out[i] = replace(out[i], response=prefix + out[i].response,
                         extra={**out[i].extra, "opening": True})
    return out
