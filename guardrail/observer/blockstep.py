"""A forward's decoder blocks in one C call (``blockstep.c``), under
``observer.options.matmul: q4_1`` (docs/observer.md, "The blocks of a q4_1 read in one C
call").

On Q4_1 blocks the products of a read of a few tokens take about 13 ms of SmolLM2's forward
and the ~60 other torch ops per block (norms, rotary, attention, residual adds, silu, views)
about 11 ms, mostly torch's per-op dispatch. ``BlockStack`` runs every block of a forward in
C instead, calling the same Q4_1 products: the embeddings, the rotary tables, the final norm
and the head stay in torch. Float32 throughout; the states are the torch step's (same
products, same weights) to float32 noise.

Under ``q4_1_tail_q8`` the same call runs the blocks from ``integer_from`` on (past the
deepest layer a stream's monitors read) on int8 products: their pointers are the blocks'
integer layout (``PackedLinears.tail``).

It is used by itself wherever ``q4_1`` is: ``PackedLinears`` makes one when its checks pass
(the kernel builds, the model's shapes and activation fit, a probe block matches the torch
block), else the torch step runs as before. One call covers one stream's read or several
streams' rows packed in one sequence (``batch._step``), each attending over its own cache.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, Any

import torch

from .blockq import BlockqError, Q4_1IntWeight, Q4_1Weight, kernel

if TYPE_CHECKING:
    from .llama_step import LlamaStep, PackedLinears, _PackedBlock

__all__ = ["FUSED", "PROBE_TOLERANCE", "BlockStack", "unfused"]

FUSED = ("q4_1", "q4_1_tail_q8")  # the `matmul` options whose blocks run in one C call

# Largest relative distance (per row) from the torch block allowed at load's probe: well above
# float32's summation-order noise (about 1e-6 here), far below a wrong layout or kernel.
PROBE_TOLERANCE = 1e-4
# The same for a block on int8 products (q4_1_tail_q8): their rounding is about 1e-2 of a row
# (pack_linears' bound for q4_1_q8); a wrong layout is of the order of 1.
INTEGER_PROBE_TOLERANCE = 0.05
_PER_BLOCK = 14  # pointers per block, in blockstep.c's W_* order
_Ptrs = ctypes.c_void_p
_Segment = tuple[int, int, list[torch.Tensor]]  # rows start:end, that stream's cache views


def unfused(model: Any, packed: PackedLinears) -> str | None:
    """Why the blocks of ``model`` on ``packed`` cannot run in one C call, or None."""
    if packed.matmul not in FUSED:
        return f"its products are {packed.matmul}'s, not q4_1's"
    cfg = model.config
    if getattr(cfg, "hidden_act", None) not in ("silu", "swish"):
        return f"its MLP's activation is {getattr(cfg, 'hidden_act', None)!r}, not silu"
    layers = model.base_model.layers
    attn = layers[0].self_attn
    d, hidden = int(attn.head_dim), int(cfg.hidden_size)
    fast = packed.blocks[0]
    if d % 8 or fast.q_heads % fast.kv_heads:
        return f"its heads ({fast.q_heads} of {d}, {fast.kv_heads} key/value) do not fit"
    eps = {getattr(n, "variance_epsilon", None) for layer in layers
           for n in (layer.input_layernorm, layer.post_attention_layernorm)}
    if len(eps) != 1 or None in eps:
        return "its norms are not LlamaRMSNorm with one epsilon"
    for layer, block in zip(layers, packed.blocks, strict=False):
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if norm.weight.dtype != torch.float32 or tuple(norm.weight.shape) != (hidden,):
                return "its norms' weights are not float32 of the hidden size"
        if not all(isinstance(p.weight, Q4_1Weight)
                   for p in (block.qkv, block.o, block.gate_up, block.down)):
            return "not all its projections are on Q4_1 blocks"
    for block in packed.tail or ():
        if not all(isinstance(p.weight, Q4_1IntWeight)
                   for p in (block.qkv, block.o, block.gate_up, block.down)):
            return "not all its int8 projections are on Q4_1 blocks"
    return None


class BlockStack:
    """The decoder blocks of ``packed`` (all of the model's) as one C call per forward."""

    def __init__(self, model: Any, packed: PackedLinears) -> None:
        self._lib = kernel()
        ptr, size = ctypes.c_void_p, ctypes.c_int
        self._lib.guardrail_blocks.argtypes = [ptr, ctypes.c_float, ctypes.c_float, size, size,
                                               ptr, ptr, ptr, size, ptr, ptr, size, ptr, ptr,
                                               ptr, ptr, ptr]
        self._lib.guardrail_blocks.restype = ctypes.c_int
        base = model.base_model
        self.rotary = base.rotary_emb
        first = packed.blocks[0]
        self.head_dim = int(base.layers[0].self_attn.head_dim)
        self.kv_heads = first.kv_heads
        self.hidden = int(model.config.hidden_size)
        inter = int(first.down.weight.in_features)
        self._dims = (ctypes.c_int * 5)(self.hidden, first.q_heads, first.kv_heads,
                                        self.head_dim, inter)
        self.eps = float(base.layers[0].input_layernorm.variance_epsilon)
        self.scale = float(first.scaling)
        self._norms = []  # kept alive: the kernel reads their memory
        self.depth = len(packed.blocks)
        # per block, its W_PER_BLOCK pointers: float32 products, and int8 ones (tail) if any
        self._blocks: list[list[int]] = []
        self._tail: list[list[int]] = []
        tail: list[_PackedBlock | None] = [*packed.tail] if packed.tail else [None] * self.depth
        for layer, block, fast in zip(base.layers, packed.blocks, tail, strict=False):
            norms = [layer.input_layernorm.weight.detach().contiguous(),
                     layer.post_attention_layernorm.weight.detach().contiguous()]
            self._norms += norms
            for kind, out in ((block, self._blocks), (fast, self._tail)):
                if kind is not None:
                    out.append([n.data_ptr() for n in norms]
                               + [p for product in (kind.qkv, kind.o, kind.gate_up, kind.down)
                                  for p in product.weight._ptrs])
        self._weights: dict[int, Any] = {}  # integer_from -> the pointer array for the kernel

    def weights(self, integer_from: int) -> Any:
        """The kernel's pointer array with the blocks from ``integer_from`` on in int8 (made
        once per value)."""
        integer_from = min(integer_from, self.depth)
        array = self._weights.get(integer_from)
        if array is None:
            if integer_from < self.depth and not self._tail:
                raise ValueError("this block stack has no int8 products (q4_1_tail_q8)")
            ptrs = [p for b in range(self.depth)
                    for p in (self._tail if b >= integer_from else self._blocks)[b]]
            array = self._weights[integer_from] = (_Ptrs * len(ptrs))(*ptrs)
        return array

    @property
    def integer(self) -> bool:
        """Whether blocks can run on int8 products here (q4_1_tail_q8)."""
        return bool(self._tail)

    @classmethod
    def of(cls, model: Any, packed: PackedLinears) -> BlockStack | None:
        """A stack for ``packed`` where it runs and its probe block matches the torch block,
        else None (the torch step)."""
        if unfused(model, packed) is not None:
            return None
        try:
            stack = cls(model, packed)
        except (BlockqError, AttributeError):  # a kernel built without blockstep
            return None
        if stack.probe(model, packed) > PROBE_TOLERANCE:
            return None
        if stack.integer and stack.probe(model, packed, integer=True) > INTEGER_PROBE_TOLERANCE:
            return None
        return stack

    def probe(self, model: Any, packed: PackedLinears, integer: bool = False) -> float:
        """The largest relative distance per row between the first block here (on its int8
        products with ``integer``) and the torch block, on random rows: 3 new over 5 cached."""
        from .llama_step import _block, rope_for

        base = model.base_model
        gen = torch.Generator().manual_seed(0)
        with torch.inference_mode():
            h = torch.randn(1, 8, self.hidden, generator=gen)
            positions = torch.arange(8).view(1, -1)
            new: list[torch.Tensor] = []
            empty = torch.zeros(1, self.kv_heads, 0, self.head_dim)
            mask = torch.ones(1, 1, 5, 5, dtype=torch.bool).tril()
            groups = packed.blocks[0].q_heads // self.kv_heads
            rope = rope_for(base, h, positions, packed)
            _block(base.layers[0], h[:, :5], (rope[0][:, :5], rope[1][:, :5]),
                   ~mask.repeat(1, 1, groups, 1), empty, empty, new, packed, 0)  # the cache
            mask = torch.ones(1, 1, 3, 8, dtype=torch.bool)
            mask[0, 0, :, 5:] = mask[0, 0, :, 5:].tril()
            want = _block(base.layers[0], h[:, 5:], (rope[0][:, 5:], rope[1][:, 5:]),
                          ~mask.repeat(1, 1, groups, 1), new[0], new[1], [], packed, 0)
            cache = [t.contiguous() for t in new]  # rows of head_dim, as TensorKV keeps them
            ran = self.run(h[:, 5:], positions[:, 5:], [(0, 3, cache)], 1, (),
                           integer_from=0 if integer else None)
        if ran is None:
            return float("inf")
        return float(((ran[0] - want).norm(dim=-1) / want.norm(dim=-1)).max())

    def run(self, h: torch.Tensor, positions: torch.Tensor, segments: list[_Segment],
            depth: int, keep: Any, integer_from: int | None = None
            ) -> tuple[torch.Tensor, dict[int, torch.Tensor], list[torch.Tensor]] | None:
        """The first ``depth`` blocks over ``h`` ``(1, T, hidden)`` (the embeddings), whose
        rows ``start:end`` of each segment are one stream's new tokens at ``positions``, to
        attend over that stream's cache (``cache``: its views per block, keys then values,
        ``(1, kv_heads, past, head_dim)``) and causally over each other.

        Returns the state after block ``depth``, the states after the blocks in ``keep`` (by
        hidden-state index, 1..depth; ``depth``'s the same tensor) and the new keys and values
        per block ``(1, kv_heads, T, head_dim)``; or None where the caches or the rotary
        tables are not as the kernel reads them (the caller runs the torch blocks).
        ``integer_from``: the first block to run on int8 products (None: none; only where the
        stack has them, ``integer``)."""
        d, rows = self.head_dim, int(h.shape[1])
        if h.dim() != 3 or h.shape[0] != 1 or depth > self.depth or not segments:
            return None
        cos, sin = self.rotary(h, position_ids=positions)
        if cos.shape[-1] != d or cos.dtype != torch.float32:
            return None
        cos, sin = cos.contiguous(), sin.contiguous()
        bounds: list[int] = []
        past: list[int] = []
        strides: list[int] = []
        for start, end, cache in segments:
            if start != (bounds[-2] if bounds else 0) or not start < end <= rows:
                raise ValueError(f"segments {[(s, e) for s, e, _ in segments]} do not cover "
                                 f"the {rows} rows in order")
            first = cache[0]
            if (first.dtype != torch.float32 or first.stride(3) != 1 or first.stride(2) != d
                    or len(cache) < 2 * depth):
                return None
            bounds += [start, end, int(first.shape[2])]
            strides.append(first.stride(1))
            past += [t.data_ptr() for t in cache[: 2 * depth]]
        if bounds[-2] != rows:
            raise ValueError(f"segments {[(s, e) for s, e, _ in segments]} do not cover "
                             f"the {rows} rows in order")
        h_in = h.contiguous()
        out = torch.empty(1, rows, self.hidden)
        new = torch.empty(2 * depth, 1, self.kv_heads, rows, d)
        kept = sorted(i for i in set(keep) if 0 < i < depth)
        held = torch.empty(len(kept), 1, rows, self.hidden)
        at = {i: k for k, i in enumerate(kept)}
        keep_ptrs = (_Ptrs * depth)(*[held[at[b + 1]].data_ptr() if b + 1 in at else None
                                      for b in range(depth)])
        start = self.depth if integer_from is None or not self._tail else integer_from
        rc = self._lib.guardrail_blocks(
            self._dims, self.eps, self.scale, depth, start, self.weights(start), h_in.data_ptr(),
            out.data_ptr(), rows, cos.data_ptr(), sin.data_ptr(), len(segments),
            (ctypes.c_int * len(bounds))(*bounds), (_Ptrs * len(past))(*past),
            (ctypes.c_long * len(strides))(*strides), new.data_ptr(), keep_ptrs)
        if rc == -1:
            raise MemoryError("guardrail's block step could not allocate its buffers")
        if rc:
            raise ValueError(f"guardrail's block step refused its arguments (code {rc})")
        states = {i: held[k] for k, i in enumerate(kept)}
        if depth in set(keep):
            states[depth] = out
        return out, states, list(new.unbind(0))

    def forward(self, step: LlamaStep, h: torch.Tensor, positions: torch.Tensor,
                mask: torch.Tensor, past: tuple[torch.Tensor, ...]
                ) -> tuple[torch.Tensor, ...] | None:
        """``LlamaStep.forward`` after its embeddings, on one stream: its outputs, or None
        where this cannot run it (a mask other than the cache's all-visible and the new rows'
        causal one, which is what every eager read gives)."""
        rows, cached = int(h.shape[1]), int(past[0].shape[2]) if past else 0
        if tuple(mask.shape) != (1, 1, rows, cached + rows) or not _causal(mask, cached):
            return None
        ran = self.run(h, positions, [(0, rows, list(past))], step.depth, step.hidden_indices,
                       step.integer_from)
        if ran is None:
            return None
        last, states, new_kv = ran
        states[0] = h
        if step.full:
            last = step.base.norm(last)  # HF convention: the last hidden state is normed
            states[step.depth] = last
        outs = [states[i][0] for i in step.hidden_indices]
        if step.head is not None:
            head = step.packed.head if step.packed is not None else None
            outs.append((head(last) if head is not None else step.head(last))[0])
        return (*outs, *new_kv)


def _causal(mask: torch.Tensor, cached: int) -> bool:
    """Whether ``mask`` ``(1, 1, n, cached + n)`` lets every row see the cache and the new
    rows up to its own."""
    n = int(mask.shape[2])
    if n == 1:
        return bool(mask.all())
    want = torch.ones(n, n, dtype=torch.bool).tril()
    return bool(mask[0, 0, :, :cached].all()) and torch.equal(mask[0, 0, :, cached:], want)
