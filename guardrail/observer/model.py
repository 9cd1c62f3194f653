"""The torch observer: a Hugging Face causal LM read incrementally with a bounded KV cache."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from ..errors import ObserverError
from ..monitor import Message, Needs
from ..stream import TokenSpan
from . import ObservedBatch
from .tokenization import HFTokenizer
from .window import StreamState, context_budget

__all__ = ["BaseObserver", "TorchKV", "TorchObserver", "render_context"]


def render_context(hf_tokenizer: Any, messages: Sequence[Message]) -> list[int]:
    """Token ids of the conversation through the chat template, ready for the answer."""
    msgs = [dict(m) for m in messages]
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

    def __init__(self, name: str, hf_tokenizer: Any, config: Any, window: int) -> None:
        self.name = name
        self.hf_tokenizer = hf_tokenizer
        self.tokenizer = HFTokenizer(hf_tokenizer)
        self.config = config
        self.num_layers = int(config.num_hidden_layers)
        self.hidden_size = int(config.hidden_size)
        self.window = window
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

    def context_ids(self, messages: Sequence[Message]) -> list[int]:
        ids = render_context(self.hf_tokenizer, messages)
        budget = context_budget(self.window)
        return ids[-budget:] if len(ids) > budget else ids

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


class TorchObserver(BaseObserver):
    """Reads a conversation, then the response chunk by chunk: one forward per chunk."""

    def __init__(self, name: str, model: Any, hf_tokenizer: Any, window: int) -> None:
        super().__init__(name, hf_tokenizer, model.config, window)
        self.model = model.eval()
        self.backend = "torch"
        self.dtype = next(model.parameters()).dtype

    def start(self, messages: Sequence[Message], needs: Needs) -> StreamState:
        from transformers import DynamicCache

        ids = self.context_ids(messages)
        state = StreamState(TorchKV(DynamicCache(config=self.config)), self.window,
                            context_len=len(ids), rotary=self.rotary)
        if ids:
            self._forward(state, ids, range(len(ids)), hidden_states=False)
        return state

    def extend(self, state: StreamState, tokens: Sequence[TokenSpan],
               needs: Needs) -> ObservedBatch:
        ids = [_token_id(t) for t in tokens]
        if not ids:
            return _empty(needs, self.hidden_size)
        index = {layer: self.hidden_index(layer) for layer in needs.layers}
        parts = []
        for chunk in self.chunks(state, ids):
            state.make_room(len(chunk))
            positions = state.positions(len(chunk))
            out = self._forward(state, chunk, positions, hidden_states=bool(index))
            state.seen += len(chunk)
            parts.append(self._batch(out, index, needs))
        return parts[0] if len(parts) == 1 else _concat(parts)

    def truncate(self, state: StreamState, n_tokens: int) -> None:
        state.truncate(n_tokens)

    def _forward(self, state: StreamState, ids: list[int], positions: range, *,
                 hidden_states: bool) -> Any:
        with torch.inference_mode():
            return self.model.base_model(
                input_ids=torch.tensor([ids], dtype=torch.long),
                position_ids=torch.tensor([list(positions)], dtype=torch.long),
                past_key_values=state.kv.cache,
                use_cache=True,
                output_hidden_states=hidden_states,
            )

    def _batch(self, out: Any, index: dict[int, int], needs: Needs) -> ObservedBatch:
        hidden = {layer: out.hidden_states[i][0].float() for layer, i in index.items()}
        logits = top = None
        if needs.logits or needs.top_k:
            with torch.inference_mode():
                full = self.model.get_output_embeddings()(out.last_hidden_state)[0].float()
            if needs.logits:
                logits = full
            if needs.top_k:
                top = torch.topk(full, min(needs.top_k, full.shape[-1]), dim=-1).values
        return ObservedBatch(hidden=hidden, logits=logits, top_logits=top)


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
