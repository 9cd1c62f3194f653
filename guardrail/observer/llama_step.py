"""One incremental forward of a Llama-family decoder, written out with plain tensors.

Both backends use it: the torch backend runs it eagerly, the ONNX backend exports it. Written
out (rather than calling the HF model) so it can stop after the deepest block a monitor reads,
and so export sees a KV cache of plain tensors instead of cache objects.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ObserverError

__all__ = ["LlamaStep", "check_llama", "is_llama_family"]


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
    keys = torch.cat([past_k, k], dim=2)
    values = torch.cat([past_v, v], dim=2)
    groups = q.shape[1] // keys.shape[1]
    keys = keys.repeat_interleave(groups, dim=1)
    values = values.repeat_interleave(groups, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                                           scale=attn.scaling)
    out = attn.o_proj(out.transpose(1, 2).reshape(*x.shape[:-1], -1))
    h = h + out
    return h + layer.mlp(layer.post_attention_layernorm(h))


def check_llama(model: Any) -> None:
    if not is_llama_family(model):
        raise ObserverError(
            f"the onnx observer backend supports Llama-family models; "
            f"{type(model).__name__} is not one: set observer.backend to 'torch'"
        )
