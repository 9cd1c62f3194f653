"""One incremental forward of a Llama-family decoder, written out with plain tensors.

Both backends use it: the torch backend runs it eagerly, the ONNX backend exports it. Written
out (rather than calling the HF model) so it can stop after the deepest block a monitor reads,
and so export sees a KV cache of plain tensors instead of cache objects.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..errors import ObserverError
from .blockstep import FUSED  # the matmul options whose blocks run in one C call

if TYPE_CHECKING:
    from .blockstep import BlockStack

__all__ = ["AUTO_MATMUL", "MATMUL_DTYPES", "LlamaStep", "PackedLinears", "attend",
           "attend_blocked", "block_rows", "check_llama", "is_llama_family",
           "matmul_unsupported", "pack_linears", "rope_for"]


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
                 packed: PackedLinears | None = None, integer_from: int | None = None) -> None:
        super().__init__()
        self.base = model.base_model
        self.head = model.get_output_embeddings() if logits else None
        self.depth = depth
        self.hidden_indices = hidden_indices
        self.full = depth == model.config.num_hidden_layers
        self.packed = packed  # None for export: ONNX sees the plain projections
        # q4_1_tail_q8: the first block on int8 products (the stream's, ``integer_from``)
        self.integer_from = integer_from

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        base = self.base
        h = base.embed_tokens(input_ids)
        fused = self.packed.fused if self.packed is not None else None
        if fused is not None:  # q4_1: the blocks in one C call where it can run this read
            out = fused.forward(self, h, position_ids, mask, past)
            if out is not None:
                return out
        rope = rope_for(base, h, position_ids, self.packed)
        cfg = base.config
        groups = cfg.num_attention_heads // (getattr(cfg, "num_key_value_heads", None)
                                             or cfg.num_attention_heads)
        blocked = ~mask.repeat(1, 1, groups, 1)  # once for all blocks (attend_blocked)
        states = [h]
        new_kv: list[torch.Tensor] = []
        for i in range(self.depth):
            h = _block(base.layers[i], h, rope, blocked, past[2 * i], past[2 * i + 1], new_kv,
                       self.packed, i)
            states.append(h)
        if self.full:
            states[-1] = base.norm(h)  # HF convention: the last hidden state is normed
        outs = [states[i][0] for i in self.hidden_indices]
        if self.head is not None:
            head = self.packed.head if self.packed is not None else None
            outs.append((head(states[-1]) if head is not None else self.head(states[-1]))[0])
        return (*outs, *new_kv)


def rope_for(base: Any, h: torch.Tensor, positions: torch.Tensor,
             packed: PackedLinears | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary embedding's cos and sin at ``positions``, made once per forward: as the
    model's ``rotary_emb`` gives them, ``(B, n, head_dim)``, or on packed projections laid out
    for ``_packed_qkv``: ``(B, n, 1, head_dim)``, with ``rotate_half``'s sign folded into sin
    (``-x * s`` and ``x * -s`` are the same float)."""
    cos, sin = base.rotary_emb(h, position_ids=positions)
    if packed is None:
        return cos, sin
    half = sin.shape[-1] // 2
    signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    return cos.unsqueeze(2), signed.unsqueeze(2)


def _block(layer: Any, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
           blocked: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
           new_kv: list[torch.Tensor], packed: PackedLinears | None = None,
           index: int = 0) -> torch.Tensor:
    """A Llama decoder block with an explicit KV cache (mirrors ``LlamaDecoderLayer``); with
    ``packed``, block ``index``'s projections run on its packed weights. ``blocked``: the
    mask as ``attend_blocked`` takes it; ``rope``: ``rope_for``'s."""
    q, k, v, scaling = _qkv(layer, h, rope, packed, index)
    new_kv += [k, v]
    out = attend_blocked(q, k, v, past_k, past_v, blocked, scaling)
    return _finish(layer, h, out, packed, index)


def block_rows(layer: Any, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
               rows: list[tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor | None]],
               new_kv: list[torch.Tensor], packed: PackedLinears | None = None,
               index: int = 0) -> torch.Tensor:
    """``_block`` over the tokens of several streams packed in one sequence ``(1, total, _)``:
    the projections and the MLP run on all rows at once, attention stream by stream.

    ``rows`` are ``(start, end, past_k, past_v, blocked)``: a stream's tokens ``start:end`` of
    the sequence, its own cache (read in place: no padding, no copy) and its unbatched read's
    mask as ``attend_blocked`` takes it, so each stream's attention is its unbatched read's.
    ``rope``: ``rope_for``'s, for the whole sequence."""
    q, k, v, scaling = _qkv(layer, h, rope, packed, index)
    new_kv += [k, v]
    parts = [attend_blocked(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], pk, pv, blocked, scaling)
             for s, e, pk, pv, blocked in rows]
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
    return _finish(layer, h, out, packed, index)


def _qkv(layer: Any, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
         packed: PackedLinears | None, index: int
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """The block's queries, keys and values ``(B, heads, n, head_dim)``, rotated, and the
    scale still to apply to the queries."""
    if packed is not None:
        return _packed_qkv(layer, packed.blocks[index], h, rope)
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = layer.self_attn
    x = layer.input_layernorm(h)
    shape = (*x.shape[:-1], -1, attn.head_dim)
    q = attn.q_proj(x).view(shape).transpose(1, 2)
    k = attn.k_proj(x).view(shape).transpose(1, 2)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    cos, sin = rope
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, k, v, float(attn.scaling)


def _packed_qkv(layer: Any, fast: _PackedBlock, h: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """``_qkv`` on packed projections in fewer tensor ops (a read of a few tokens pays per op,
    30 blocks deep): the norm as one ``rms_norm``, the query and key heads rotated in one pass
    over the q/k/v product (HF's ``apply_rotary_pos_emb`` on both at once), the queries'
    scale already in their weights when it is a power of two. The same float32 arithmetic,
    element for element."""
    d = int(layer.self_attn.head_dim)
    x = _rms_norm(layer.input_layernorm, h)
    qkv = fast.qkv(x).view(*x.shape[:-1], -1, d)  # (B, n, heads + 2 kv_heads, d)
    rotated = fast.q_heads + fast.kv_heads
    half = d // 2
    qk = qkv[:, :, :rotated]
    cos, signed_sin = rope
    qk = qk * cos + torch.cat((qk[..., half:], qk[..., :half]), dim=-1) * signed_sin
    q = qk[:, :, : fast.q_heads].transpose(1, 2)
    k = qk[:, :, fast.q_heads :].transpose(1, 2)
    v = qkv[:, :, rotated:].transpose(1, 2)
    return q, k, v, fast.scaling


def _finish(layer: Any, h: torch.Tensor, out: torch.Tensor, packed: PackedLinears | None,
            index: int) -> torch.Tensor:
    """The attention's output ``(B, heads, n, head_dim)`` projected into the residual, then
    the MLP (on packed projections: the norm as one op)."""
    out = out.transpose(1, 2).reshape(*h.shape[:-1], -1)
    if packed is None:
        h = h + layer.self_attn.o_proj(out)
        return h + layer.mlp(layer.post_attention_layernorm(h))
    fast = packed.blocks[index]
    h = h + fast.o(out)
    gate, up = fast.gate_up(_rms_norm(layer.post_attention_layernorm, h)).chunk(2, dim=-1)
    return h + fast.down(layer.mlp.act_fn(gate) * up)


_ONE_OP_NORM = [True]  # False where ``pack_linears``'s probe found rms_norm differs


def _rms_norm(norm: Any, h: torch.Tensor) -> torch.Tensor:
    """``LlamaRMSNorm`` (Mistral's, Qwen2's) on float32 as one ``rms_norm``: the same
    arithmetic (checked bit for bit at load, ``pack_linears``)."""
    eps = getattr(norm, "variance_epsilon", None)
    if eps is None or h.dtype != torch.float32 or not _ONE_OP_NORM[0]:
        out: torch.Tensor = norm(h)
        return out
    return torch.nn.functional.rms_norm(h, (h.shape[-1],), norm.weight, eps)


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
    groups = q.shape[1] // k.shape[1]
    return attend_blocked(q, k, v, past_k, past_v, ~mask.repeat(1, 1, groups, 1), scale)


def attend_blocked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor,
                   past_v: torch.Tensor, blocked: torch.Tensor | None,
                   scale: float) -> torch.Tensor:
    """``attend`` with its mask given as ``blocked``, ``(B, 1, groups * n, past + n)``: True
    where a folded query row may not look (``~mask.repeat(1, 1, groups, 1)``, made once for
    all blocks); None when every row may look everywhere (a read of one token). A ``scale``
    of 1.0: the queries come scaled (``_PackedBlock``)."""
    b, heads, n, d = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    past = past_k.shape[2]
    # query head h uses key/value head h // groups: rows (h % groups) * n + t of that head
    qg = (q if scale == 1.0 else q * scale).reshape(b, kv_heads, groups * n, d)
    scores = torch.cat([torch.matmul(qg, past_k.transpose(2, 3)),
                        torch.matmul(qg, k.transpose(2, 3))], dim=-1)
    if blocked is not None:
        scores = scores.masked_fill(blocked, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    out = (torch.matmul(weights[..., :past], past_v)
           + torch.matmul(weights[..., past:], v))
    return out.reshape(b, heads, n, d)


MIN_ROWS = 4  # products of fewer rows run padded to this many (``_Packed``)


class _Packed:
    """``y = x @ W.T`` with ``W`` reordered once into oneDNN's blocked layout.

    Why: on this project's CPUs (AMD EPYC) torch's default fp32 ``linear`` for reads of a few
    tokens ran at about half the speed of the same product on weights packed for oneDNN (and of
    ONNX Runtime's prepacked MatMul): a read's CPU is almost all these products
    (docs/observer.md, "Cost of a read"). Same float32 arithmetic, another summation order.

    Fewer than ``MIN_ROWS`` rows are padded with zero rows to ``MIN_ROWS``: oneDNN's kernel for
    one or two rows streamed the weights about a fifth slower here than its kernel for four
    (all of a forward's products: 49-52 against 40-42 ms of CPU), and a read of a few tokens
    costs what streaming the weights costs. Only row counts whose products stay the same floats
    padded are padded, checked once per weight shape (the 1,536-wide down projection changes
    its summation order at one row, so it runs one row as it is)."""

    # weight shape -> row counts padded (a table per class: each runs its own kernels)
    _padded: ClassVar[dict[tuple[int, int], frozenset[int]]] = {}
    min_rows = MIN_ROWS

    def __init__(self, weight: torch.Tensor) -> None:
        self.out_features = int(weight.shape[0])
        with torch.inference_mode():
            self.weight = self._pack(weight.detach().contiguous())
            shape = (int(weight.shape[0]), int(weight.shape[1]))
            table = type(self)._padded
            if shape not in table:
                table[shape] = self._same_padded(shape[1])
        self.padded = table[shape]

    def _pack(self, weight: torch.Tensor) -> Any:
        return torch.ops.mkldnn._reorder_linear_weight(weight, None)

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, None, "none", [], "")

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[-2]
        pad = x.new_zeros(*x.shape[:-2], self.min_rows - rows, x.shape[-1])
        return self._product(torch.cat((x, pad), dim=-2))[..., :rows, :]

    def _same_padded(self, width: int) -> frozenset[int]:
        """The row counts below ``min_rows`` whose products padded equal them unpadded."""
        x = torch.randn(1, self.min_rows, width)
        return frozenset(n for n in range(1, self.min_rows)
                         if torch.equal(self._pad(x[:, :n]), self._product(x[:, :n])))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] in self.padded:
            return self._pad(x)
        return self._product(x)


class _PackedBfloat16(_Packed):
    """``_Packed`` on bfloat16 weights (half the bytes a read streams) and rows rounded to
    bfloat16 on the way in: oneDNN's bfloat16 kernel (AVX512-BF16 or AMX) accumulates in
    float32 and stores bfloat16, widened back to float32 here (torch has no bfloat16 product
    with a float32 result on the CPU). All else in the step stays float32."""

    _padded: ClassVar[dict[tuple[int, int], frozenset[int]]] = {}

    def _pack(self, weight: torch.Tensor) -> Any:
        return torch.ops.mkldnn._reorder_linear_weight(weight.to(torch.bfloat16), None)

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), self.weight, None,
                                                  "none", [], "").float()


class _PackedFloat16(_Packed):
    """float16 weights in FBGEMM's packed layout, float32 rows and result: the weights are
    widened in registers, so only their rounding to float16 differs from float32. Not padded:
    FBGEMM's kernel is fastest on one row. Through torch's functional form where it has one
    (deprecated, but 10-20 us a call faster than ``quantized.linear_dynamic_fp16``: 1-2 ms of
    a SmolLM2 forward's 10-12 at one row), else that op: the same kernel, the same floats."""

    _padded: ClassVar[dict[tuple[int, int], frozenset[int]]] = {}
    min_rows = 1

    def _pack(self, weight: torch.Tensor) -> Any:
        if float(weight.abs().max()) > torch.finfo(torch.float16).max:  # would become inf
            raise ObserverError("observer.options.matmul 'float16': the model has weights "
                                "beyond float16's range; use bfloat16 or float32")
        self.bias: torch.Tensor | None = None
        if not hasattr(torch, "fbgemm_linear_fp16_weight_fp32_activation"):
            return torch.ops.quantized.linear_prepack_fp16(weight, None)
        self.bias = torch.zeros(weight.shape[0])
        with warnings.catch_warnings():  # the deprecation notices, each once per process
            warnings.simplefilter("ignore", UserWarning)
            packed = torch.fbgemm_pack_gemm_matrix_fp16(weight)
            torch.fbgemm_linear_fp16_weight_fp32_activation(weight[:1], packed, self.bias)
        return packed

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            out: torch.Tensor = torch.ops.quantized.linear_dynamic_fp16(x, self.weight)
            return out
        return torch.fbgemm_linear_fp16_weight_fp32_activation(x, self.weight, self.bias)


class _PackedQ4_1(_Packed):
    """Weights kept as GGUF Q4_1 blocks (``guardrail.observer.blockq``: 5 bits a weight, 3.2x
    fewer bytes than float16), rebuilt in registers as the same float32 weights by a small C
    kernel: float32's products but for the summation order. Refuses (``ObserverError``) a
    weight that is not exactly Q4_1 blocks. Not padded: the kernel is fastest on one row."""

    _padded: ClassVar[dict[tuple[int, int], frozenset[int]]] = {}
    min_rows = 1
    blocks = "Q4_1"
    option = "q4_1"  # the observer.options.matmul value it runs
    bits = 0  # the rows' integer width in the integer kernels; 0: float32 rows

    def _pack(self, weight: torch.Tensor) -> Any:
        from .blockq import BlockqError, Q4_1IntWeight, Q4_1Weight, Q8_0IntWeight, Q8_0Weight

        try:
            if self.bits:
                kind = Q4_1IntWeight if self.blocks == "Q4_1" else Q8_0IntWeight
                return kind.of(weight, self.bits)
            return (Q4_1Weight if self.blocks == "Q4_1" else Q8_0Weight).of(weight)
        except BlockqError as exc:
            raise ObserverError(f"observer.options.matmul {self.option!r}: {exc}; the option "
                                "needs a model converted from GGUF Q4_1 (SmolLM2's default); "
                                "drop it or use float16") from exc

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.weight(x)
        return out


class _PackedQ8_0(_PackedQ4_1):
    """``_PackedQ4_1`` for an output head kept as GGUF Q8_0 blocks (9 bits a weight)."""

    _padded: ClassVar[dict[tuple[int, int], frozenset[int]]] = {}
    blocks = "Q8_0"


class _PackedQ4_1Q8(_PackedQ4_1):
    """The Q4_1 blocks multiplied in integers, as llama.cpp does on the CPU: each row quantized
    per block of 32 to int8 (a float scale and the block's sum per block), integer dot products
    of each block, float sums across blocks (``blockq.c``, "Integer products"). Not float32's
    products: the rows lose to 8 bits (docs/observer.md, "Integer products")."""

    _padded: ClassVar[dict[tuple[int, int], frozenset[int]]] = {}
    option = "q4_1_q8"
    bits = 8


class _PackedQ8_0Q8(_PackedQ4_1Q8):
    _padded: ClassVar[dict[tuple[int, int], frozenset[int]]] = {}
    blocks = "Q8_0"


class _PackedQ4_1Q16(_PackedQ4_1):
    """``_PackedQ4_1Q8`` with the rows quantized to int16 per block of 32 (``madd_epi16``):
    rounding of 2^-16 of a block's largest value, under float16's."""

    _padded: ClassVar[dict[tuple[int, int], frozenset[int]]] = {}
    option = "q4_1_q16"
    bits = 16


class _PackedQ8_0Q16(_PackedQ4_1Q16):
    _padded: ClassVar[dict[tuple[int, int], frozenset[int]]] = {}
    blocks = "Q8_0"


class _PackedQ4_1Tail(_PackedQ4_1):
    """``q4_1_tail_q8``'s blocks: ``_PackedQ4_1``'s float32 products, and beside them
    (``PackedLinears.tail``) the same blocks for int8 products, which a read runs in the blocks
    past the deepest layer its monitors read (docs/observer.md, "Integer products past the
    layers read")."""

    _padded: ClassVar[dict[tuple[int, int], frozenset[int]]] = {}
    option = "q4_1_tail_q8"


class _PackedBlock:
    """A block's projections packed: q/k/v as one product, gate/up as one, o, down.

    When the attention's scale is a power of two (head_dim 64: 1/8) it is folded into the
    query weights: scaling by a power of two is exact in float32, so the scaled queries are
    the same floats as ``attend``'s ``q * scale``, one op per block fewer."""

    def __init__(self, layer: Any, kind: type[_Packed] = _Packed) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        weights = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
        d = int(attn.head_dim)
        self.q_heads = int(weights[0].shape[0]) // d
        self.kv_heads = int(weights[1].shape[0]) // d
        scale = float(attn.scaling)
        self.scaling = scale
        if scale > 0 and math.frexp(scale)[0] == 0.5:  # a power of two
            weights[0] = weights[0] * scale
            self.scaling = 1.0
        self.qkv = kind(torch.cat(weights))
        self.o = kind(attn.o_proj.weight)
        self.gate_up = kind(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
        self.down = kind(mlp.down_proj.weight)


class PackedLinears:
    """The projections of a Llama-family model's first ``depth`` blocks (and its output head),
    packed once at load for the eager CPU step. Doubles the weights' memory (the model keeps
    its own for the HF forward and export)."""

    def __init__(self, model: Any, depth: int, head: bool = True,
                 matmul: str = "float32") -> None:
        kind = _KINDS[matmul]
        self.matmul = matmul
        layers = model.base_model.layers
        self.blocks = [_PackedBlock(layers[i], kind) for i in range(depth)]
        out = model.get_output_embeddings()
        self.head = _head(out.weight, matmul, kind) if head and out is not None else None
        # q4_1_tail_q8: each block's products also in int8 (read past the deepest layer read)
        self.tail: list[_PackedBlock] | None = None
        if matmul == "q4_1_tail_q8":
            self.tail = [_PackedBlock(layers[i], _PackedQ4_1Q8) for i in range(depth)]
        # q4_1: the blocks in one C call (blockstep) where its checks pass, else None
        self.fused: BlockStack | None = None
        if matmul in FUSED:
            from .blockstep import BlockStack

            self.fused = BlockStack.of(model, self)


def _head(weight: torch.Tensor, matmul: str, kind: type[_Packed]) -> _Packed:
    """The output head packed: as the projections, but under ``q4_1`` (and its integer forms)
    as Q8_0 blocks when it is exactly such blocks (a GGUF's Q8_0 embedding, tied) and else in
    float32 products."""
    if matmul not in _HEADS:
        return kind(weight)
    try:
        return _HEADS[matmul](weight)
    except ObserverError:
        return _Packed(weight)


# observer.options.matmul
MATMUL_DTYPES = ("auto", "float32", "bfloat16", "float16", "q4_1", "q4_1_tail_q8", "q4_1_q8",
                 "q4_1_q16")
# What ``auto`` tries, in order, before float32. q4_1_tail_q8 first: q4_1's float32 states in
# the blocks the monitors read, int8 products after them (0.73-0.81x q4_1's CPU from 9 rows,
# no harm verdict moved; docs/observer.md, "Integer products past the layers read"); then
# q4_1 (faster than float16 at every read size, float32's states), where its blocks cannot
# run in one call; both only on exact Q4_1 weights (SmolLM2's) with a C compiler, so
# elsewhere float16.
AUTO_MATMUL = ("q4_1_tail_q8", "q4_1", "float16")
_KINDS: dict[str, type[_Packed]] = {"float32": _Packed, "bfloat16": _PackedBfloat16,
                                    "float16": _PackedFloat16, "q4_1": _PackedQ4_1,
                                    "q4_1_tail_q8": _PackedQ4_1Tail,
                                    "q4_1_q8": _PackedQ4_1Q8, "q4_1_q16": _PackedQ4_1Q16}
_HEADS: dict[str, type[_Packed]] = {"q4_1": _PackedQ8_0, "q4_1_tail_q8": _PackedQ8_0Q8,
                                    "q4_1_q8": _PackedQ8_0Q8, "q4_1_q16": _PackedQ8_0Q16}
_BLOCKQ = ("q4_1", "q4_1_tail_q8", "q4_1_q8", "q4_1_q16")  # the options that run blockq.c
_INTEGER = ("q4_1_q8", "q4_1_q16")  # ... of them, those that quantize the rows


def matmul_unsupported(matmul: str) -> str | None:
    """Why this machine cannot run the packed products in ``matmul`` fast, or None."""
    if matmul == "float32":
        return None
    if matmul in _BLOCKQ:
        from .blockq import kernel_unavailable

        return kernel_unavailable()
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    if matmul == "bfloat16":
        if not (caps.get("avx512_bf16") or caps.get("amx_bf16")):
            return "the CPU has no bfloat16 matrix instructions (AVX512-BF16 or AMX)"
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return "this torch's oneDNN has no bfloat16 kernels for this CPU"
        return None
    if not (caps.get("avx2") and caps.get("f16c")):
        return "the CPU lacks AVX2 and F16C, which FBGEMM's float16 kernel needs"
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return "this torch is built without FBGEMM"
    return None


def pack_linears(model: Any, matmul: str = "float32") -> PackedLinears | None:
    """Packed projections for ``model`` when they apply (a Llama-family float32 model on the
    CPU, without projection biases, on a torch with oneDNN), else None (the step runs the
    model's own modules). Checked once against ``linear`` on the first block's weights.

    ``matmul`` (``observer.options.matmul``): the products' weights in float32, in
    bfloat16 or float16 (``_PackedBfloat16``, ``_PackedFloat16``), or as the GGUF Q4_1 blocks
    they were converted from (``_PackedQ4_1``); those are asked for, so where they cannot run
    this raises ``ObserverError`` saying why instead of returning None. ``auto`` (the policy
    default): the first of ``AUTO_MATMUL`` that runs here, else float32's packing (or None),
    never an error."""
    if matmul == "auto":
        for choice in AUTO_MATMUL:
            try:
                return pack_linears(model, choice)
            except ObserverError:  # says why it cannot run here: the next, quietly
                continue
        return pack_linears(model, "float32")
    if matmul not in _KINDS:
        raise ObserverError(f"observer.options.matmul must be one of {', '.join(MATMUL_DTYPES)},"
                            f" got {matmul!r}")
    why = _unpackable(model)
    if why is None and matmul != "float32":
        why = matmul_unsupported(matmul)
    if why is None:
        why = _probe(model, matmul)
    if why is not None:
        if matmul == "float32":
            return None
        raise ObserverError(f"observer.options.matmul {matmul!r} cannot run here: {why}; "
                            "drop the option (float32)")
    packed = PackedLinears(model, int(model.config.num_hidden_layers), matmul=matmul)
    if matmul == "q4_1_tail_q8" and packed.fused is None:
        from .blockstep import unfused

        why = unfused(model, packed) or "its blocks in one C call differ from the torch blocks"
        raise ObserverError(f"observer.options.matmul 'q4_1_tail_q8' cannot run here: {why}; "
                            "use q4_1")
    return packed


def _probe(model: Any, matmul: str) -> str | None:
    """Why ``matmul``'s product on the first block's q weights is not float32's (to its
    rounding), or None; checks the one-op RMSNorm on the way."""
    layer = model.base_model.layers[0]
    attn = layer.self_attn
    # float32: the same product in another summation order; fewer bits: a bound well above
    # their rounding (relative 2^-8 for bfloat16) that a wrong layout or kernel would break
    tol = 1e-4 if matmul in ("float32", *FUSED) else 0.05
    try:
        probe = _KINDS[matmul](attn.q_proj.weight)
        with torch.inference_mode():
            x = torch.randn(3, int(attn.q_proj.weight.shape[1]))
            got, want = probe(x), attn.q_proj(x)
            if matmul in _INTEGER:  # the rows' rounding moves every output: a relative norm
                same = float((got - want).norm() / want.norm()) <= tol
            else:
                same = torch.allclose(got, want, rtol=tol, atol=tol)
            if not same:
                return "its product on the first block's weights differs from float32's"
            _probe_norm(layer.input_layernorm, int(x.shape[-1]))
    except (RuntimeError, AttributeError) as exc:  # a torch without these kernels
        return f"{type(exc).__name__}: {exc}"
    return None


def _unpackable(model: Any) -> str | None:
    """Why ``model``'s projections cannot be packed, or None."""
    if not is_llama_family(model):
        return f"{type(model).__name__} is not a Llama-family model"
    if not torch.backends.mkldnn.is_available():
        return "this torch has no oneDNN"
    first = next(model.parameters())
    if first.dtype != torch.float32:
        return f"the model is loaded in {str(first.dtype).removeprefix('torch.')} " \
               "(observer.options.dtype), not float32"
    if first.device.type != "cpu":
        return f"the model is on {first.device}, not the CPU"
    layer = model.base_model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    if not all(hasattr(mlp, a) for a in ("act_fn", "gate_proj", "up_proj", "down_proj")):
        return "its MLP is not Llama's gate/up/down"
    projections = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj,
                   mlp.up_proj, mlp.down_proj]
    if any(getattr(p, "bias", None) is not None for p in projections):
        return "its projections have biases"
    return None


def _probe_norm(norm: Any, size: int) -> None:
    """``_rms_norm`` as one op where it gives the same floats as the model's norm on this
    torch, else the model's norm."""
    h = torch.randn(3, size) * 10
    _ONE_OP_NORM[0] = True
    _ONE_OP_NORM[0] = torch.equal(_rms_norm(norm, h), norm(h))


def check_llama(model: Any) -> None:
    if not is_llama_family(model):
        raise ObserverError(
            f"the onnx observer backend supports Llama-family models; "
            f"{type(model).__name__} is not one: set observer.backend to 'torch'"
        )
