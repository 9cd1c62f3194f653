"""R2R's router head, scaled down: the hidden state, the produced token's embedding and the top-k
logit values, through a residual MLP to one logit. Registered as head kind ``router``, so
``guardrail.probes.io.load_probe`` rebuilds it (with ``embedding=``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from guardrail.probes.heads import ProbeHead, register_head, seeded

__all__ = ["RouterHead"]




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


@register_head
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
        with seeded(self.seed):
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

    @staticmethod
    def batch_inputs(batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        """Inputs from a collated feature batch (``guardrail.toolkit.train.collate``): the state,
        the token the model would produce next (its top-1, the R2R setting; the token read when
        top ids were not cached) and the top-k logit values."""
        if batch.top_logits is None:
            raise ValueError("a router needs top-k logits: extract features with top_k=...")
        produced = batch.top_ids[..., 0] if batch.top_ids is not None else batch.ids
        return batch.hidden, produced, batch.top_logits

    def score_batch(self, batch: Any) -> Tensor:
        """Scores of a collated batch (``guardrail.toolkit.train.score_records`` calls it)."""
        return self.score(*self.batch_inputs(batch))

    @property
    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "hidden_size": self.hidden_size, "top_k": self.top_k,
                "width": self.width, "blocks": self.blocks_n, "mlp_ratio": self.mlp_ratio,
                "dropout": self.dropout_p, "seed": self.seed, "vocab_size": self.vocab_size,
                "embed_dim": self.embed_dim}

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **kwargs: Any) -> RouterHead:
        args = cls.config_fields(config, ("hidden_size", "vocab_size", "embed_dim"))
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
