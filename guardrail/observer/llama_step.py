"""One incremental forward of a Llama-family decoder, written out with plain tensors.

Both backends use it: the torch backend runs it eagerly, the ONNX backend exports it. Written
out (rather than calling the HF model) so it can stop after the deepest block a monitor reads,
and so export sees a KV cache of plain tensors instead of cache objects.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ObserverError

__all__ = ["LlamaStep", "attend", "check_llama", "is_llama_family"]


# Model types whose decoder block is exactly LlamaDecoderLayer's computation.
_FAMILY = {"llama", "mistral", "qwen2"}


def is_llama_family(model: Any) -> bool:
    """Pre-norm decoder with rotary embeddings and q/k/v/o projections, as in LlamaModel."""
    if getattr(model.config, "model_type", None) not in _FAMILY:
        return False
    base = model.base_model
    if not all(hasattr(base, a) for a in ("embed_tokens", "rotary_emb", "layers", "norm")):
        return False
    layer = base.layers[0]
    attn = getattr(layer, "self_attn", None)
    return (attn is not None and all(hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj",
                                                                  "o_proj", "head_dim", "scaling"))
            and hasattr(layer, "input_layernorm") and hasattr(layer, "post_attention_layernorm")
            and not getattr(attn, "q_norm", None) and not getattr(model.config, "sliding_window",
                                                                   None))


class LlamaStep(torch.nn.Module):
    """One incremental forward of the first ``depth`` blocks, written out so that export sees
    plain tensors (no cache objects crossing the graph boundary)."""

    def __init__(self, model: Any, depth: int, hidden_indices: list[int], logits: bool) -> None:
        super().__init__()
        self.base = model.base_model
        self.head = model.get_output_embeddings() if logits else None
        self.depth = depth
        self.hidden_indices = hidden_indices
        self.full = depth == model.config.num_hidden_layers

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        base = self.base
        h = base.embed_tokens(input_ids)
        rope = base.rotary_emb(h, position_ids=position_ids)
        states = [h]
        new_kv: list[torch.Tensor] = []
        for i in range(self.depth):
            h = _block(base.layers[i], h, rope, mask, past[2 * i], past[2 * i + 1], new_kv)
            states.append(h)
        if self.full:
            states[-1] = base.norm(h)  # HF convention: the last hidden state is normed
        outs = [states[i][0] for i in self.hidden_indices]
        if self.head is not None:
            outs.append(self.head(states[-1])[0])
        return (*outs, *new_kv)


def _block(layer: Any, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
           mask: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
           new_kv: list[torch.Tensor]) -> torch.Tensor:
    """A Llama decoder block with an explicit KV cache (mirrors ``LlamaDecoderLayer``)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = layer.self_attn
    x = layer.input_layernorm(h)
    shape = (*x.shape[:-1], -1, attn.head_dim)
    q = attn.q_proj(x).view(shape).transpose(1, 2)
    k = attn.k_proj(x).view(shape).transpose(1, 2)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    cos, sin = rope
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    new_kv += [k, v]
    out = attend(q, k, v, past_k, past_v, mask, attn.scaling)
    out = attn.o_proj(out.transpose(1, 2).reshape(*x.shape[:-1], -1))
    h = h + out
    return h + layer.mlp(layer.post_attention_layernorm(h))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor,
           past_v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of the new queries ``(B, heads, n, d)`` over the cached keys and values
    ``(B, kv_heads, past, d)`` and the new ones ``(B, kv_heads, n, d)``; ``mask`` is
    ``(B, 1, n, past + n)``, True where a query may look.

    The cache is only read: the query heads that share a key/value head (grouped-query
    attention) are folded into that head's query rows, so no key is repeated per query head, and
    the scores over the cache and over the new keys are taken apart and joined (a few rows), so
    the cache is never concatenated with the new keys. Over a long cache those two copies cost
    more than the attention itself (docs/observer.md, "Cost of a read").
    """
    b, heads, n, d = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    past = past_k.shape[2]
    # query head h uses key/value head h // groups: rows (h % groups) * n + t of that head
    qg = (q * scale).reshape(b, kv_heads, groups * n, d)
    scores = torch.cat([torch.matmul(qg, past_k.transpose(2, 3)),
                        torch.matmul(qg, k.transpose(2, 3))], dim=-1)
    scores = scores.masked_fill(~mask.repeat(1, 1, groups, 1), float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    out = (torch.matmul(weights[..., :past], past_v)
           + torch.matmul(weights[..., past:], v))
    return out.reshape(b, heads, n, d)


def check_llama(model: Any) -> None:
    if not is_llama_family(model):
        raise ObserverError(
            f"the onnx observer backend supports Llama-family models; "
            f"{type(model).__name__} is not one: set observer.backend to 'torch'"
        )
