"""Probe heads that read an observer's hidden states (torch).

- ``LinearProbe``: the entity-hallucination probe, ``Linear(H, 1)`` on one layer, one logit per
  token (Obeso et al. 2025).
- ``RouterHead``: R2R's router, scaled down: hidden state, the produced token's embedding and the
  top-k logit values, through a residual MLP to one logit.

Each head has a JSON-able ``config`` and ``from_config`` (``guardrail.probes.io`` saves and loads
them), and ``score(...)`` that returns probabilities in [0, 1] for the monitors.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["HEADS", "LinearProbe", "ProbeHead", "RouterHead", "build_head"]


class ProbeHead(nn.Module):
    """Base class: ``kind`` names the head in its saved config."""

    kind: ClassVar[str] = ""

    @property
    def config(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **kwargs: Any) -> ProbeHead:
        raise NotImplementedError


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Initialise parameters from ``seed`` without disturbing the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _fields(config: Mapping[str, Any], kind: str, names: tuple[str, ...]) -> dict[str, Any]:
    """The constructor arguments of a head from its config, naming what is missing or wrong."""
    if config.get("kind", kind) != kind:
        raise ValueError(f"config is for head kind {config.get('kind')!r}, not {kind!r}")
    missing = [n for n in names if n not in config]
    if missing:
        raise ValueError(f"{kind} head config lacks {', '.join(repr(m) for m in missing)}")
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
        args = _fields(config, cls.kind, ("hidden_size",))
        return cls(int(args["hidden_size"]), seed=int(config.get("seed", 42)))


class _ResidualBlock(nn.Module):
    """Pre-LayerNorm MLP block: ``x + Dropout(W2 GELU(W1 LN(x)))``."""

    def __init__(self, width: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.drop(self.down(self.act(self.up(self.norm(x)))))


class RouterHead(ProbeHead):
    """R2R's router, scaled down. Inputs per token: the small model's hidden state ``(H)``, the id
    of the token it produced (looked up in a frozen copy of its embedding table), and its top-k
    logit values ``(k)`` projected by ``Linear(k, H)``. Concatenated, then ``Linear(2H+E, W)``,
    ``blocks`` residual pre-LN MLP blocks (``W -> mlp_ratio*W -> W``, GELU, dropout), LayerNorm and
    ``Linear(W, 1)``.

    The embedding table is not a trained weight and is not saved with the head (it is the
    observer's own table): pass it to ``from_config``/``load_probe`` as ``embedding``.
    """

    kind = "router"

    def __init__(
        self,
        hidden_size: int,
        embedding: Tensor,
        top_k: int = 100,
        width: int = 256,
        blocks: int = 2,
        mlp_ratio: int = 4,
        dropout: float = 0.1,
        seed: int = 42,
    ) -> None:
        super().__init__()
        if embedding.ndim != 2:
            raise ValueError(f"embedding must be (vocab, dim), got shape {tuple(embedding.shape)}")
        self.hidden_size = int(hidden_size)
        self.top_k = int(top_k)
        self.width = int(width)
        self.blocks_n = int(blocks)
        self.mlp_ratio = int(mlp_ratio)
        self.dropout_p = float(dropout)
        self.seed = int(seed)
        self.vocab_size, self.embed_dim = (int(d) for d in embedding.shape)
        # A frozen copy, kept out of the state dict so saved routers stay small.
        self.register_buffer("embedding", embedding.detach().clone().float(), persistent=False)
        with _seeded(self.seed):
            self.logit_proj = nn.Linear(self.top_k, self.hidden_size)
            self.input = nn.Linear(2 * self.hidden_size + self.embed_dim, self.width)
            self.blocks = nn.ModuleList(
                _ResidualBlock(self.width, self.mlp_ratio * self.width, self.dropout_p)
                for _ in range(self.blocks_n)
            )
            self.norm = nn.LayerNorm(self.width)
            self.out = nn.Linear(self.width, 1)

    def forward(self, hidden: Tensor, token_ids: Tensor, top_logits: Tensor) -> Tensor:
        """``hidden (..., H)``, ``token_ids (...)``, ``top_logits (..., k)`` -> logits ``(...)``."""
        if top_logits.shape[-1] != self.top_k:
            raise ValueError(f"router expects {self.top_k} top logits, got {top_logits.shape[-1]}")
        table: Tensor = self.embedding  # type: ignore[assignment]
        embedded = table[token_ids.long()]
        x = torch.cat([hidden, embedded, self.logit_proj(top_logits)], dim=-1)
        x = self.input(x)
        for block in self.blocks:
            x = block(x)
        return self.out(self.norm(x)).squeeze(-1)

    def score(self, hidden: Tensor, token_ids: Tensor, top_logits: Tensor) -> Tensor:
        return torch.sigmoid(self.forward(hidden, token_ids, top_logits))

    @property
    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "hidden_size": self.hidden_size, "top_k": self.top_k,
                "width": self.width, "blocks": self.blocks_n, "mlp_ratio": self.mlp_ratio,
                "dropout": self.dropout_p, "seed": self.seed, "vocab_size": self.vocab_size,
                "embed_dim": self.embed_dim}

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **kwargs: Any) -> RouterHead:
        args = _fields(config, cls.kind, ("hidden_size", "vocab_size", "embed_dim"))
        embedding = kwargs.get("embedding")
        if embedding is None:
            raise ValueError("a router head needs the observer's embedding table: pass "
                             "embedding=<(vocab, dim) tensor>")
        expected = (int(args["vocab_size"]), int(args["embed_dim"]))
        if tuple(embedding.shape) != expected:
            raise ValueError(f"embedding table has shape {tuple(embedding.shape)}, the router "
                             f"config expects {expected} (vocab_size, embed_dim)")
        return cls(
            int(args["hidden_size"]), embedding,
            top_k=int(config.get("top_k", 100)), width=int(config.get("width", 256)),
            blocks=int(config.get("blocks", 2)), mlp_ratio=int(config.get("mlp_ratio", 4)),
            dropout=float(config.get("dropout", 0.1)), seed=int(config.get("seed", 42)),
        )


HEADS: dict[str, type[ProbeHead]] = {
    LinearProbe.kind: LinearProbe,
    RouterHead.kind: RouterHead,
}


def build_head(config: Mapping[str, Any], **kwargs: Any) -> ProbeHead:
    """The head a config describes (``config["kind"]`` one of ``HEADS``)."""
    kind = config.get("kind")
    if kind not in HEADS:
        raise ValueError(f"unknown head kind {kind!r}; known: {', '.join(sorted(HEADS))}")
    return HEADS[kind].from_config(config, **kwargs)
