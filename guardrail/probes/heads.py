"""Probe heads that read an observer's hidden states (torch).

- ``LinearProbe``: the entity-hallucination probe, ``Linear(H, 1)`` on one layer, one logit per
  token (Obeso et al. 2025).

Each head has a JSON-able ``config`` and ``from_config`` (``guardrail.probes.io`` saves and loads
them), and ``score(...)`` that returns probabilities in [0, 1] for the monitors.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["HEADS", "LinearProbe", "ProbeHead", "build_head", "register_head", "seeded"]


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Initialise a head's parameters from ``seed`` without disturbing the caller's random
    state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class ProbeHead(nn.Module):
    """Base class: ``kind`` names the head in its saved config."""

    kind: ClassVar[str] = ""

    @property
    def config(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **kwargs: Any) -> ProbeHead:
        raise NotImplementedError

    @classmethod
    def config_fields(cls, config: Mapping[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
        """The constructor arguments ``names`` from a saved config, naming what is missing or
        which kind the config is for instead."""
        if config.get("kind", cls.kind) != cls.kind:
            raise ValueError(f"config is for head kind {config.get('kind')!r}, not {cls.kind!r}")
        missing = [n for n in names if n not in config]
        if missing:
            raise ValueError(f"{cls.kind} head config lacks {', '.join(repr(m) for m in missing)}")
        return {n: config[n] for n in names}



class LinearProbe(ProbeHead):
    """``Linear(hidden_size, 1)``: one logit per token. Initialised as the paper does: weights
    N(0, 0.01), bias 0, from ``seed``."""

    kind = "linear"

    def __init__(self, hidden_size: int, seed: int = 42) -> None:
        super().__init__()
        self.hidden_size = int(hidden_size)
        self.seed = int(seed)
        self.linear = nn.Linear(self.hidden_size, 1)
        generator = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(self.linear.weight.shape, generator=generator)
                                     * 0.01)
            self.linear.bias.zero_()

    def forward(self, hidden: Tensor) -> Tensor:
        """``(..., H)`` -> logits ``(...)``."""
        return self.linear(hidden).squeeze(-1)

    def score(self, hidden: Tensor) -> Tensor:
        return torch.sigmoid(self.forward(hidden))

    def numpy_parts(self, states: int) -> tuple[np.ndarray, list[float], float]:
        """The weight row split for per-token numpy maths: the first ``states`` weights as a
        float32 array (the part that reads hidden states), the rest as floats (extra features
        appended after the states), and the bias."""
        weight = self.linear.weight.detach().float()[0]
        bias = self.linear.bias
        return (weight[:states].contiguous().numpy().copy(), weight[states:].tolist(),
                float(bias.detach()[0]) if bias is not None else 0.0)

    @property
    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "hidden_size": self.hidden_size, "seed": self.seed}

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **kwargs: Any) -> LinearProbe:
        args = cls.config_fields(config, ("hidden_size",))
        return cls(int(args["hidden_size"]), seed=int(config.get("seed", 42)))


HEADS: dict[str, type[ProbeHead]] = {
    LinearProbe.kind: LinearProbe,
}


def build_head(config: Mapping[str, Any], **kwargs: Any) -> ProbeHead:
    """The head a config describes (``config["kind"]`` one of ``HEADS``)."""
    kind = config.get("kind")
    if kind not in HEADS:
        raise ValueError(f"unknown head kind {kind!r}; known: {', '.join(sorted(HEADS))}")
    return HEADS[kind].from_config(config, **kwargs)


HeadType = TypeVar("HeadType", bound=type[ProbeHead])


def register_head(cls: HeadType) -> HeadType:
    """Make ``load_probe`` and ``build_head`` know a plugin's head class by its ``kind`` (use as a
    class decorator where the class is defined). A kind another class holds is an error."""
    if not cls.kind:
        raise ValueError(f"{cls.__name__} has no kind")
    taken = HEADS.get(cls.kind)
    if taken is not None and (taken.__module__, taken.__qualname__) != (cls.__module__,
                                                                         cls.__qualname__):
        raise ValueError(f"head kind {cls.kind!r} is taken by {taken.__module__}.{taken.__name__}")
    HEADS[cls.kind] = cls
    return cls
