"""One incremental forward of a Llama-family decoder, written out with plain tensors.

Both backends use it: the torch backend runs it eagerly, the ONNX backend exports it. Written
out (rather than calling the HF model) so it can stop after the deepest block a monitor reads,
and so export sees a KV cache of plain tensors instead of cache objects.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ObserverError

__all__ = ["LlamaStep", "PackedLinears", "attend", "check_llama", "is_llama_family",
           "pack_linears"]


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

    def __init__(self, model: Any, depth: int, hidden_indices: list[int], logits: bool,
                 packed: PackedLinears | None = None) -> None:
        super().__init__()
        self.base = model.base_model
        self.head = model.get_output_embeddings() if logits else None
        self.depth = depth
        self.hidden_indices = hidden_indices
        self.full = depth == model.config.num_hidden_layers
        self.packed = packed  # None for export: ONNX sees the plain projections

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        base = self.base
        h = base.embed_tokens(input_ids)
        rope = base.rotary_emb(h, position_ids=position_ids)
        states = [h]
        new_kv: list[torch.Tensor] = []
        for i in range(self.depth):
            h = _block(base.layers[i], h, rope, mask, past[2 * i], past[2 * i + 1], new_kv,
                       self.packed, i)
            states.append(h)
        if self.full:
            states[-1] = base.norm(h)  # HF convention: the last hidden state is normed
        outs = [states[i][0] for i in self.hidden_indices]
        if self.head is not None:
            head = self.packed.head if self.packed is not None else None
            outs.append((head(states[-1]) if head is not None else self.head(states[-1]))[0])
        return (*outs, *new_kv)


def _block(layer: Any, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
           mask: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
           new_kv: list[torch.Tensor], packed: PackedLinears | None = None,
           index: int = 0) -> torch.Tensor:
    """A Llama decoder block with an explicit KV cache (mirrors ``LlamaDecoderLayer``); with
    ``packed``, block ``index``'s projections run on its packed weights."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    fast = packed.blocks[index] if packed is not None and index < len(packed.blocks) else None
    if fast is not None:
        return _packed_block(layer, fast, h, rope, mask, past_k, past_v, new_kv)
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
    out = out.transpose(1, 2).reshape(*x.shape[:-1], -1)
    h = h + attn.o_proj(out)
    return h + layer.mlp(layer.post_attention_layernorm(h))


def _packed_block(layer: Any, fast: _PackedBlock, h: torch.Tensor,
                  rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
                  past_k: torch.Tensor, past_v: torch.Tensor,
                  new_kv: list[torch.Tensor]) -> torch.Tensor:
    """``_block`` on packed projections, in fewer tensor ops (a read of a few tokens pays
    per op, 30 blocks deep): the norms as ``rms_norm``, the rotary embedding of the query and
    key heads in one pass over the q/k/v product, the hidden positions of ``mask`` built once
    per forward. The same float32 arithmetic, element for element, as ``_block``."""
    attn = layer.self_attn
    x = _rms_norm(layer.input_layernorm, h)
    d = attn.head_dim
    q_heads, k_heads = fast.qkv_sizes[0] // d, fast.qkv_sizes[1] // d
    qkv = fast.qkv(x).view(*x.shape[:-1], -1, d)  # (B, n, heads, d)
    cos, sin = (t.unsqueeze(2) for t in rope)
    qk = qkv[:, :, : q_heads + k_heads]
    qk = (qk * cos) + (_rotate_half(qk) * sin)  # HF's apply_rotary_pos_emb, on both at once
    q = qk[:, :, :q_heads].transpose(1, 2)
    k = qk[:, :, q_heads:].transpose(1, 2)
    v = qkv[:, :, q_heads + k_heads:].transpose(1, 2)
    new_kv += [k, v]
    out = attend(q, k, v, past_k, past_v, mask, attn.scaling,
                 hide=_hidden(mask, q_heads // k_heads))
    out = out.transpose(1, 2).reshape(*x.shape[:-1], -1)
    h = h + fast.o(out)
    x = _rms_norm(layer.post_attention_layernorm, h)
    gate, up = fast.gate_up(x).chunk(2, dim=-1)
    return h + fast.down(layer.mlp.act_fn(gate) * up)


def _rms_norm(norm: Any, h: torch.Tensor) -> torch.Tensor:
    """``LlamaRMSNorm`` (and Mistral's, Qwen2's) as one op: the same arithmetic."""
    eps = getattr(norm, "variance_epsilon", None)
    if eps is None or h.dtype != torch.float32:
        out: torch.Tensor = norm(h)
        return out
    return torch.nn.functional.rms_norm(h, (h.shape[-1],), norm.weight, eps)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


_HIDDEN: tuple[torch.Tensor, int, torch.Tensor] | None = None  # the last forward's, by its mask


def _hidden(mask: torch.Tensor, groups: int) -> torch.Tensor:
    """``~mask`` repeated for the query heads folded into each key/value head (``attend``);
    built at the first block of a forward and reused by the others (the same mask object)."""
    global _HIDDEN
    cached = _HIDDEN
    if cached is not None and cached[0] is mask and cached[1] == groups:
        return cached[2]
    hide = ~mask.repeat(1, 1, groups, 1)
    _HIDDEN = (mask, groups, hide)
    return hide


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor,
           past_v: torch.Tensor, mask: torch.Tensor, scale: float,
           hide: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of the new queries ``(B, heads, n, d)`` over the cached keys and values
    ``(B, kv_heads, past, d)`` and the new ones ``(B, kv_heads, n, d)``; ``mask`` is
    ``(B, 1, n, past + n)``, True where a query may look.

    The cache is only read: the query heads that share a key/value head (grouped-query
    attention) are folded into that head's query rows, so no key is repeated per query head, and
    the scores over the cache and over the new keys are taken apart and joined (a few rows), so
    the cache is never concatenated with the new keys. Over a long cache those two copies cost
    more than the attention itself (docs/observer.md, "Cost of a read"). ``hide``: ``~mask``
    already repeated per folded query head (``_hidden``).
    """
    b, heads, n, d = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    past = past_k.shape[2]
    # query head h uses key/value head h // groups: rows (h % groups) * n + t of that head
    qg = (q * scale).reshape(b, kv_heads, groups * n, d)
    scores = torch.cat([torch.matmul(qg, past_k.transpose(2, 3)),
                        torch.matmul(qg, k.transpose(2, 3))], dim=-1)
    if hide is None:
        hide = ~mask.repeat(1, 1, groups, 1)
    scores = scores.masked_fill(hide, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    out = (torch.matmul(weights[..., :past], past_v)
           + torch.matmul(weights[..., past:], v))
    return out.reshape(b, heads, n, d)


class _Packed:
    """``y = x @ W.T`` with ``W`` reordered once into oneDNN's blocked layout.

    Why: on this project's CPUs (AMD EPYC) torch's default fp32 ``linear`` for reads of a few
    tokens ran at about half the speed of the same product on weights packed for oneDNN (and of
    ONNX Runtime's prepacked MatMul): a read's CPU is almost all these products
    (docs/observer.md, "Cost of a read"). Same float32 arithmetic, another summation order."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.out_features = int(weight.shape[0])
        with torch.inference_mode():
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(),
                                                                   None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, None, "none", [], "")


class _PackedBlock:
    """A block's projections packed: q/k/v as one product, gate/up as one, o, down."""

    def __init__(self, layer: Any) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        weights = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
        self.qkv_sizes = [int(w.shape[0]) for w in weights]
        self.qkv = _Packed(torch.cat(weights))
        self.o = _Packed(attn.o_proj.weight)
        self.gate_up = _Packed(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
        self.down = _Packed(mlp.down_proj.weight)


class PackedLinears:
    """The projections of a Llama-family model's first ``depth`` blocks (and its output head),
    packed once at load for the eager CPU step. Doubles the weights' memory (the model keeps
    its own for the HF forward and export)."""

    def __init__(self, model: Any, depth: int, head: bool = True) -> None:
        layers = model.base_model.layers
        self.blocks = [_PackedBlock(layers[i]) for i in range(depth)]
        out = model.get_output_embeddings()
        self.head = _Packed(out.weight) if head and out is not None else None


def pack_linears(model: Any) -> PackedLinears | None:
    """Packed projections for ``model`` when they apply (a Llama-family float32 model on the
    CPU, without projection biases, on a torch with oneDNN), else None (the step runs the
    model's own modules). Checked once against ``linear`` on the first block's weights."""
    if not is_llama_family(model) or not torch.backends.mkldnn.is_available():
        return None
    first = next(model.parameters())
    if first.dtype != torch.float32 or first.device.type != "cpu":
        return None
    layer = model.base_model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    projections = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj,
                   mlp.up_proj, mlp.down_proj]
    if any(getattr(p, "bias", None) is not None for p in projections) or not all(
            hasattr(mlp, a) for a in ("act_fn", "gate_proj", "up_proj", "down_proj")):
        return None
    try:
        probe = _Packed(attn.q_proj.weight)
        with torch.inference_mode():
            x = torch.randn(3, int(attn.q_proj.weight.shape[1]))
            if not torch.allclose(probe(x), attn.q_proj(x), rtol=1e-4, atol=1e-4):
                return None
    except (RuntimeError, AttributeError):  # a torch without these oneDNN ops
        return None
    return PackedLinears(model, int(model.config.num_hidden_layers))


def check_llama(model: Any) -> None:
    if not is_llama_family(model):
        raise ObserverError(
            f"the onnx observer backend supports Llama-family models; "
            f"{type(model).__name__} is not one: set observer.backend to 'torch'"
        )
