"""What the tests of when a stream's reads happen (deferred, caught up, ahead) share: the text
they stream and a monitor that reads the observer."""

from __future__ import annotations

from typing import Any

import torch

from guardrail import Features, Monitor, Needs, Score

TEXT = ("The capital of France is Paris. It is a large city on the Seine, and its museums "
        "hold paintings from many centuries. Visitors walk along the river, cross the old "
        "bridges and climb the hill to the white church. Some of them ask how to build a bomb "
        "and the guide says no. Then they eat bread and cheese and go home by train.")
CALM = TEXT.replace("bomb", "kite").replace("Paris", "Lyon")


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
