"""One batched observer per Guard: the pending reads of all live streams go through one forward.

A ``BatchedObserver`` wraps a backend observer (``TorchObserver``, ``OnnxObserver``) and owns it
from one scheduler thread. Sessions submit reads and wait on a ``concurrent.futures.Future``
(``extend`` blocks on it; async drivers ``await asyncio.wrap_future(submit(...))``). The scheduler
runs a batch as soon as it is idle, gathering whatever is pending: a lone stream waits for nothing
but its own forward, and streams whose reads come due while a forward runs share the next one.

Llama-family torch models (SmolLM2) run the batch as one forward: the streams' new tokens are
packed into one sequence (no padding) for the projections, the MLP and the head, with explicit
position ids giving every token the position it has in its own stream; attention runs stream by
stream over that stream's own KV cache, read in place, with its unbatched read's mask. The
outputs are split back per stream, so a stream's rows match its unbatched read within float noise
(the products' summation order depends on their row count). Other models and the ONNX backend
read stream by stream in the scheduler thread (their exported graphs and HF cache objects take
one stream at a time). Off the CPU (the observer's ``padded`` flag) the streams' caches share a
pool and attention runs for all of them in one padded call (``padded``): on a GPU the per-stream
kernels above leave it idle.

Forward workers (``observer.options.workers``): a batch large enough is spread, streams whole,
over several forwards run at once, the scheduler running one and worker threads the others, each
on the observer's ``threads`` intra-op threads. They share no barrier inside the forward (as
intra-op threads do on every operation), so a worker that waits for a busy core delays only its
part. ``auto`` spreads only while the parts get the cores to run at once (``SHARE_MIN``).

A read that fails fails only its stream: a failure before the forward (a token without an id, on a
GPU an id outside the vocabulary, a deeper layer than the stream started with) is that stream's
alone; a batched forward that raises is rerun stream by stream, so only the stream that breaks it
gets the error. ``release`` frees a closed stream's cache at once.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ..errors import ObserverError
from ..monitor import Message, Needs
from ..stream import TokenSpan
from . import ObservedBatch

__all__ = ["BatchStats", "BatchedObserver", "default_gather_ms", "resolve_gather",
           "resolve_workers"]

IDLE_EXIT_S = 30.0  # the scheduler thread ends after this long without work (restarts on demand)
# Schedulers whose thread was started; each is stopped and joined at interpreter exit.
_SCHEDULERS: weakref.WeakSet[Any] = weakref.WeakSet()
EXIT_JOIN_S = 5.0  # at exit, how long to wait for a scheduler's reads in flight


@atexit.register
def _close_schedulers() -> None:
    for scheduler in list(_SCHEDULERS):
        scheduler._close(EXIT_JOIN_S)
MAX_ROWS = 2048  # tokens in one forward at most (more go in the next): bounds its memory
# A batch is spread over the forward workers only in parts of at least this many tokens: a
# forward's fixed cost (streaming every weight from memory: about 60 ms of CPU for SmolLM2 here,
# against about 4 ms a token) is paid once per part (docs/observer.md, "Forward workers").
MIN_PART_TOKENS = 16
# ``workers: auto`` spreads a batch only while spreading gets the cores it needs: the parts' CPU
# time over (wall time x parts) of recent spread batches at least SHARE_MIN (on a machine whose
# cores are busy with other work the parts take turns on one core, and spreading only adds the
# parts' fixed costs); below it, one spread batch every PROBE_S seconds measures again.
SHARE_MIN = 0.7
PROBE_S = 5.0
# With ``gather_ms``, a batch waits for streams that read within this long and have no read
# queued: such a stream is streaming, and its next read comes due soon.
RECENT_S = 1.0
DEFAULT_GATHER_MS = 50.0  # at most this long by default (default_gather_ms)


class _Stream:
    """A stream's handle: the backend state once its context is read, and its fate."""

    def __init__(self, messages: Sequence[Message], needs: Needs) -> None:
        self.messages = list(messages)
        self.needs = needs
        self.state: Any = None  # the backend's StreamState
        self.error: BaseException | None = None  # a failed context read fails every later read
        self.released = False
        self.read_at = 0.0  # when its last read was settled (time.monotonic())

    def __repr__(self) -> str:
        return f"<observer stream released={self.released} error={self.error!r}>"


@dataclass
class _Job:
    stream: _Stream
    ids: list[int] | None  # None: open the stream (read its context)
    needs: Needs
    future: Future[Any] = field(default_factory=Future)
    parts: list[ObservedBatch] = field(default_factory=list)
    urgent: bool = False  # a reader waits on it alone (a stream's last read): never gathered


@dataclass
class BatchStats:
    """What the scheduler did: forwards run and the streams they carried."""

    forwards: int = 0  # model forwards (a batched forward counts once)
    reads: int = 0  # stream reads served (context reads included)
    largest: int = 0  # most streams in one forward
    split: int = 0  # batched forwards that failed and were rerun stream by stream
    spread: int = 0  # batches run as several forwards at once, on the forward workers
    padded: int = 0  # forwards run on the accelerators' padded path (guardrail.observer.padded)
    sizes: dict[int, int] = field(default_factory=dict)  # streams per forward -> forwards


class BatchedObserver:
    """The Guard's observer: the backend's interface, with every forward run by one scheduler
    thread that batches the reads pending across streams."""

    batchable = False  # already batched: a Guard given this observer shares its scheduler

    def __init__(self, inner: Any, workers: int | str | None = None,
                 gather_ms: float | None = None) -> None:
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
        self._closing = False  # set at interpreter exit: the scheduler ends once its queue is empty
        self._live: weakref.WeakValueDictionary[int, _Stream] = weakref.WeakValueDictionary()
        self._batched = (getattr(inner, "backend", None) == "torch"
                         and bool(getattr(inner, "fast", False)))
        allowed = resolve_workers(inner, workers)  # checked for every backend
        self.workers = allowed if self._batched else 1  # one stream at a time: nothing to spread
        if getattr(inner, "padded", False):  # its forward writes the shared pool: one at a time
            self.workers = 1
        gather = resolve_gather(inner, gather_ms) / 1000
        self.gather_s = gather if self._batched else 0.0  # nothing to share a forward with
        self._gather_until: float | None = None  # when the batch being gathered stops waiting
        self.adaptive = workers is None or workers == "auto"  # spread only while it pays
        self.share = 1.0  # moving average of the CPU share of spread batches (see SHARE_MIN)
        self._probed = 0.0  # when the last spread batch ran (time.monotonic())
        self._pool: ThreadPoolExecutor | None = None
        self._stats_lock = threading.Lock()

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

    def submit(self, stream: _Stream, tokens: Sequence[TokenSpan], needs: Needs,
               urgent: bool = False) -> Future[ObservedBatch]:
        """Queue a read of ``tokens``; the future gets its ``ObservedBatch`` or its error.
        ``urgent``: the batch it joins runs without gathering (a stream's last read: its reader
        waits for nothing else)."""
        job = _Job(stream, [], needs, urgent=urgent)
        try:
            if stream.released:
                raise ObserverError("read of an observer stream that was released (closed)")
            job.ids = [_token_id(t) for t in tokens]
            check = getattr(self.inner, "check_ids", None)
            if check is not None:  # on a GPU a bad id would break the forward for every stream
                check(job.ids)
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
                _SCHEDULERS.add(self)
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

    def _set_threads(self) -> None:
        threads = getattr(self.inner, "threads", None)
        if threads and getattr(self.inner, "backend", None) == "torch":
            import torch

            torch.set_num_threads(int(threads))  # intra-op; process-wide in torch

    def _loop(self) -> None:
        self._set_threads()
        while True:
            with self._cond:
                while True:
                    wait = IDLE_EXIT_S if not self._queue or self._hold else self._gather_wait()
                    if wait <= 0:
                        break
                    if not (self._cond.wait(timeout=wait) and not self._closing) \
                            and not self._queue:
                        self._thread = None
                        if self._pool is not None:
                            self._pool.shutdown(wait=False)
                            self._pool = None
                        return
                jobs, self._queue = self._queue, []
                self._gather_until = None
            try:
                self._run(jobs)
            except BaseException as exc:  # no stream may hang on a scheduler bug
                for job in jobs:
                    if not job.future.done():
                        _fail(job.future, exc)
                if not isinstance(exc, Exception):
                    raise

    def _close(self, timeout: float) -> None:
        """End the scheduler thread once its queued reads are done and wait for it (at exit: a
        daemon thread still freeing tensors while the interpreter shuts down aborts the process)."""
        with self._cond:
            self._closing = True
            thread = self._thread
            self._cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _gather_wait(self) -> float:
        """Seconds the queued batch waits more (0: run it now; called with the lock held): at
        most ``gather_s`` in all, while some live stream read within ``RECENT_S`` and has no
        read queued. Streams that read together then share the next forward instead of taking
        turns in two, and each forward's fixed cost is paid once for them (docs/observer.md,
        "Gathering")."""
        if self.gather_s <= 0 or any(job.urgent for job in self._queue):
            return 0.0
        now = time.monotonic()
        if self._gather_until is None:
            self._gather_until = now + self.gather_s
        if now >= self._gather_until:
            return 0.0
        queued = {id(job.stream) for job in self._queue}
        waiting = any(stream.state is not None and not stream.released and stream.error is None
                      and id(stream) not in queued and now - stream.read_at < RECENT_S
                      for stream in list(self._live.values()))
        return self._gather_until - now if waiting else 0.0

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
            _resolve(job.future, _with_context(job, _empty(job.needs, self.hidden_size)))
            return False
        return True

    def _settle(self, job: _Job, exc: BaseException | None = None) -> None:
        job.stream.read_at = time.monotonic()
        with self._stats_lock:
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
            batch = job.parts[0] if len(job.parts) == 1 else _concat(job.parts)
            _resolve(job.future, _with_context(job, batch))

    def _count(self, n: int) -> None:
        with self._stats_lock:
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
            self._run_parts([part for group in self._groups(rows) for part in self._spread(group)])
            live = [(job, ids) for job, ids in rest if not job.future.done()]
        for job in jobs:
            if not job.future.done():
                self._settle(job)

    def _groups(self, rows: list[_Row]) -> Iterator[list[_Row]]:
        """Rows that can share a forward: the same depth and int8 blocks (q4_1_tail_q8), at
        most ``MAX_ROWS`` tokens (a read longer than that goes alone). Rows are packed, not
        padded: lengths need not match."""
        by_depth: dict[tuple[int, int | None], list[_Row]] = {}
        for row in rows:
            key = (self._signature(row.job)[0], _integer_from(row.job.stream.state))
            by_depth.setdefault(key, []).append(row)
        for group in by_depth.values():
            bucket: list[_Row] = []
            size = 0
            for row in group:
                if bucket and size + len(row.ids) > MAX_ROWS:
                    yield bucket
                    bucket, size = [], 0
                bucket.append(row)
                size += len(row.ids)
            if bucket:
                yield bucket

    def _spread(self, rows: list[_Row]) -> list[list[_Row]]:
        """The rows in as many parts as workers, streams whole, of about equal tokens and at
        least ``MIN_PART_TOKENS`` each (one part: a batch too small to spread)."""
        tokens = sum(len(row.ids) for row in rows)
        n = min(self.workers, len(rows), max(1, tokens // MIN_PART_TOKENS))
        if n == 1 or (self.adaptive and self.share < SHARE_MIN
                      and time.monotonic() - self._probed < PROBE_S):
            return [rows]
        parts: list[list[_Row]] = [[] for _ in range(n)]
        sizes = [0] * n
        for row in sorted(rows, key=lambda r: -len(r.ids)):  # longest first, to the lightest
            k = sizes.index(min(sizes))
            parts[k].append(row)
            sizes[k] += len(row.ids)
        return parts

    def _run_parts(self, parts: list[list[_Row]]) -> None:
        """Each part as one forward: the first in this thread, the others on the workers at
        the same time (each stream is in one part, so its reads stay in order)."""
        if len(parts) == 1 or self.workers == 1:
            for part in parts:
                self._forward_group(part)
            return
        with self._stats_lock:
            self.stats.spread += 1
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers - 1,
                                            f"guardrail-observer-{self.name}-worker",
                                            initializer=self._set_threads)
        start = time.monotonic()
        others = [self._pool.submit(self._timed_group, part) for part in parts[1:]]
        cpu = self._timed_group(parts[0])
        for other in others:
            cpu += other.result()  # _forward_group settles its own rows' errors
        wall = time.monotonic() - start
        self._probed = start
        if wall > 0:  # how much of (wall x parts) the parts got to run
            self.share = 0.5 * self.share + 0.5 * min(1.0, cpu / (wall * len(parts)))

    def _timed_group(self, rows: list[_Row]) -> float:
        """``_forward_group``; the CPU seconds this thread spent on it."""
        start = time.thread_time()
        self._forward_group(rows)
        return time.thread_time() - start

    def _signature(self, job: _Job) -> tuple[int, tuple[int, ...], bool]:
        if job.ids is None:  # a context read: as deep as the stream reads, rows it pools only
            context: tuple[int, tuple[int, ...], bool] = self.inner.context_signature(
                job.stream.needs)
            return context
        signature: tuple[int, tuple[int, ...], bool] = self.inner.signature(job.needs)
        return signature

    def _forward_group(self, rows: list[_Row]) -> None:
        rows = [row for row in rows if not row.job.future.done()]
        if not rows:
            return
        try:
            out = self._forward(rows)
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
                self._take(row, b, out)
            except Exception as exc:  # noqa: BLE001
                self._settle(row.job, exc)

    def _forward(self, rows: list[_Row]) -> _Out | _HostRows:
        """One forward over the rows' tokens packed in one sequence; the caches are not touched
        until ``_take``."""
        import torch

        inner = self.inner
        device = inner.device
        signatures = [self._signature(row.job) for row in rows]
        depth = signatures[0][0]
        states = [row.job.stream.state for row in rows]
        pool = getattr(states[0].kv, "pool", None)
        if pool is not None and pool.depth == depth and all(
                getattr(state.kv, "pool", None) is pool for state in states):
            return self._forward_padded(rows, signatures)
        ids, positions, spans, pasts = _pack(rows)
        caches: list[tuple[list[Any], Any]] = []
        causal: dict[int, Any] = {}
        groups = int(inner.config.num_attention_heads) // int(inner.kv_heads)
        for row, state, past in zip(rows, states, pasts, strict=True):
            n = len(row.ids)
            blocked = None  # one token may look everywhere
            if n > 1:  # the unbatched read's mask, as attend_blocked takes it
                if n not in causal:
                    causal[n] = torch.ones(n, n, dtype=torch.bool, device=device).tril()
                mask = torch.ones(1, 1, n, past + n, dtype=torch.bool, device=device)
                mask[0, 0, :, past:] = causal[n]
                blocked = ~mask.repeat(1, 1, groups, 1)
            caches.append((state.kv.tensors, blocked))  # views of the filled part, taken once
        indices = sorted({i for _, wanted, _ in signatures for i in wanted})
        logit_rows = [b for b, (_, _, logits) in enumerate(signatures) if logits]
        with torch.inference_mode():
            return _step(inner.model, depth, indices, logit_rows,
                         torch.tensor([ids], dtype=torch.long, device=device),
                         torch.tensor([positions], dtype=torch.long, device=device),
                         spans, caches, getattr(inner, "packed", None),
                         _integer_from(states[0]))

    def _forward_padded(self, rows: list[_Row],
                        signatures: list[tuple[int, tuple[int, ...], bool]]) -> _HostRows:
        """The rows' streams, whose caches share one pool, in one padded forward
        (``padded.padded_step``); what they want comes back to the CPU in one copy."""
        import torch

        from .padded import padded_step, to_host

        inner = self.inner
        ids, positions, spans, pasts = _pack(rows)
        kvs = [row.job.stream.state.kv for row in rows]
        indices = sorted({i for _, wanted, _ in signatures for i in wanted})
        # the reads' rows come back whole; a context read's only as its pooled means
        host_indices = sorted({i for row, (_, wanted, _) in zip(rows, signatures, strict=True)
                               if row.job.ids is not None for i in wanted})
        logit_rows = [b for b, (_, _, logits) in enumerate(signatures) if logits]
        full = any(rows[b].job.needs.logits for b in logit_rows)
        top_k = max((rows[b].job.needs.top_k or 0 for b in logit_rows), default=0)
        with torch.inference_mode():
            out = padded_step(inner.model, signatures[0][0], indices, logit_rows, ids, positions,
                              spans, pasts, kvs[0].pool, [kv.slot for kv in kvs],
                              getattr(inner, "packed", None))
            wanted = [out.states[i][0] for i in host_indices]
            if out.logits is not None:
                if full:
                    wanted.append(out.logits)
                if top_k:
                    k = min(top_k, int(out.logits.shape[-1]))
                    wanted.append(torch.topk(out.logits, k, dim=-1).values)
            means = self._context_means(rows, out.states, spans, pasts)
            host = to_host(wanted + [mean for _, _, mean in means])
        with self._stats_lock:
            self.stats.padded += 1
        states = dict(zip(host_indices, host, strict=False))
        rest = host[len(host_indices):len(host) - len(means)]
        logits = rest.pop(0) if out.logits is not None and full else None
        top = rest.pop(0) if out.logits is not None and top_k else None
        pooled: dict[int, dict[int, Any]] = {}
        for (b, layer, _), mean in zip(means, host[len(host) - len(means):], strict=True):
            pooled.setdefault(b, {})[layer] = mean.numpy().copy()  # not a view of all rows
        return _HostRows(spans, states, logits, top, out.logit_spans, pooled)

    def _context_means(self, rows: list[_Row], states: dict[int, Any],
                       spans: list[tuple[int, int]], pasts: list[int]
                       ) -> list[tuple[int, int, Any]]:
        """(row, layer, mean on the device) for each context read that pools its span."""
        means = []
        for b, row in enumerate(rows):
            state = row.job.stream.state
            if row.job.ids is not None or state.pool_from is None:
                continue
            start, end = spans[b]
            first = start + state.pool_from - pasts[b]
            for layer in sorted(row.job.stream.needs.layers):
                rows_of = states[self.inner.hidden_index(layer)][0, first:end]
                means.append((b, layer, rows_of.float().mean(0)))
        return means

    def _take(self, row: _Row, b: int, out: _Out | _HostRows) -> None:
        """Row ``b`` of a forward: its new keys and values into its cache, its outputs."""
        job = row.job
        start, end = out.spans[b]
        state = job.stream.state
        with self._cond:
            if job.stream.released:
                return
            if isinstance(out, _HostRows):  # written past the filled part by the forward
                state.kv.commit(end - start)
            else:
                state.kv.append([t[:, :, start:end] for t in out.new_kv])
        if job.ids is None:
            if state.pool_from is not None:
                state.context = (out.pooled[b] if isinstance(out, _HostRows)
                                 else self._pooled(job, b, out))
            self.inner.context_read(state)
            return
        state.seen += end - start
        job.parts.append(self._padded_part(job, b, out) if isinstance(out, _HostRows)
                         else self._part(job, b, out))

    def _pooled(self, job: _Job, b: int, out: _Out) -> dict[int, Any]:
        """Row ``b``'s pooled context states (a context read: the row is the context after the
        prefix its cache reused, which stops before the pooled span)."""
        from .context import pool_rows

        start, end = out.spans[b]
        state = job.stream.state
        rows = {layer: out.states[self.inner.hidden_index(layer)][0, start:end]
                for layer in job.stream.needs.layers}
        return pool_rows(rows, state.pool_from - (state.context_len - (end - start)))

    def _part(self, job: _Job, b: int, out: _Out) -> ObservedBatch:
        """Row ``b``'s outputs of a packed forward, as float32."""
        from .model import _batch

        start, end = out.spans[b]
        hidden = {layer: out.states[self.inner.hidden_index(layer)][0, start:end].float()
                  for layer in job.needs.layers}
        logits = None
        if b in out.logit_spans:
            first, last = out.logit_spans[b]
            logits = out.logits[0, first:last].float()
        return _batch(hidden, logits, job.needs)

    def _padded_part(self, job: _Job, b: int, out: _HostRows) -> ObservedBatch:
        """Row ``b``'s outputs of a padded forward: views of the rows copied back."""
        start, end = out.spans[b]
        needs = job.needs
        hidden = {layer: out.states[self.inner.hidden_index(layer)][start:end]
                  for layer in needs.layers}
        logits = top = None
        if b in out.logit_spans:
            first, last = out.logit_spans[b]
            if needs.logits and out.logits is not None:
                logits = out.logits[first:last]
            if needs.top_k and out.top is not None:
                top = out.top[first:last, : needs.top_k]
        return ObservedBatch(hidden=hidden, logits=logits, top_logits=top)


@dataclass
class _HostRows:
    """A padded forward's outputs on the CPU (float32): row ``b`` is ``spans[b]``."""

    spans: list[tuple[int, int]]
    states: dict[int, Any]  # HF hidden-state index -> (total, hidden)
    logits: Any  # (tokens of the rows that want logits, vocab), or None (no row wants them)
    top: Any  # (same rows, the largest top_k asked), or None
    logit_spans: dict[int, tuple[int, int]]  # row -> its span in ``logits`` and ``top``
    pooled: dict[int, dict[int, Any]] = field(default_factory=dict)  # row -> pooled context


@dataclass
class _Out:
    """A packed forward's outputs: row ``b`` is ``spans[b]`` of the sequence."""

    spans: list[tuple[int, int]]
    states: dict[int, Any]  # HF hidden-state index -> (1, total, hidden)
    logits: Any  # (1, tokens of the rows that want logits, vocab), or None
    logit_spans: dict[int, tuple[int, int]]  # row -> its span in ``logits``
    new_kv: list[Any]  # per block, keys then values: (1, kv_heads, total, head_dim)


def _integer_from(state: Any) -> int | None:
    """The first block a stream's reads run on int8 products (q4_1_tail_q8; None: none)."""
    return getattr(state.kv, "integer_from", None)


def _step(model: Any, depth: int, indices: list[int], logit_rows: list[int], ids: Any,
          positions: Any, spans: list[tuple[int, int]],
          caches: list[tuple[list[Any], Any]], packed: Any = None,
          integer_from: int | None = None) -> _Out:
    """``LlamaStep``'s forward over several streams' tokens in one sequence (on the observer's
    packed projections when it has them; from block ``integer_from`` on int8 products, where
    the fused blocks have them); the head runs only on the rows that want logits."""
    import torch

    from .llama_step import block_rows, rope_for

    base = model.base_model
    h = base.embed_tokens(ids)
    wanted = set(indices)
    states = {0: h} if 0 in wanted else {}
    new_kv: list[Any] = []
    fused = getattr(packed, "fused", None)  # q4_1: the blocks in one C call (blockstep)
    segments = [(s, e, cache) for (s, e), (cache, _) in zip(spans, caches, strict=True)]
    ran = (fused.run(h, positions, segments, depth, wanted, integer_from)
           if fused is not None else None)
    if ran is not None:
        h, kept, new_kv = ran
        states.update(kept)
    else:
        rope = rope_for(base, h, positions, packed)
        for i in range(depth):
            rows = [(s, e, cache[2 * i], cache[2 * i + 1], blocked)
                    for (s, e), (cache, blocked) in zip(spans, caches, strict=True)]
            h = block_rows(base.layers[i], h, rope, rows, new_kv, packed, i)
            if i + 1 in wanted:
                states[i + 1] = h
    full = depth == model.config.num_hidden_layers
    last = base.norm(h) if full else h  # HF convention: the last hidden state is normed
    if full and depth in wanted:
        states[depth] = last
    logits = None
    logit_spans: dict[int, tuple[int, int]] = {}
    if logit_rows:
        head = (packed.head if packed is not None else None) or model.get_output_embeddings()
        if len(logit_rows) == len(spans):
            logit_spans = {b: spans[b] for b in logit_rows}
            logits = head(last)
        else:
            at = 0
            for b in logit_rows:
                s, e = spans[b]
                logit_spans[b] = (at, at + e - s)
                at += e - s
            logits = head(torch.cat([last[:, s:e] for s, e in (spans[b] for b in logit_rows)],
                                    dim=1))
    return _Out(spans, states, logits, logit_spans, new_kv)


@dataclass
class _Row:
    """One stream's tokens in one forward."""

    job: _Job
    ids: list[int]


def resolve_workers(inner: Any, value: Any) -> int:
    """``observer.options.workers``: forwards the scheduler may run at once over one batch's
    streams (each on ``threads`` intra-op threads). ``auto`` (the default): one per ``threads``
    CPU cores on the CPU, one on a GPU."""
    if value is None or value == "auto":
        device = getattr(inner, "device", None)
        if device is not None and getattr(device, "type", "cpu") != "cpu":
            return 1
        return max(1, (os.cpu_count() or 1) // max(1, int(getattr(inner, "threads", None) or 1)))
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ObserverError(f"observer {getattr(inner, 'name', '?')!r}: observer.options.workers "
                            f"must be a positive integer or 'auto', got {value!r}")
    return value


def default_gather_ms(max_delay_ms: float, hold_back_tokens: int) -> float:
    """``gather_ms`` when the policy leaves it out: none when a stream's every delta is read at
    once (hold-back 0 or ``observer.max_delay_ms`` 0), else ``max_delay_ms``, at most
    ``DEFAULT_GATHER_MS``: a streaming session's next read comes due within ``max_delay_ms``."""
    if hold_back_tokens <= 0 or max_delay_ms <= 0:
        return 0.0
    return min(float(max_delay_ms), DEFAULT_GATHER_MS)


def resolve_gather(inner: Any, value: Any) -> float:
    """``observer.options.gather_ms``: how long a batch may wait for streams that read recently
    (milliseconds, >= 0; 0 or absent: never)."""
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ObserverError(f"observer {getattr(inner, 'name', '?')!r}: observer.options."
                            f"gather_ms must be a number of milliseconds >= 0, got {value!r}")
    return float(value)


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


def _with_context(job: _Job, batch: ObservedBatch) -> ObservedBatch:
    """``batch`` with the stream's pooled context states when they have not gone out yet (the
    stream's first batch); a backend that read it alone may have handed them over already."""
    take = getattr(job.stream.state, "take_context", None)  # a backend's own state may lack it
    context = take() if take is not None else None
    if context is not None:
        batch.context = context
    return batch


def _pack(rows: list[_Row]) -> tuple[list[int], list[int], list[tuple[int, int]], list[int]]:
    """The rows' tokens in one sequence: their ids, positions, each row's span in it and its
    stream's cached length before it (room made in each cache first)."""
    ids: list[int] = []
    positions: list[int] = []
    spans: list[tuple[int, int]] = []
    pasts: list[int] = []
    for row in rows:
        state = row.job.stream.state
        n = len(row.ids)
        if row.job.ids is not None:
            state.make_room(n)  # drops old tokens only: safe to redo on a rerun
        past = state.kv.length()
        # a context read starts after the shared prefix its cache may already hold
        first = past if row.job.ids is None else state.positions(n).start
        spans.append((len(ids), len(ids) + n))
        ids += row.ids
        positions += range(first, first + n)
        pasts.append(past)
    return ids, positions, spans, pasts
