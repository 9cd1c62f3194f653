"""An example guardrail plugin: a monitor that scores words written in capitals.

Install it (``pip install examples/guardrail-shouting``) and use it in a policy::

    monitors:
      - id: calm
        use: shouting
        options: {min_letters: 4}
        rule: {kind: consecutive, k: 2}
        action: flag
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

import guardrail


class ShoutingOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_letters: int = Field(3, ge=1, description="shorter words (I, OK, USA) are not shouting")


class ShoutingMonitor(guardrail.Monitor):
    """1.0 for a word of at least ``min_letters`` letters, all capitals; 0.0 otherwise.

    It keeps no state: each token is judged on its own, so ``start`` is not overridden.
    """

    Options = ShoutingOptions
    default_threshold = 0.5
    score_range = (0.0, 1.0)  # a policy threshold outside it is reported as an error

    def __init__(self, options: ShoutingOptions) -> None:
        self.min_letters = options.min_letters

    def update(self, state: Any, features: guardrail.Features) -> Sequence[guardrail.Score]:
        scores = []
        for k, index in enumerate(features.indices):
            word = features.token_text(k).strip()
            letters = [c for c in word if c.isalpha()]
            shouting = len(letters) >= self.min_letters and all(c.isupper() for c in letters)
            scores.append(guardrail.Score(index, 1.0 if shouting else 0.0, label="shouting"))
        return scores


@guardrail.hookimpl
def guardrail_register_monitors(register: guardrail.RegisterMonitor) -> None:
    register("shouting", ShoutingMonitor, description="flags words written in capitals")
