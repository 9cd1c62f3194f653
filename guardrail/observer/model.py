"""The torch observer: a Hugging Face causal LM read incrementally with a bounded KV cache."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from ..errors import ObserverError
from ..messages import normalize_messages
from ..monitor import Message, Needs
from ..stream import TokenSpan
from . import ObservedBatch
from .context import pool_rows, span_start
from .hf import cache_kwarg
from .prefix import PrefixCache
from .tokenization import HFTokenizer
from .window import StreamState, context_budget

__all__ = ["GROW", "BaseObserver", "TensorKV", "TorchKV", "TorchObserver", "render_context"]


def render_context(hf_tokenizer: Any, messages: Sequence[Message]) -> list[int]:
    """Token ids of the conversation through the chat template, ready for the answer."""
    msgs = normalize_messages(messages)
    if msgs and getattr(hf_tokenizer, "chat_template", None):
        text = hf_tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        ids = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    else:  # a base model: the messages' text, one per line
        text = "".join(f"{m.get('content', '')}\n" for m in msgs)
        ids = hf_tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
    if not ids:  # no conversation: start from the BOS (or EOS) token alone
        bos = getattr(hf_tokenizer, "bos_token_id", None)
        bos = bos if bos is not None else getattr(hf_tokenizer, "eos_token_id", None)
        ids = [bos] if bos is not None else []
    return list(ids)


class BaseObserver:
    """What every backend shares: tokenizer, conversation rendering, layer indexing, window."""

    # A Guard serves its streams' reads through one scheduler (guardrail.observer.batch).
    batchable = True
    threads: int | None = None  # CPU threads per forward, as observer.options.threads resolved
    pools_context = True  # gives the context's pooled states when asked (Needs.context)

    def __init__(self, name: str, hf_tokenizer: Any, config: Any, window: int) -> None:
        self.name = name
        self.hf_tokenizer = hf_tokenizer
        self.tokenizer = HFTokenizer(hf_tokenizer)
        self.config = config
        self.num_layers = int(config.num_hidden_layers)
        self.hidden_size = int(config.hidden_size)
        self.window = window
        # Context KV shared across streams (observer.options.prefix_cache_tokens; 0: off)
        self.prefix = PrefixCache()
        # Rotary models see only relative distances, so positions may keep counting after a
        # drop; learned absolute positions must stay below the model's maximum.
        self.rotary = _is_rotary(config)
        max_pos = (getattr(config, "max_position_embeddings", None)
                   or getattr(config, "n_positions", None))
        if not self.rotary and max_pos is not None and window > max_pos:
            raise ObserverError(
                f"observer.window {window} exceeds {name}'s {max_pos} positions; "
                f"set observer.window <= {max_pos} in the policy"
            )

    def hidden_index(self, layer: int) -> int:
        """Index into HF ``hidden_states`` of layer ``layer`` (the state after block ``layer``)."""
        if not -self.num_layers <= layer < self.num_layers:
            raise ObserverError(
                f"layer {layer} is out of range for observer {self.name!r} "
                f"({self.num_layers} layers: use 0..{self.num_layers - 1} "
                f"or -1..-{self.num_layers})"
            )
        return layer + 1 if layer >= 0 else self.num_layers + 1 + layer

    def signature(self, needs: Needs) -> tuple[int, tuple[int, ...], bool]:
        """(blocks to run, HF hidden-state indices to return, whether logits are needed)."""
        indices = tuple(sorted({self.hidden_index(layer) for layer in needs.layers}))
        logits = bool(needs.logits or needs.top_k)
        deepest = max(indices, default=0)
        # hidden_states[i] is the output of block i - 1: run blocks 0 .. deepest - 1
        full = logits or deepest == self.num_layers
        return (self.num_layers if full else max(1, deepest)), indices, logits

    def context_signature(self, needs: Needs) -> tuple[int, tuple[int, ...], bool]:
        """A context read's: as deep as the stream will read, with the rows of the layers it
        pools when ``needs.context`` (none otherwise), no logits."""
        depth, indices, _ = self.signature(needs)
        return depth, (indices if needs.context else ()), False

    def context_ids(self, messages: Sequence[Message]) -> list[int]:
        return self.context_span(messages, Needs())[0]

    def context_span(self, messages: Sequence[Message],
                     needs: Needs) -> tuple[list[int], int | None]:
        """The context's ids, cut to the window's context budget, and with ``needs.context``
        where its pooled span starts in them (``guardrail.observer.context``; None: not asked).
        A cut context pools what is left of the span (at least its last token)."""
        ids = render_context(self.hf_tokenizer, messages)
        budget = context_budget(self.window)
        cut = max(0, len(ids) - budget)
        ids = ids[cut:]
        if not needs.context:
            return ids, None
        return ids, span_start(lambda m: render_context(self.hf_tokenizer, m), messages,
                               len(ids), cut)

    def chunks(self, state: StreamState, ids: list[int]) -> Iterable[list[int]]:
        """Split ``ids`` only when they cannot fit the window in one forward."""
        room = max(1, self.window - state.context_len)
        for i in range(0, len(ids), room):
            yield ids[i : i + room]


class TorchKV:
    """A ``DynamicCache`` seen as a ``KVStore``."""

    def __init__(self, cache: Any) -> None:
        self.cache = cache

    def length(self) -> int:
        return int(self.cache.get_seq_length())

    def drop(self, start: int, count: int) -> None:
        for layer in self.cache.layers:
            layer.keys = _without(layer.keys, start, count)
            layer.values = _without(layer.values, start, count)

    def crop(self, length: int) -> None:
        for layer in self.cache.layers:
            layer.keys = layer.keys[..., :length, :]
            layer.values = layer.values[..., :length, :]


class TensorKV:
    """A KV cache as one ``(1, kv_heads, length, head_dim)`` tensor per block and kind.

    The positions live in preallocated buffers that grow to twice their size, in multiples of
    ``GROW`` (never past the window the stream keeps): a read appends its new keys and values in
    place instead of copying the whole cache, a stream of n tokens copies its cache O(log n)
    times, and ``tensors`` are views of the filled part.
    """

    def __init__(self, depth: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", window: int | None = None,
                 integer_from: int | None = None) -> None:
        # q4_1_tail_q8: the first block whose keys and values come from int8 products (None:
        # none); every read of the stream, and a prefix it shares, must agree on it
        self.integer_from = integer_from
        with torch.inference_mode():  # buffers are written in place, always in this mode
            self._buffers = [torch.zeros(1, kv_heads, 0, head_dim, dtype=dtype, device=device)
                             for _ in range(2 * depth)]
        self._length = 0
        self.window = window  # buffers grow past it only for a read that is longer
        self._views: list[torch.Tensor] | None = None

    @property
    def tensors(self) -> list[torch.Tensor]:
        """Views of the filled part, made once per change: a batched forward asks for each
        block's (60 views for SmolLM2), which cost about as much as the block's norms."""
        views = self._views
        if views is None:
            views = self._views = [b[:, :, : self._length] for b in self._buffers]
        return views

    def length(self) -> int:
        return self._length

    def capacity(self) -> int:
        return int(self._buffers[0].shape[2]) if self._buffers else 0

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers)

    def reserve(self, total: int) -> None:
        """Room for ``total`` positions: grow to twice the capacity or a multiple of ``GROW``
        that holds them, whichever is larger, at most the window unless ``total`` itself is
        larger."""
        if total <= self.capacity():
            return
        size = max(_round_up(total, GROW), 2 * self.capacity())
        if self.window is not None:
            size = min(size, max(self.window, total))
        grown = []
        with torch.inference_mode():
            for b in self._buffers:  # unfilled positions are never read: no need to zero them
                new = b.new_empty(b.shape[0], b.shape[1], size, b.shape[3])
                new[:, :, : self._length] = b[:, :, : self._length]
                grown.append(new)
        self._buffers = grown
        self._views = None

    def append(self, new: Sequence[torch.Tensor]) -> None:
        n = int(new[0].shape[2])
        self.reserve(self._length + n)
        end = self._length + n
        with torch.inference_mode():
            for b, t in zip(self._buffers, new, strict=True):
                b[:, :, self._length : end] = t
        self._length = end
        self._views = None

    def drop(self, start: int, count: int) -> None:
        end = self._length
        with torch.inference_mode():
            for b in self._buffers:  # clone: copy_ refuses an overlapping source
                b[:, :, start : end - count] = b[:, :, start + count : end].clone()
        self._length -= count
        self._views = None

    def crop(self, length: int) -> None:
        self._length = min(self._length, length)
        self._views = None


GROW = 64  # KV buffer growth step (positions): a growing buffer is copied once per GROW tokens


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


class TorchObserver(BaseObserver):
    """Reads a conversation, then the response chunk by chunk: one forward per chunk.

    Llama-family models (Llama, Mistral, Qwen2, SmolLM2) run a written-out step that stops after
    the deepest block the monitors read; other models (GPT-2, ...) run the HF forward.

    The model may sit on any device (its first parameter's): inputs and the KV cache are made
    there, and every batch comes back on the CPU, once per forward, because the monitors'
    per-token maths runs in numpy.
    """

    def __init__(self, name: str, model: Any, hf_tokenizer: Any, window: int,
                 matmul: str = "float32") -> None:
        from .llama_step import is_llama_family, pack_linears

        super().__init__(name, hf_tokenizer, model.config, window)
        self.model = model.eval()
        self._cache_kwarg = cache_kwarg(model.base_model)
        self.backend = "torch"
        first = next(model.parameters())
        self.dtype, self.device = first.dtype, first.device
        self.fast = is_llama_family(model)
        cfg = model.config
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = (getattr(cfg, "head_dim", None)
                         or cfg.hidden_size // cfg.num_attention_heads)
        # (depth, indices, logits, integer_from) -> its LlamaStep
        self._steps: dict[tuple[int, tuple[int, ...], bool, int | None], Any] = {}
        # The step's projections on weights packed once (CPU float32; None: the model's own),
        # stored in observer.options.matmul's dtype ("auto" resolved here)
        self.packed = pack_linears(model, matmul)
        self.matmul = self.packed.matmul if self.packed is not None else None
        self.vocab = int(model.get_input_embeddings().num_embeddings)
        # Off the CPU, batched reads take the padded path (guardrail.observer.padded): streams'
        # caches pooled per depth, attention for all streams in one call. Read when a stream
        # opens: set it before the first stream (tests turn it on for a CPU observer).
        self.padded = self.fast and self.device.type != "cpu"
        self._pools: dict[int, Any] = {}

    def check_ids(self, ids: Sequence[int]) -> None:
        """Refuse token ids outside the embedding before a forward on a GPU: there such an id
        is a device-side assert that breaks the CUDA context, failing every stream's reads after
        it. (On the CPU the forward raises for that stream alone: nothing to check.)"""
        if self.device.type != "cpu" and ids and (min(ids) < 0 or max(ids) >= self.vocab):
            bad = next(i for i in ids if not 0 <= i < self.vocab)
            raise ObserverError(f"observer {self.name!r}: token id {bad} is outside its "
                                f"vocabulary (0..{self.vocab - 1}): tokenize with "
                                "observer.tokenizer")

    def start(self, messages: Sequence[Message], needs: Needs) -> StreamState:
        state, ids = self.open(messages, needs)
        if ids:  # read the conversation: fill the cache, return the rows it pools (if asked)
            first = state.kv.length()  # a shared prefix may be in it already
            out = self._forward(state, ids, range(first, first + len(ids)), Needs(),
                                context=needs)
            if state.pool_from is not None:
                state.context = pool_rows(out.hidden, state.pool_from - first)
            self.context_read(state)
        return state

    def open(self, messages: Sequence[Message], needs: Needs) -> tuple[StreamState, list[int]]:
        """A stream's state, its cache holding what the prefix cache had of its context, and
        the context ids still to read into it (then call ``context_read``). A stream that pools
        the context reuses no cached position of its pooled span: those rows must be read."""
        ids, pool_from = self.context_span(messages, needs)
        kv: Any
        reused = 0
        if self.fast:
            depth = self.signature(needs)[0]
            kv = self._pooled(depth) if self.padded else TensorKV(
                depth, self.kv_heads, self.head_dim, self.dtype, self.device, self.window,
                self.integer_from(needs))
            reused = self.prefix.restore(kv, depth, ids if pool_from is None else ids[:pool_from])
        else:
            from transformers import DynamicCache

            kv = TorchKV(DynamicCache(config=self.config))
        state = StreamState(kv, self.window, context_len=len(ids), rotary=self.rotary,
                            context_ids=tuple(ids), pool_from=pool_from)
        return state, ids[reused:]

    def integer_from(self, needs: Needs) -> int | None:
        """Under ``q4_1_tail_q8``, the first block a stream with ``needs`` reads on int8
        products: the one after the deepest layer its monitors read but the last, which is
        read like the logits it gives (docs/observer.md, "Integer products past the layers
        read"). None under other products."""
        fused = getattr(self.packed, "fused", None)
        if fused is None or not fused.integer:
            return None
        return max((i for i in (self.hidden_index(layer) for layer in needs.layers)
                    if i < self.num_layers), default=0)

    def _pooled(self, depth: int) -> Any:
        """A cache in the pool of the streams read ``depth`` blocks deep."""
        from .padded import KVPool, PooledKV

        pool = self._pools.get(depth)
        if pool is None:
            pool = self._pools[depth] = KVPool(depth, self.kv_heads, self.head_dim, self.dtype,
                                               self.device, self.window)
        return PooledKV(pool)

    def context_read(self, state: StreamState) -> None:
        """The stream's context is in its cache: keep it for streams that share a prefix."""
        if self.fast:
            self.prefix.store(state.kv, len(state.kv.tensors) // 2, state.context_ids)

    def extend(self, state: StreamState, tokens: Sequence[TokenSpan],
               needs: Needs) -> ObservedBatch:
        ids = [_token_id(t) for t in tokens]
        if not ids:
            batch = _empty(needs, self.hidden_size)
        else:
            self.check_ids(ids)
            parts = []
            for chunk in self.chunks(state, ids):
                state.make_room(len(chunk))
                positions = state.positions(len(chunk))
                parts.append(self._forward(state, chunk, positions, needs))
                state.seen += len(chunk)
            batch = parts[0] if len(parts) == 1 else _concat(parts)
        batch.context = state.take_context()  # the stream's first batch hands them over
        return batch

    def truncate(self, state: StreamState, n_tokens: int) -> None:
        state.truncate(n_tokens)

    def _forward(self, state: StreamState, ids: list[int], positions: range,
                 needs: Needs, *, context: Needs | None = None) -> ObservedBatch:
        """One forward over ``ids``. A context read (``context``, the stream's needs) runs as
        deep as the stream will read and gives only the rows of the layers it pools, where they
        lie (none unless ``context.context``)."""
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        position_ids = torch.tensor([list(positions)], dtype=torch.long, device=self.device)
        if context is not None:
            needs = Needs(layers=context.layers if context.context else frozenset())
        with torch.inference_mode():
            if self.fast:
                signature = self.signature(needs)
                if context is not None:
                    signature = self.context_signature(context)
                hidden, logits = self._step(state, input_ids, position_ids, signature, needs)
            else:
                hidden, logits = self._hf_forward(state, input_ids, position_ids, needs)
            if context is not None:
                return ObservedBatch(hidden=hidden)
            return _batch(hidden, logits, needs)

    def _hf_forward(self, state: StreamState, input_ids: torch.Tensor,
                    position_ids: torch.Tensor, needs: Needs
                    ) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
        """The HF model's own forward (models without the written-out step)."""
        index = {layer: self.hidden_index(layer) for layer in needs.layers}
        out = self.model.base_model(
            input_ids=input_ids, position_ids=position_ids, use_cache=True,
            output_hidden_states=bool(index), **{self._cache_kwarg: state.kv.cache},
        )
        hidden = {layer: out.hidden_states[i][0].float() for layer, i in index.items()}
        logits = None
        if needs.logits or needs.top_k:
            logits = self.model.get_output_embeddings()(out.last_hidden_state)[0].float()
        return hidden, logits

    def _step(self, state: StreamState, input_ids: torch.Tensor, position_ids: torch.Tensor,
              signature: tuple[int, tuple[int, ...], bool], needs: Needs
              ) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
        from .llama_step import LlamaStep

        kv: TensorKV = state.kv
        depth, indices, with_logits = signature
        if depth > len(kv.tensors) // 2:
            raise ObserverError("extend() needs deeper layers than the needs given to start()")
        integer_from = getattr(kv, "integer_from", None)
        step = self._steps.get((*signature, integer_from))
        if step is None:
            step = self._steps[(*signature, integer_from)] = LlamaStep(
                self.model, depth, list(indices), with_logits, self.packed, integer_from)
        past, n = kv.length(), input_ids.shape[1]
        mask = torch.ones(1, 1, n, past + n, dtype=torch.bool, device=self.device)
        mask[0, 0, :, past:] = torch.ones(n, n, dtype=torch.bool, device=self.device).tril()
        outs = step(input_ids, position_ids, mask, *kv.tensors[: 2 * depth])
        n_out = len(indices) + (1 if with_logits else 0)
        kv.append(outs[n_out:])
        by_index = {i: outs[k].float() for k, i in enumerate(indices)}
        hidden = {layer: by_index[self.hidden_index(layer)] for layer in needs.layers}
        return hidden, (outs[len(indices)].float() if with_logits else None)


def _batch(hidden: dict[int, torch.Tensor], logits: torch.Tensor | None,
           needs: Needs) -> ObservedBatch:
    """The batch the monitors get, on the CPU (top-k taken first, where the logits are)."""
    top = None
    if logits is not None and needs.top_k:
        top = torch.topk(logits, min(needs.top_k, logits.shape[-1]), dim=-1).values.cpu()
    return ObservedBatch(hidden={layer: h.cpu() for layer, h in hidden.items()},
                         logits=logits.cpu() if logits is not None and needs.logits else None,
                         top_logits=top)


def _without(t: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """``t`` without positions ``start .. start + count`` (sequence axis -2)."""
    return torch.cat([t[..., :start, :], t[..., start + count :, :]], -2)


def _token_id(token: TokenSpan) -> int:
    if token.id is None:
        raise ObserverError("observer got a token without an id: tokenize with observer.tokenizer")
    return token.id


def _is_rotary(config: Any) -> bool:
    return any(getattr(config, attr, None) is not None
               for attr in ("rope_parameters", "rope_theta", "rope_scaling"))


def _empty(needs: Needs, hidden_size: int) -> ObservedBatch:
    hidden = {layer: torch.zeros(0, hidden_size) for layer in needs.layers}
    return ObservedBatch(hidden=hidden)


def _concat(parts: list[ObservedBatch]) -> ObservedBatch:
    hidden = {layer: torch.cat([p.hidden[layer] for p in parts]) for layer in parts[0].hidden}
    logits = torch.cat([p.logits for p in parts]) if parts[0].logits is not None else None
    top = torch.cat([p.top_logits for p in parts]) if parts[0].top_logits is not None else None
    return ObservedBatch(hidden=hidden, logits=logits, top_logits=top)
