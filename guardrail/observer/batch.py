"""One batched observer per Guard: the pending reads of all live streams go through one forward.

A ``BatchedObserver`` wraps a backend observer (``TorchObserver``, ``OnnxObserver``) and owns it
from one scheduler thread. Sessions submit reads and wait on a ``concurrent.futures.Future``
(``extend`` blocks on it; async drivers ``await asyncio.wrap_future(submit(...))``). The scheduler
runs a batch as soon as it is idle, gathering whatever is pending: a lone stream waits for nothing
but its own forward, and streams whose reads come due while a forward runs share the next one.

Llama-family torch models (SmolLM2) run the batch as one forward: each stream keeps its own KV
cache; the caches, of ragged lengths, are left-padded into one tensor per block, the new tokens
right-padded, and an attention mask hides the padding while explicit position ids give every row
the positions it has alone. The outputs are split back per stream, so a stream's rows match its
unbatched read within float noise. Other models and the ONNX backend read stream by stream in the
scheduler thread (their exported graphs and HF cache objects take one stream at a time).

A read that fails fails only its stream: a failure before the forward (a token without an id, a
deeper layer than the stream started with) is that stream's alone; a batched forward that raises
is rerun stream by stream, so only the stream that breaks it gets the error. ``release`` frees a
closed stream's cache at once.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ..errors import ObserverError
from ..monitor import Message, Needs
from ..stream import TokenSpan
from . import ObservedBatch

__all__ = ["BatchStats", "BatchedObserver"]

IDLE_EXIT_S = 30.0  # the scheduler thread ends after this long without work (restarts on demand)
PAD_RATIO = 2.0  # a forward pads its new tokens to at most this many times the real ones


class _Stream:
    """A stream's handle: the backend state once its context is read, and its fate."""

    def __init__(self, messages: Sequence[Message], needs: Needs) -> None:
        self.messages = list(messages)
        self.needs = needs
        self.state: Any = None  # the backend's StreamState
        self.error: BaseException | None = None  # a failed context read fails every later read
        self.released = False

    def __repr__(self) -> str:
        return f"<observer stream released={self.released} error={self.error!r}>"


@dataclass
class _Job:
    stream: _Stream
    ids: list[int] | None  # None: open the stream (read its context)
    needs: Needs
    future: Future[Any] = field(default_factory=Future)
    parts: list[ObservedBatch] = field(default_factory=list)


@dataclass
class BatchStats:
    """What the scheduler did: forwards run and the streams they carried."""

    forwards: int = 0  # model forwards (a batched forward counts once)
    reads: int = 0  # stream reads served (context reads included)
    largest: int = 0  # most streams in one forward
    split: int = 0  # batched forwards that failed and were rerun stream by stream
    sizes: dict[int, int] = field(default_factory=dict)  # streams per forward -> forwards


class BatchedObserver:
    """The Guard's observer: the backend's interface, with every forward run by one scheduler
    thread that batches the reads pending across streams."""

    batchable = False  # already batched: a Guard given this observer shares its scheduler

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name: str = inner.name
        self.tokenizer = inner.tokenizer
        self.num_layers: int = inner.num_layers
        self.hidden_size: int = inner.hidden_size
        self.stats = BatchStats()
        self._cond = threading.Condition()
        self._queue: list[_Job] = []
        self._hold = 0
        self._thread: threading.Thread | None = None
        self._live: weakref.WeakValueDictionary[int, _Stream] = weakref.WeakValueDictionary()
        self._batched = (getattr(inner, "backend", None) == "torch"
                         and bool(getattr(inner, "fast", False)))

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        return f"BatchedObserver({self.inner!r})"

    # -- Observer protocol -----------------------------------------------------------------

    def start(self, messages: Sequence[Message], needs: Needs) -> _Stream:
        """A new stream; its conversation is read by the scheduler before its first read (no
        wait here)."""
        stream = _Stream(messages, needs)
        self._live[id(stream)] = stream
        self._enqueue(_Job(stream, None, needs))
        return stream

    def submit(self, stream: _Stream, tokens: Sequence[TokenSpan],
               needs: Needs) -> Future[ObservedBatch]:
        """Queue a read of ``tokens``; the future gets its ``ObservedBatch`` or its error."""
        job = _Job(stream, [], needs)
        try:
            if stream.released:
                raise ObserverError("read of an observer stream that was released (closed)")
            job.ids = [_token_id(t) for t in tokens]
        except Exception as exc:  # noqa: BLE001 - this stream's bad input is its error alone
            job.future.set_exception(exc)
            return job.future
        self._enqueue(job)
        return job.future

    def extend(self, stream: _Stream, tokens: Sequence[TokenSpan], needs: Needs) -> ObservedBatch:
        result: ObservedBatch = self.submit(stream, tokens, needs).result()
        return result

    def truncate(self, stream: _Stream, n_tokens: int) -> None:
        """Called between reads (a session has at most one in flight), so no forward holds it."""
        self._wait_open(stream)
        with self._cond:
            if stream.state is not None and not stream.released:
                self.inner.truncate(stream.state, n_tokens)

    def release(self, stream: _Stream) -> None:
        """Free the stream's KV cache now (its session closed); later reads fail."""
        with self._cond:
            stream.released = True
            stream.state = None
            self._live.pop(id(stream), None)

    # -- inspection and control -----------------------------------------------------------

    def live_streams(self) -> int:
        """Streams started and not released (nor garbage collected)."""
        return len(self._live)

    def cached_tokens(self) -> int:
        """Positions held in the KV caches of live streams."""
        with self._cond:
            states = [s.state for s in list(self._live.values()) if s.state is not None]
            return sum(int(state.kv.length()) for state in states)

    def pending(self) -> int:
        """Reads queued and not yet taken by the scheduler."""
        with self._cond:
            return len(self._queue)

    @contextmanager
    def hold(self) -> Iterator[None]:
        """No batch starts inside the block; reads queued meanwhile go in the next one."""
        with self._cond:
            self._hold += 1
        try:
            yield
        finally:
            with self._cond:
                self._hold -= 1
                self._cond.notify_all()

    # -- the scheduler ---------------------------------------------------------------------

    def _enqueue(self, job: _Job) -> None:
        with self._cond:
            self._queue.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, daemon=True,
                                                name=f"guardrail-observer-{self.name}")
                self._thread.start()
            self._cond.notify_all()

    def _wait_open(self, stream: _Stream) -> None:
        """Wait until the stream's context read is done (queued reads run in order)."""
        if stream.state is None and stream.error is None and not stream.released:
            done: Future[Any] = Future()
            with self._cond:
                if any(job.stream is stream for job in self._queue):
                    marker = _Job(stream, [], stream.needs, done)
                    self._queue.append(marker)
                    self._cond.notify_all()
                else:
                    done.set_result(None)
            try:
                done.result()
            except Exception:  # noqa: BLE001 - the stream's error shows on its next read
                pass

    def _loop(self) -> None:
        threads = getattr(self.inner, "threads", None)
        if threads and getattr(self.inner, "backend", None) == "torch":
            import torch

            torch.set_num_threads(int(threads))  # intra-op; process-wide in torch
        while True:
            with self._cond:
                while not self._queue or self._hold:
                    if not self._cond.wait(timeout=IDLE_EXIT_S) and not self._queue:
                        self._thread = None
                        return
                jobs, self._queue = self._queue, []
            try:
                self._run(jobs)
            except BaseException as exc:  # no stream may hang on a scheduler bug
                for job in jobs:
                    if not job.future.done():
                        _fail(job.future, exc)
                if not isinstance(exc, Exception):
                    raise

    def _run(self, jobs: list[_Job]) -> None:
        """Jobs in waves: the first pending job of each stream, then the second, ... so each
        stream's reads stay in order (a stream's context is read before its first tokens)."""
        waves: list[list[_Job]] = []
        depth: dict[int, int] = {}
        for job in jobs:
            k = depth.get(id(job.stream), 0)
            depth[id(job.stream)] = k + 1
            if k == len(waves):
                waves.append([])
            waves[k].append(job)
        for wave in waves:
            ready = [job for job in wave if self._admit(job)]
            if self._batched:
                self._run_batched(ready)
            else:
                for job in ready:
                    self._run_one(job)

    def _admit(self, job: _Job) -> bool:
        """Whether the job needs a forward; settle it here when it does not."""
        stream = job.stream
        if stream.released:
            _fail(job.future, ObserverError("the observer stream was released (closed)"))
            return False
        if stream.error is not None and job.ids is not None:
            _fail(job.future, stream.error)
            return False
        if job.ids is not None and not job.ids:  # nothing to read (or a marker)
            _resolve(job.future, _empty(job.needs, self.hidden_size))
            return False
        return True

    def _settle(self, job: _Job, exc: BaseException | None = None) -> None:
        self.stats.reads += 1
        if exc is not None:
            if job.ids is None:
                job.stream.error = exc
            _fail(job.future, exc)
        elif job.ids is None:
            _resolve(job.future, None)
        elif not job.parts:  # released while its forward ran
            _fail(job.future, ObserverError("the observer stream was released (closed)"))
        else:
            _resolve(job.future, job.parts[0] if len(job.parts) == 1 else _concat(job.parts))

    def _count(self, n: int) -> None:
        self.stats.forwards += 1
        self.stats.largest = max(self.stats.largest, n)
        self.stats.sizes[n] = self.stats.sizes.get(n, 0) + 1

    # -- one stream at a time (ONNX, non-Llama torch models) --------------------------------

    def _run_one(self, job: _Job) -> None:
        stream = job.stream
        try:
            self._count(1)
            if job.ids is None:
                state = self.inner.start(stream.messages, stream.needs)
                with self._cond:
                    if not stream.released:
                        stream.state = state
            else:
                job.parts.append(self.inner.extend(stream.state, _spans(job.ids), job.needs))
        except Exception as exc:  # noqa: BLE001 - this stream's failure is its own
            self._settle(job, exc)
            return
        self._settle(job)

    # -- several streams in one forward (Llama-family torch) -------------------------------

    def _run_batched(self, jobs: list[_Job]) -> None:
        """Open the new streams, then read in rounds (a read longer than the window's room is
        split, as unbatched), grouping rows of one signature and similar lengths."""
        inner = self.inner
        live: list[tuple[_Job, list[int]]] = []
        for job in jobs:
            try:
                if job.ids is None:
                    state, ids = inner.open(job.stream.messages, job.stream.needs)
                    with self._cond:
                        if job.stream.released:
                            raise ObserverError("the observer stream was released (closed)")
                        job.stream.state = state
                    if not ids:
                        self._settle(job)
                        continue
                    live.append((job, ids))
                else:
                    if inner.signature(job.needs)[0] > len(job.stream.state.kv.tensors) // 2:
                        raise ObserverError(
                            "extend() needs deeper layers than the needs given to start()")
                    live.append((job, job.ids))
            except Exception as exc:  # noqa: BLE001
                self._settle(job, exc)
        while live:
            rows: list[_Row] = []
            rest: list[tuple[_Job, list[int]]] = []
            for job, ids in live:
                state = job.stream.state
                room = ids if job.ids is None else next(iter(inner.chunks(state, ids)))
                rows.append(_Row(job, room))
                if len(room) < len(ids):
                    rest.append((job, ids[len(room):]))
            for group in self._groups(rows):
                self._forward_group(group)
            live = [(job, ids) for job, ids in rest if not job.future.done()]
        for job in jobs:
            if not job.future.done():
                self._settle(job)

    def _groups(self, rows: list[_Row]) -> Iterator[list[_Row]]:
        by_signature: dict[tuple[int, tuple[int, ...], bool], list[_Row]] = {}
        for row in rows:
            by_signature.setdefault(self._signature(row.job), []).append(row)
        for group in by_signature.values():
            group.sort(key=lambda r: len(r.ids))
            bucket: list[_Row] = []
            real = 0
            for row in group:
                n = len(row.ids)
                if bucket and n * (len(bucket) + 1) > PAD_RATIO * (real + n):
                    yield bucket
                    bucket, real = [], 0
                bucket.append(row)
                real += n
            if bucket:
                yield bucket

    def _signature(self, job: _Job) -> tuple[int, tuple[int, ...], bool]:
        if job.ids is None:  # a context read: as deep as the stream will read, no outputs
            return (self.inner.signature(job.stream.needs)[0], (), False)
        signature: tuple[int, tuple[int, ...], bool] = self.inner.signature(job.needs)
        return signature

    def _forward_group(self, rows: list[_Row]) -> None:
        rows = [row for row in rows if not row.job.future.done()]
        if not rows:
            return
        try:
            outs = self._forward(rows)
        except Exception as exc:  # noqa: BLE001 - find the stream that broke it
            if len(rows) == 1:
                self._settle(rows[0].job, exc)
                return
            self.stats.split += 1
            for row in rows:  # each alone: only the stream that breaks its forward fails
                self._forward_group([row])
            return
        self._count(len(rows))
        for b, row in enumerate(rows):
            try:
                self._take(row, b, outs)
            except Exception as exc:  # noqa: BLE001
                self._settle(row.job, exc)

    def _forward(self, rows: list[_Row]) -> Any:
        """One forward over the rows' tokens; the caches are not touched until ``_take``."""
        import torch

        inner = self.inner
        depth, indices, with_logits = self._signature(rows[0].job)
        states = [row.job.stream.state for row in rows]
        for row, state in zip(rows, states, strict=True):
            if row.job.ids is not None:
                state.make_room(len(row.ids))  # drops old tokens only: safe to redo on a rerun
        pasts = [state.kv.length() for state in states]
        news = [len(row.ids) for row in rows]
        width, past = max(news), max(pasts)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        positions = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), 1, width, past + width, dtype=torch.bool)
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        for b, (row, state) in enumerate(zip(rows, states, strict=True)):
            n = news[b]
            ids[b, :n] = torch.tensor(row.ids, dtype=torch.long)
            # a context read starts after the shared prefix its cache may already hold
            first = pasts[b] if row.job.ids is None else state.positions(n).start
            positions[b] = torch.arange(first, first + width)  # padding rows: any position
            mask[b, 0, :, past - pasts[b]:past] = True
            mask[b, 0, :, past:past + n] = causal[:, :n]  # padding rows see the real tokens

        def past_of(k: int) -> Any:  # one block's padded cache at a time: peak memory stays low
            return _stack([state.kv.tensors[k] for state in states], pasts, past)

        device = inner.device
        with torch.inference_mode():
            return _step(inner.model, depth, indices, with_logits, ids.to(device),
                         positions.to(device), mask.to(device), past_of,
                         getattr(inner, "packed", None))

    def _take(self, row: _Row, b: int, outs: Any) -> None:
        """Row ``b`` of a forward: its new keys and values into its cache, its outputs."""
        from .model import _batch

        job, n = row.job, len(row.ids)
        _, indices, with_logits = self._signature(job)
        n_out = len(indices) + (1 if with_logits else 0)
        state = job.stream.state
        with self._cond:
            if job.stream.released:
                return
            state.kv.append([t[b:b + 1, :, :n] for t in outs[n_out:]])
        if job.ids is None:
            self.inner.context_read(state)
            return
        state.seen += n
        by_index = {i: outs[k][b, :n].float() for k, i in enumerate(indices)}
        hidden = {layer: by_index[self.inner.hidden_index(layer)] for layer in job.needs.layers}
        logits = outs[len(indices)][b, :n].float() if with_logits else None
        job.parts.append(_batch(hidden, logits, job.needs))


def _step(model: Any, depth: int, indices: tuple[int, ...], with_logits: bool, ids: Any,
          positions: Any, mask: Any, past_of: Any, packed: Any = None) -> tuple[Any, ...]:
    """``LlamaStep``'s forward with a batch axis kept, each block's cache built when it runs
    (on the observer's packed projections when it has them)."""
    from .llama_step import _block

    base = model.base_model
    h = base.embed_tokens(ids)
    rope = base.rotary_emb(h, position_ids=positions)
    states = [h]
    new_kv: list[Any] = []
    for i in range(depth):
        h = _block(base.layers[i], h, rope, mask, past_of(2 * i), past_of(2 * i + 1), new_kv,
                   packed, i)
        states.append(h)
    if depth == model.config.num_hidden_layers:
        states[-1] = base.norm(h)  # HF convention: the last hidden state is normed
    outs = [states[i] for i in indices]
    if with_logits:
        head = packed.head if packed is not None else None
        outs.append((head or model.get_output_embeddings())(states[-1]))
    return (*outs, *new_kv)


@dataclass
class _Row:
    """One stream's tokens in one forward."""

    job: _Job
    ids: list[int]


def _stack(tensors: list[Any], lengths: list[int], width: int) -> Any:
    """Per-stream caches ``(1, heads, length_b, dim)`` as one ``(B, heads, width, dim)``, each
    right-aligned (left padding: the new tokens follow every stream's own cache directly)."""
    import torch

    if len(tensors) == 1:
        return tensors[0]
    if all(n == width for n in lengths):
        return torch.cat(tensors)
    first = tensors[0]
    out = first.new_zeros(len(tensors), first.shape[1], width, first.shape[3])
    for b, (t, n) in enumerate(zip(tensors, lengths, strict=True)):
        if n:
            out[b, :, width - n:] = t[0]
    return out


def _resolve(future: Future[Any], result: Any) -> None:
    """Set a result unless the reader gave up on it (an awaiting task cancelled the future)."""
    if future.set_running_or_notify_cancel():
        future.set_result(result)


def _fail(future: Future[Any], exc: BaseException) -> None:
    if future.set_running_or_notify_cancel():
        future.set_exception(exc)


def _token_id(token: TokenSpan) -> int:
    if token.id is None:
        raise ObserverError("observer got a token without an id: tokenize with observer.tokenizer")
    return int(token.id)


def _spans(ids: list[int]) -> list[TokenSpan]:
    return [TokenSpan(0, 0, i) for i in ids]


def _empty(needs: Needs, hidden_size: int) -> ObservedBatch:
    from .model import _empty as empty

    return empty(needs, hidden_size)


def _concat(parts: list[ObservedBatch]) -> ObservedBatch:
    from .model import _concat as concat

    return concat(parts)
