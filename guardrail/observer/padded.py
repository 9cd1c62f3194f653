"""The batched forward for accelerators: every stream's cache in one pooled buffer, attention for
all the streams of a batch in one padded call.

On a GPU the packed forward of ``batch._step`` is bound by the host launching small kernels one
stream at a time (attention over each stream's own cache in every block, each stream's new keys
and values appended to its cache, each stream's rows copied back): docs/benchmarks.md, "The
batched observer on a GPU". Here each block's keys (and values) of all streams live in one
``(slots, kv_heads, capacity, head_dim)`` buffer (``KVPool``), a stream owning one slot
(``PooledKV``, a ``KVStore`` like ``TensorKV``); per block a forward writes every stream's new keys
and values with one indexed copy, takes the batch's slots (a view when they are consecutive, else
one gather) and runs one ``scaled_dot_product_attention`` with a mask (a stream's query ``j`` sees
its own cache up to its position). The rows the streams want come back to the host in one copy.

The CPU keeps the packed forward (attention stream by stream over each stream's cache in place):
there padding and stacking cost more than they save. The observer's ``padded`` flag picks the
path (on by default off the CPU; tests turn it on for a CPU observer).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["KVPool", "PaddedOut", "PooledKV", "padded_step", "to_host"]

GROW = 64  # positions a pool grows by at least (as TensorKV)
MIN_SLOTS = 8  # slots a pool starts with; it doubles when full


class KVPool:
    """Per block and kind, one ``(slots, kv_heads, capacity, head_dim)`` buffer shared by the
    streams read at one depth. Grown (copied) when a stream needs more positions than the
    capacity (to twice it, at most the window unless a read is longer) or when every slot is
    taken (twice the slots); its buffers are freed when its last stream is.

    Owned by the scheduler thread (a padded forward writes into the buffers while it runs, so it
    runs alone: ``BatchedObserver`` uses one forward worker with it); slots are taken and given
    back under a lock, from any thread (a stream's cache is freed when it is garbage).
    """

    def __init__(self, depth: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", window: int | None = None) -> None:
        self.depth, self.kv_heads, self.head_dim = depth, kv_heads, head_dim
        self.dtype, self.device, self.window = dtype, torch.device(device), window
        self.buffers: list[torch.Tensor] = []
        self.slots = 0
        self.capacity = 0
        self.generation = 0  # bumped when the buffers are replaced: views must be taken again
        self._free: list[int] = []
        self._taken = 0
        self._lock = threading.RLock()

    def take(self) -> int:
        with self._lock:
            if not self._free:
                self._resize(max(MIN_SLOTS, 2 * self.slots), max(self.capacity, GROW))
            self._free.sort(reverse=True)  # lowest first: live slots stay close together
            self._taken += 1
            return self._free.pop()

    def give_back(self, slot: int) -> None:
        with self._lock:
            self._free.append(slot)
            self._taken -= 1
            if self._taken == 0:  # nothing live: hand the memory back
                self.buffers, self.slots, self.capacity, self._free = [], 0, 0, []
                self.generation += 1

    def reserve(self, total: int) -> None:
        """Room for ``total`` positions in every slot."""
        if total <= self.capacity:
            return
        with self._lock:
            size = max(-(-total // GROW) * GROW, 2 * self.capacity)
            if self.window is not None:
                size = min(size, max(self.window, total))
            self._resize(self.slots, size)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers)

    def _resize(self, slots: int, capacity: int) -> None:
        # zeros, not empty: a padded attention multiplies the values of masked positions by 0,
        # and 0 * NaN from uninitialised memory would be NaN
        with torch.inference_mode():
            new = [torch.zeros(slots, self.kv_heads, capacity, self.head_dim, dtype=self.dtype,
                               device=self.device) for _ in range(2 * self.depth)]
            for old, b in zip(self.buffers, new, strict=False):
                b[: self.slots, :, : self.capacity] = old
        self._free += range(self.slots, slots)
        self.buffers, self.slots, self.capacity = new, slots, capacity
        self.generation += 1


class PooledKV:
    """One stream's cache: a slot of a ``KVPool``, seen as ``TensorKV`` is (``tensors`` are
    ``(1, kv_heads, length, head_dim)`` views of the filled part)."""

    def __init__(self, pool: KVPool) -> None:
        self.pool = pool
        self.slot = pool.take()
        self._length = 0
        self._views: tuple[int, int, list[torch.Tensor]] | None = None
        weakref.finalize(self, pool.give_back, self.slot)

    @property
    def tensors(self) -> list[torch.Tensor]:
        views = self._views
        if views is None or views[0] != self.pool.generation or views[1] != self._length:
            s = self.slot
            views = (self.pool.generation, self._length,
                     [b[s:s + 1, :, : self._length] for b in self.pool.buffers])
            self._views = views
        return views[2]

    def length(self) -> int:
        return self._length

    def capacity(self) -> int:
        return self.pool.capacity

    def nbytes(self) -> int:
        """This stream's share of the pool (one slot)."""
        return self.pool.nbytes() // max(1, self.pool.slots)

    def reserve(self, total: int) -> None:
        self.pool.reserve(total)

    def append(self, new: Sequence[torch.Tensor]) -> None:
        n = int(new[0].shape[2])
        end = self._length + n
        self.pool.reserve(end)
        with torch.inference_mode():
            for b, t in zip(self.pool.buffers, new, strict=True):
                b[self.slot, :, self._length:end] = t[0]
        self._length = end

    def commit(self, n: int) -> None:
        """``n`` positions past the filled part were written in place (by ``padded_step``)."""
        self._length += n

    def drop(self, start: int, count: int) -> None:
        end, s = self._length, self.slot
        with torch.inference_mode():
            for b in self.pool.buffers:  # clone: copy_ refuses an overlapping source
                b[s, :, start:end - count] = b[s, :, start + count:end].clone()
        self._length -= count

    def crop(self, length: int) -> None:
        self._length = min(self._length, length)


@dataclass
class PaddedOut:
    """A padded forward's outputs, on the device: row ``b`` is ``spans[b]`` of the packed
    sequence; the new keys and values are already in the pool (``PooledKV.commit``)."""

    spans: list[tuple[int, int]]
    states: dict[int, torch.Tensor]  # HF hidden-state index -> (1, total, hidden)
    logits: torch.Tensor | None  # (tokens of the rows that want logits, vocab)
    logit_spans: dict[int, tuple[int, int]]  # row -> its span in ``logits``


@dataclass
class _Layout:
    """Where a padded forward's packed tokens go: each token's slot and position in the pool,
    each token's (stream, row) in the padded batch (None when every stream reads as many
    tokens), the batch's slots (a view when consecutive) and the attention mask."""

    b_n: int
    n_max: int
    total: int
    length: int
    groups: int
    tok_slot: torch.Tensor
    tok_pos: torch.Tensor
    tok_b: torch.Tensor | None
    tok_j: torch.Tensor | None
    first: int
    slot_index: torch.Tensor | None
    mask: torch.Tensor


def _layout(spans: list[tuple[int, int]], pasts: list[int], slots: list[int], groups: int,
            device: torch.device) -> _Layout:
    lens = [e - s for s, e in spans]
    b_n, n_max, total = len(spans), max(lens), spans[-1][1]
    length = max(p + n for p, n in zip(pasts, lens, strict=True))

    def tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    tok_b = tok_j = None
    if any(n != n_max for n in lens):
        tok_b = tensor([b for b, n in enumerate(lens) for _ in range(n)])
        tok_j = tensor([j for n in lens for j in range(n)])
    first = slots[0]
    consecutive = slots == list(range(first, first + b_n))
    # query j of stream b (folded: row g * n_max + j for each of its query heads' groups) sees
    # positions 0 .. pasts[b] + j of its slot; padding rows see position 0 at least (no NaN)
    limit = tensor([p + j + 1 for p in pasts for j in range(n_max)]).view(b_n, n_max)
    mask = (torch.arange(length, device=device)
            < limit.repeat(1, groups).view(b_n, 1, groups * n_max, 1))
    return _Layout(b_n, n_max, total, length, groups,
                   tensor([slots[b] for b, n in enumerate(lens) for _ in range(n)]),
                   tensor([pasts[b] + j for b, n in enumerate(lens) for j in range(n)]),
                   tok_b, tok_j, first, None if consecutive else tensor(slots), mask)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float,
            pool: KVPool, i: int, at: _Layout) -> torch.Tensor:
    """Block ``i``'s attention for every stream at once: the new keys and values written into
    their slots, then one masked call over the batch's slots; ``(1, heads, total, dim)``."""
    heads, dim = q.shape[1], q.shape[-1]
    b_n, n_max = at.b_n, at.n_max
    keys, values = pool.buffers[2 * i], pool.buffers[2 * i + 1]
    keys[at.tok_slot, :, at.tok_pos] = k[0].transpose(0, 1)  # every stream's new keys at once
    values[at.tok_slot, :, at.tok_pos] = v[0].transpose(0, 1)
    if at.slot_index is None:
        keys = keys[at.first:at.first + b_n, :, :at.length]  # the batch's slots: a view
        values = values[at.first:at.first + b_n, :, :at.length]
    else:
        keys = keys[:, :, :at.length].index_select(0, at.slot_index)
        values = values[:, :, :at.length].index_select(0, at.slot_index)
    if at.tok_b is None:
        qp = q[0].view(heads, b_n, n_max, dim).transpose(0, 1)
    else:
        qp = q.new_zeros(b_n, heads, n_max, dim)
        qp[at.tok_b, :, at.tok_j] = q[0].transpose(0, 1)
    # the query heads that share a key/value head folded into its rows (no key repeated)
    qg = qp.reshape(b_n, heads // at.groups, at.groups * n_max, dim)
    o = torch.nn.functional.scaled_dot_product_attention(
        qg, keys, values, attn_mask=at.mask, scale=scaling)
    o = o.reshape(b_n, heads, n_max, dim)  # a CUDA kernel may return another layout
    if at.tok_b is None:
        return o.transpose(0, 1).reshape(1, heads, at.total, dim)
    return o[at.tok_b, :, at.tok_j].transpose(0, 1).unsqueeze(0)


def _logits(model: Any, last: torch.Tensor, spans: list[tuple[int, int]],
            logit_rows: Sequence[int], packed: Any
            ) -> tuple[torch.Tensor | None, dict[int, tuple[int, int]]]:
    """The head over the rows that want logits only, and each row's span in its output."""
    if not logit_rows:
        return None, {}
    head = (packed.head if packed is not None else None) or model.get_output_embeddings()
    if len(logit_rows) == len(spans):
        return head(last)[0], {b: spans[b] for b in logit_rows}
    logit_spans: dict[int, tuple[int, int]] = {}
    at = 0
    for b in logit_rows:
        s, e = spans[b]
        logit_spans[b] = (at, at + e - s)
        at += e - s
    return head(torch.cat([last[:, s:e] for s, e in (spans[b] for b in logit_rows)],
                          dim=1))[0], logit_spans


def padded_step(model: Any, depth: int, indices: Sequence[int], logit_rows: Sequence[int],
                ids: list[int], positions: list[int], spans: list[tuple[int, int]],
                pasts: list[int], pool: KVPool, slots: list[int],
                packed: Any = None) -> PaddedOut:
    """The first ``depth`` blocks over several streams' new tokens, packed in one sequence for
    the projections and the MLP; stream ``b``'s tokens ``spans[b]`` go to positions
    ``pasts[b]..`` of its slot ``slots[b]`` and attend to its cache through them."""
    from .llama_step import _finish, _qkv, rope_for

    base, config = model.base_model, model.config
    at = _layout(spans, pasts, slots, int(config.num_attention_heads) // pool.kv_heads,
                 pool.device)
    pool.reserve(at.length)

    def tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=pool.device)

    h = base.embed_tokens(tensor(ids).view(1, -1))
    rope = rope_for(base, h, tensor(positions).view(1, -1), packed)
    wanted = set(indices)
    states = {0: h} if 0 in wanted else {}
    for i in range(depth):
        layer = base.layers[i]
        q, k, v, scaling = _qkv(layer, h, rope, packed, i)  # (1, heads or kv_heads, total, dim)
        h = _finish(layer, h, _attend(q, k, v, scaling, pool, i, at), packed, i)
        if i + 1 in wanted:
            states[i + 1] = h
    full = depth == config.num_hidden_layers
    last = base.norm(h) if full else h  # HF convention: the last hidden state is normed
    if full and depth in wanted:
        states[depth] = last
    logits, logit_spans = _logits(model, last, spans, logit_rows, packed)
    return PaddedOut(spans, states, logits, logit_spans)


def to_host(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors as float32 on the CPU, in one device-to-host copy (one per tensor costs a
    copy and a wait each, per stream and layer)."""
    if not tensors:
        return []
    flat = torch.cat([t.float().reshape(-1) for t in tensors]).cpu()
    return [part.view(t.shape) for part, t in
            zip(flat.split([t.numel() for t in tensors]), tensors, strict=True)]
