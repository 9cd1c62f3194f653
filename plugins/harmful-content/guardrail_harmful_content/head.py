"""SCM's dual head (token head and sequence head), the one the harmful-content monitor loads.

Importing this module registers the ``"dual"`` kind with ``guardrail.probes.io.load_probe``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from guardrail.probes.heads import ProbeHead, register_head, seeded

__all__ = ["DualHead"]



@register_head
class DualHead(ProbeHead):
    """SCM's heads on one layer: ``token_head = Linear(H, 2)`` after dropout, applied to every
    token, and a sequence head on the last real token in training. Class 1 is harmful.

    The sequence head is ``Linear(H, 2, bias=False)`` (SCM's), or with ``sequence_hidden = m > 0``
    a one-hidden-layer MLP ``Linear(H, m) -> GELU (tanh form) -> Linear(m, 2)``: the tanh form
    has a closed form the monitor computes in numpy. ``DualHead.ensemble`` folds several heads
    into one whose logits are the mean of theirs (linear heads: mean weights; MLP heads: hidden
    units side by side).

    With ``prompt_size = (layers, hidden)`` the head also carries ``prompt_weight``, a float32
    ``(layers, hidden)`` tensor saved beside its own: the monitor adds ``sum_j prompt_weight[j] .
    context[layers[j]]`` (the context's pooled states, ``Needs.context``) to every prefix logit of
    a stream (docs/harmful-content.md, "Prompt term (runtime contract)"). The head's torch
    methods read no context: they give the response's logits alone."""

    kind = "dual"
    prompt_weight: Tensor  # a buffer, set by set_prompt_weight (prompt_size not None)

    def __init__(self, hidden_size: int, dropout: float = 0.1, seed: int = 42,
                 sequence_hidden: int = 0, prompt_size: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.hidden_size = int(hidden_size)
        self.dropout_p = float(dropout)
        self.seed = int(seed)
        self.sequence_hidden = int(sequence_hidden)
        if self.sequence_hidden < 0:
            raise ValueError(f"sequence_hidden must be >= 0, got {sequence_hidden}")
        self.prompt_size: tuple[int, int] | None = None
        if prompt_size is not None:
            self.set_prompt_weight(torch.zeros(*_prompt_size(prompt_size)))
        self.sequence_head: nn.Module
        with seeded(self.seed):
            self.dropout = nn.Dropout(self.dropout_p)
            self.token_head = nn.Linear(self.hidden_size, 2)
            if self.sequence_hidden:
                self.sequence_head = nn.Sequential(
                    nn.Linear(self.hidden_size, self.sequence_hidden),
                    nn.GELU(approximate="tanh"),
                    nn.Linear(self.sequence_hidden, 2))
            else:
                self.sequence_head = nn.Linear(self.hidden_size, 2, bias=False)

    def forward(self, hidden: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``hidden (B, T, H)``, ``mask (B, T)`` (1 = real token) -> token logits ``(B, T, 2)``
        and sequence logits ``(B, 2)`` from each row's last real token."""
        token_logits = self.token_head(self.dropout(hidden))
        if mask is None:
            last = torch.full((hidden.shape[0],), hidden.shape[1] - 1, dtype=torch.long)
        else:
            positions = torch.arange(hidden.shape[1], device=hidden.device).expand_as(mask)
            last = torch.where(mask.bool(), positions, -1).max(dim=1).values.clamp(min=0)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        sequence_logits = self.sequence_head(hidden[rows, last])
        return token_logits, sequence_logits

    def set_prompt_weight(self, weight: Any) -> None:
        """Carry ``weight`` (``(layers, hidden)``, any array) as the prompt term's weights,
        saved and loaded with the head (its config then records ``prompt_size``)."""
        tensor = torch.as_tensor(weight, dtype=torch.float32).detach().clone()
        self.prompt_size = _prompt_size(tuple(tensor.shape))
        self.register_buffer("prompt_weight", tensor.contiguous())

    def sequence_layers(self) -> list[nn.Linear]:
        """The sequence head's linear layers, first to last: one for SCM's head, two for the MLP
        (GELU between them)."""
        if isinstance(self.sequence_head, nn.Linear):
            return [self.sequence_head]
        return [m for m in self.sequence_head.modules() if isinstance(m, nn.Linear)]

    def prefix_logits(self, hidden: Tensor) -> Tensor:
        """The sequence head at every position: ``(..., H)`` -> ``(..., 2)``. Position ``i`` judges
        the response up to token ``i`` (the backbone is causal)."""
        return self.sequence_head(hidden)

    def score(self, hidden: Tensor) -> Tensor:
        """Harm probability of every prefix: ``(..., H)`` -> ``(...)``."""
        return torch.softmax(self.prefix_logits(hidden), dim=-1)[..., 1]

    @property
    def config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"kind": self.kind, "hidden_size": self.hidden_size,
                                  "dropout": self.dropout_p, "seed": self.seed}
        if self.sequence_hidden:
            config["sequence_hidden"] = self.sequence_hidden
        if self.prompt_size is not None:
            config["prompt_size"] = list(self.prompt_size)
        return config

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **kwargs: Any) -> DualHead:
        if config.get("kind", cls.kind) != cls.kind:
            raise ValueError(f"config is for head kind {config.get('kind')!r}, not {cls.kind!r}")
        if "hidden_size" not in config:
            raise ValueError(f"{cls.kind} head config lacks 'hidden_size'")
        sequence_hidden = config.get("sequence_hidden", 0)
        if isinstance(sequence_hidden, bool) or not isinstance(sequence_hidden, int) \
                or sequence_hidden < 0:
            raise ValueError(f"dual head config: 'sequence_hidden' must be a whole number >= 0, "
                             f"got {sequence_hidden!r}")
        prompt_size = config.get("prompt_size")
        return cls(int(config["hidden_size"]), dropout=float(config.get("dropout", 0.1)),
                   seed=int(config.get("seed", 42)), sequence_hidden=sequence_hidden,
                   prompt_size=None if prompt_size is None else _prompt_size(prompt_size))

    @classmethod
    def ensemble(cls, heads: Sequence[DualHead]) -> DualHead:
        """One head whose token and sequence logits are the mean of ``heads``' (same width and
        kind of sequence head). Linear heads: the mean of their weights. MLP heads: their hidden
        units side by side (``sequence_hidden`` adds up) and their output weights divided by
        the number of heads, so the fold is exact."""
        if not heads:
            raise ValueError("ensemble of no heads")
        first = heads[0]
        if any(h.hidden_size != first.hidden_size or h.sequence_hidden != first.sequence_hidden
               for h in heads):
            raise ValueError("ensemble members differ in hidden_size or sequence_hidden")
        if any(h.prompt_size != first.prompt_size for h in heads):
            raise ValueError("ensemble members differ in prompt_size")
        n = len(heads)
        out = cls(first.hidden_size, dropout=first.dropout_p, seed=first.seed,
                  sequence_hidden=first.sequence_hidden * n)
        with torch.no_grad():
            for name in ("weight", "bias"):
                getattr(out.token_head, name).copy_(
                    torch.stack([getattr(h.token_head, name) for h in heads]).mean(dim=0))
            members = [h.sequence_layers() for h in heads]
            if first.sequence_hidden:
                up, down = out.sequence_layers()
                ups, downs = [m[0] for m in members], [m[1] for m in members]
                up.weight.copy_(torch.cat([u.weight for u in ups], dim=0))
                up.bias.copy_(torch.cat([u.bias for u in ups], dim=0))
                down.weight.copy_(torch.cat([d.weight for d in downs], dim=1) / n)
                down.bias.copy_(torch.stack([d.bias for d in downs]).mean(dim=0))
            else:
                out.sequence_layers()[0].weight.copy_(
                    torch.stack([m[0].weight for m in members]).mean(dim=0))
            if first.prompt_size is not None:  # a constant added to each member's logit
                out.set_prompt_weight(torch.stack([h.prompt_weight for h in heads]).mean(dim=0))
        out.eval()
        return out


def _prompt_size(value: Any) -> tuple[int, int]:
    """``(layers, hidden)`` of a prompt weight, both whole numbers > 0."""
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in value)):
        raise ValueError(f"dual head config: 'prompt_size' must be [layers, hidden], two whole "
                         f"numbers > 0, got {value!r}")
    return int(value[0]), int(value[1])

