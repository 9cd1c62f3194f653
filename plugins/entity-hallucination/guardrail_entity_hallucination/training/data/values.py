"""How numbers are written, and plausible wrong values of the same type.

A fabricated entity must look like something a model would say: another country's capital, a
population off by a realistic factor, a neighbour from the same region that is not one. Numbers
keep the writing style of the true value, so the format never gives the label away.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

__all__ = ["NUMBER_STYLES", "fake_count", "format_count", "pick_other"]

NUMBER_STYLES = ("exact", "rounded")
# A wrong number is off by one of these factors (then jittered by up to 6%).
FACTORS = (0.3, 0.4, 0.5, 0.6, 1.7, 2.0, 2.5, 3.0, 4.0)


def format_count(n: int, style: str) -> str:
    """``exact``: 66,987,244; ``rounded``: 67 million / 1.35 billion / 77,000 / 640."""
    if style == "exact" or n < 1000:
        return f"{n:,}"
    if n >= 1_000_000_000:
        return f"{n / 1e9:.2f}".rstrip("0").rstrip(".") + " billion"
    if n >= 1_000_000:
        return f"{n / 1e6:.1f}".rstrip("0").rstrip(".") + " million"
    return f"{round(n, -3):,}"


def fake_count(n: int, style: str, rng: random.Random) -> str:
    """``n`` off by a realistic factor, written in the same style, never equal to the truth."""
    truth = format_count(n, style)
    for _ in range(20):
        wrong = max(1, int(n * rng.choice(FACTORS) * (1 + rng.uniform(-0.06, 0.06))))
        text = format_count(wrong, style)
        if text != truth:
            return text
    return format_count(n * 3 + 7, style)


def pick_other(rng: random.Random, preferred: Sequence[str], fallback: Sequence[str],
               exclude: set[str]) -> str | None:
    """A value of ``preferred`` (e.g. same region), else of ``fallback``; never in ``exclude``."""
    for pool in (preferred, fallback):
        choices = sorted({v for v in pool if v and v not in exclude})
        if choices:
            return rng.choice(choices)
    return None
