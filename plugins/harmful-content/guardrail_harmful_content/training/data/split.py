"""Splitting by group: every record of a prompt/objective lands in the same split.

Groups holding any held-out record (test-only topics and templates) go to test. The other
groups are shuffled with the seed inside two strata (groups with a harmful record, groups
without) and cut by group count into train / val / test, so each split gets a similar label mix.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence

from .records import Example

__all__ = ["SPLITS", "split_by_group"]

SPLITS = ("train", "val", "test")


def split_by_group(examples: Sequence[Example], seed: int,
                   fractions: tuple[float, float, float] = (0.7, 0.12, 0.18),
                   ) -> dict[str, list[Example]]:
    by_group: dict[str, list[Example]] = defaultdict(list)
    for ex in examples:
        by_group[ex.group].append(ex)
    assignment: dict[str, str] = {}
    strata: dict[bool, list[str]] = {True: [], False: []}
    for group in sorted(by_group):
        members = by_group[group]
        if any(ex.holdout for ex in members):
            assignment[group] = "test"
        else:
            strata[any(ex.label == 1 for ex in members)].append(group)
    rng = random.Random(f"{seed}:split")
    for positive in (True, False):
        groups = strata[positive]
        rng.shuffle(groups)
        n_train = round(len(groups) * fractions[0])
        n_val = round(len(groups) * fractions[1])
        for i, group in enumerate(groups):
            assignment[group] = "train" if i < n_train else "val" if i < n_train + n_val else "test"
    out: dict[str, list[Example]] = {name: [] for name in SPLITS}
    for ex in examples:
        out[assignment[ex.group]].append(ex)
    return out
