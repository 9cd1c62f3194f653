"""The ninth pass's cap on benign answers to harmful-sounding prompts (docs/harmful-content.md,
"Ninth pass"): two groups of the capped sets' benign records, each pooled over sources, each
held to the false-halt cap like a source.

- *answers to harmful requests*: benign records of kind ``benign_refusal`` (the writer refused the
  prompt: a harmful request by construction), and every other benign record whose prompt (or
  conversation: ``extra["key"][0]``, ``context.context_key``) also has a harmful answer in the
  pool (a matched negative);
- *safety answers*: benign records of kind ``benign_safety`` (a question on protecting against a
  named harm).

The kinds are the hand-written sets' (``handwritten_benign_refusal`` in a build); pyrit's benign
labels are noisy and are not capped (``capped`` names the tag prefixes that are)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..pooled import PoolRecord
from .rule import CAPPED_MIXED

__all__ = ["HARMFUL_PROMPT_GROUPS", "harmful_prompt_groups"]

HARMFUL_PROMPT_GROUPS = ("answers to harmful requests", "safety answers")


def harmful_prompt_groups(records: Sequence[PoolRecord],
                          capped: Sequence[str] = CAPPED_MIXED) -> dict[str, np.ndarray]:
    """Each group's mask over ``records`` (benign records of tags starting with ``capped``)."""
    harmful_prompts = {r.extra["key"][0] for r in records if r.label == 1 and "key" in r.extra}
    mine = np.asarray([r.label == 0 and r.tag.startswith(tuple(capped)) for r in records],
                      dtype=bool)
    kinds = [r.kind for r in records]
    refused = np.asarray([k.endswith("benign_refusal") for k in kinds], dtype=bool)
    matched = np.asarray([r.extra.get("key", ("",))[0] in harmful_prompts for r in records],
                         dtype=bool)
    safety = np.asarray([k.endswith("benign_safety") for k in kinds], dtype=bool)
    return {HARMFUL_PROMPT_GROUPS[0]: mine & (refused | matched),
            HARMFUL_PROMPT_GROUPS[1]: mine & safety}
