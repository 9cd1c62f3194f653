"""``RemoteObserver``: the ``Observer`` protocol over the observer shards, for the sessions of an
ingress replica.

``start`` pins the new stream to the shard with the fewest streams this replica has open there and
reads the conversation on it; ``extend`` and ``truncate`` go to that shard only. Tokenizing stays
here (the shard sends its tokenizer once), so only token ids travel. Sessions call in from the
proxy's guard threads and wait on the reply; the event loop never blocks.

A shard that dies, restarts or answers too late fails the read with an ``ObserverError`` naming
the stream and the shard; the session turns that into the monitors' ``on_error`` (the default
``fail_closed`` ends the stream with an error event and a halt, releasing nothing unread).
A session that closes or aborts calls ``release``, which frees its KV cache on the shard.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from guardrail import Needs
from guardrail.errors import ObserverError
from guardrail.observer import ObservedBatch
from guardrail.stream import TokenSpan

from ._shard import Reply

__all__ = ["RemoteObserver", "RemoteStream"]

log = logging.getLogger("guardrail.server.ray")


@dataclass
class RemoteStream:
    """A session's observer state: where its KV cache lives."""

    stream_id: str
    shard: int
    incarnation: str
    closed: bool = False


class RemoteObserver:
    """An observer whose model and KV caches live on the observer shards."""

    def __init__(self, shards: Sequence[Any], described: dict[str, Any], *,
                 timeout_s: float = 60.0) -> None:
        if not shards:
            raise ObserverError("RemoteObserver needs at least one observer shard")
        self.shards = list(shards)
        self.name: str = described["name"]
        self.num_layers = int(described["num_layers"])
        self.hidden_size = int(described["hidden_size"])
        self.tokenizer = described["tokenizer"]
        self.hf_tokenizer = described.get("hf_tokenizer")
        # The shards' observer pools the context (Needs.context) into the state its start keeps
        # and hands it over with the stream's first read, which comes back here whole.
        self.pools_context = bool(described.get("pools_context", False))
        self.timeout_s = timeout_s
        self._open = [0] * len(self.shards)  # streams this replica has open per shard
        self._next = 0
        self._lock = threading.Lock()

    # -- the Observer protocol --------------------------------------------------------------

    def start(self, messages: Sequence[Any], needs: Needs) -> RemoteStream:
        stream_id = uuid.uuid4().hex
        refusals = []
        for shard in self._by_load():
            reply = self._call(shard, stream_id, "open", stream_id, list(messages), needs)
            if reply.error is None:
                with self._lock:
                    self._open[shard] += 1
                return RemoteStream(stream_id, shard, str(reply.value))
            refusals.append(f"observer-{shard}: {reply.error}")
            if not (reply.full or reply.lost):
                break  # the conversation itself failed: another shard would fail it too
        raise ObserverError("could not start the stream on an observer replica: "
                            + "; ".join(refusals))

    def extend(self, state: RemoteStream, tokens: Sequence[TokenSpan],
               needs: Needs) -> ObservedBatch:
        reply = self._call(state.shard, state.stream_id, "read", state.stream_id,
                           state.incarnation, list(tokens), needs)
        self._raise(state, reply)
        batch: ObservedBatch = reply.value
        return batch

    def truncate(self, state: RemoteStream, n_tokens: int) -> None:
        reply = self._call(state.shard, state.stream_id, "truncate", state.stream_id,
                           state.incarnation, n_tokens)
        self._raise(state, reply)

    def close(self, state: RemoteStream) -> None:
        """Free the stream's KV cache on its shard (without waiting: it may run on the loop)."""
        if state.closed:
            return
        state.closed = True
        with self._lock:
            self._open[state.shard] = max(0, self._open[state.shard] - 1)
        try:
            self.shards[state.shard].close.remote(state.stream_id)
        except Exception as exc:  # noqa: BLE001 - a lost shard has freed it already
            log.warning("could not free stream %s on observer-%d: %s", state.stream_id,
                        state.shard, type(exc).__name__)

    def release(self, state: RemoteStream) -> None:
        """The session's end (closed or aborted): the stream's cache goes at once."""
        self.close(state)

    # -- internals ------------------------------------------------------------------------

    def _by_load(self) -> list[int]:
        with self._lock:
            start = self._next
            self._next = (self._next + 1) % len(self.shards)
            order = sorted(range(len(self.shards)),
                           key=lambda i: (self._open[i], (i - start) % len(self.shards)))
        return order

    def _call(self, shard: int, stream_id: str, method: str, *args: Any) -> Reply:
        try:
            response = getattr(self.shards[shard], method).remote(*args)
            reply: Reply = response.result(timeout_s=self.timeout_s)
            return reply
        except Exception as exc:  # noqa: BLE001 - a dead actor, an unavailable deployment
            if isinstance(exc, TimeoutError) or "Timeout" in type(exc).__name__:
                return Reply(error=f"no answer within {self.timeout_s:g} s", lost=True)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            log.warning("observer-%d failed stream %s: %s: %s", shard, stream_id,
                        type(exc).__name__, first[:200])
            return Reply(error=f"{type(exc).__name__}", lost=True)

    @staticmethod
    def _raise(state: RemoteStream, reply: Reply) -> None:
        if reply.error is None:
            return
        if reply.lost:
            raise ObserverError(f"observer replica observer-{state.shard} lost stream "
                                f"{state.stream_id[:12]}: {reply.error}")
        raise ObserverError(f"observer-{state.shard}: {reply.error}")
