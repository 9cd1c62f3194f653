"""``ObserverShard``: one observer replica, holding the model and the KV cache of every stream
pinned to it.

Each shard is its own Serve deployment with one replica (``observer-0``, ``observer-1`` ...), so
a stream's reads reach the replica that read its conversation: the ingress keeps the shard's
handle per stream. (Serve's model multiplexing routes by id only as a preference: when the
replica holding an id is busy it falls back to another after about a second, which would read a
stream against a cache that is not there.) A replica that is restarted comes back with a new
``incarnation`` and no streams: a read of a stream started on the old one gets a ``lost``
reply, never another stream's cache or a fresh one.

Reads of all streams go through ``@serve.batch``; one thread owns the model and runs each batch.
A read that fails is that stream's failure alone: the batch returns it as its reply.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import serve

from guardrail import Needs
from guardrail.errors import ObserverError
from guardrail.plugins import PluginHost, get_host
from guardrail.policy import ObserverSpec
from guardrail.stream import TokenSpan

__all__ = ["ObserverShard", "Reply", "load_observer"]

log = logging.getLogger("guardrail.server.ray")


@dataclass
class Reply:
    """A shard's answer: ``value`` when ``error`` is None; ``lost`` when the stream is not on
    this replica (it was restarted, or the stream was dropped idle) or the replica did not
    answer; ``full`` when a new stream was refused for room."""

    value: Any = None
    error: str | None = None
    lost: bool = False
    full: bool = False


@dataclass
class _Stream:
    state: Any
    used: float


def load_observer(spec: ObserverSpec, host: PluginHost) -> Any:
    """The policy's observer, found as ``Guard`` finds it: a registered name, else a local model
    directory read by the ``hf`` observer."""
    observers = host.observers()
    if spec.model in observers:
        return observers[spec.model].factory(spec)
    if "hf" in observers and Path(spec.model).expanduser().exists():
        options = {**spec.options, "path": spec.model}
        return observers["hf"].factory(spec.model_copy(update={"options": options}))
    raise ObserverError(f"observer {spec.model!r} is neither a registered observer nor a local "
                        "model path; fix observer.model in the policy")


class ObserverShard:
    """The observer deployment's class (one replica per shard)."""

    def __init__(self, spec: dict[str, Any], settings: dict[str, Any],
                 host_factory: Callable[[], PluginHost] | None = None) -> None:
        host = host_factory() if host_factory is not None else get_host()
        self.observer = load_observer(ObserverSpec.model_validate(spec), host)
        self.incarnation = uuid.uuid4().hex[:12]
        self.max_streams = int(settings.get("max_streams", 256))
        self.idle_timeout = float(settings.get("idle_timeout_s", 600.0))
        self.streams: dict[str, _Stream] = {}
        # One thread owns the model: batches and conversation reads run there, one at a time.
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="guardrail-observer")
        self.batches = 0
        self.reads = 0
        self.tokens = 0
        self.largest_batch = 0
        batched: Any = self._read_batch  # serve.batch's wrapper takes the deploy settings
        batched.set_max_batch_size(int(settings.get("max_batch_size", 16)))
        batched.set_batch_wait_timeout_s(float(settings.get("batch_wait_ms", 2.0)) / 1000)

    async def _in_model_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def describe(self) -> dict[str, Any]:
        """What the ingress needs to tokenize and check monitors without the model."""
        observer = self.observer
        return {"name": observer.name, "num_layers": int(observer.num_layers),
                "hidden_size": int(observer.hidden_size),
                "tokenizer": observer.tokenizer,
                "hf_tokenizer": getattr(observer, "hf_tokenizer", None),
                "pools_context": bool(getattr(observer, "pools_context", False))}

    def stats(self) -> dict[str, Any]:
        import ray

        return {"incarnation": self.incarnation, "streams": len(self.streams),
                "reads": self.reads, "tokens": self.tokens, "batches": self.batches,
                "largest_batch": self.largest_batch,
                "actor_name": (ray.get_runtime_context().get_actor_name()
                               if ray.is_initialized() else None)}

    async def open(self, stream_id: str, messages: list[Any], needs: Needs) -> Reply:
        """Read the conversation of a new stream; the reply's value is this incarnation."""
        self._drop_idle()
        if len(self.streams) >= self.max_streams:
            return Reply(error=f"observer replica full ({self.max_streams} live streams)",
                         full=True)
        try:
            state = await self._in_model_thread(self.observer.start, messages, needs)
        except Exception as exc:  # noqa: BLE001 - the stream's failure, reported to it
            return Reply(error=f"{type(exc).__name__}: {exc}")
        self.streams[stream_id] = _Stream(state, time.monotonic())
        return Reply(self.incarnation)

    async def read(self, stream_id: str, incarnation: str, tokens: Sequence[TokenSpan],
                   needs: Needs) -> Reply:
        """One stream's pending tokens, read in a batch with other streams' reads."""
        if incarnation != self.incarnation or stream_id not in self.streams:
            return self._lost(stream_id, incarnation)
        reply: Reply = await self._read_batch((stream_id, tokens, needs))
        return reply

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _read_batch(self, reads: list[tuple[str, Sequence[TokenSpan], Needs]]
                          ) -> list[Reply]:
        replies: list[Reply] = await self._in_model_thread(self._read_all, reads)
        return replies

    def _read_all(self, reads: list[tuple[str, Sequence[TokenSpan], Needs]]) -> list[Reply]:
        # Streams of a batch are read one after another by the owning thread; an observer with a
        # ragged batched forward can take the whole list here.
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(reads))
        replies = []
        now = time.monotonic()
        for stream_id, tokens, needs in reads:
            stream = self.streams.get(stream_id)
            if stream is None:  # closed while its read waited
                replies.append(Reply(error="stream closed", lost=True))
                continue
            stream.used = now
            try:
                replies.append(Reply(self.observer.extend(stream.state, tokens, needs)))
                self.reads += 1
                self.tokens += len(tokens)
            except Exception as exc:  # noqa: BLE001 - fails this stream, not the batch
                replies.append(Reply(error=f"{type(exc).__name__}: {exc}"))
        return replies

    async def truncate(self, stream_id: str, incarnation: str, n_tokens: int) -> Reply:
        if incarnation != self.incarnation or stream_id not in self.streams:
            return self._lost(stream_id, incarnation)
        state = self.streams[stream_id].state
        try:
            await self._in_model_thread(self.observer.truncate, state, n_tokens)
        except Exception as exc:  # noqa: BLE001
            return Reply(error=f"{type(exc).__name__}: {exc}")
        return Reply()

    def close(self, stream_id: str) -> None:
        """Free the stream's KV cache (the ingress calls this when the session ends)."""
        self.streams.pop(stream_id, None)

    def _lost(self, stream_id: str, incarnation: str) -> Reply:
        why = ("this observer replica was restarted and lost its KV cache"
               if incarnation != self.incarnation else
               "the stream is not on this observer replica (closed, or dropped idle)")
        return Reply(error=why, lost=True)

    def _drop_idle(self) -> None:
        cutoff = time.monotonic() - self.idle_timeout
        for stream_id in [s for s, st in self.streams.items() if st.used < cutoff]:
            log.warning("dropping stream %s: unread for %.0f s", stream_id, self.idle_timeout)
            del self.streams[stream_id]

