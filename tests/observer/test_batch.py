"""One batched observer per Guard: reads of concurrent streams share a forward, and each stream
gets what its own unbatched read gives; a stream's bad read fails that stream alone; a closed
stream's KV cache is freed at once."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from guardrail import Features, Guard, Monitor, Needs, Score
from guardrail.errors import ObserverError
from guardrail.events import Error, Event, Flag, Halt, Release
from guardrail.observer.batch import BatchedObserver
from guardrail.observer.hf import load_model_dir
from guardrail.session import Report
from guardrail.stream import TokenSpan
from guardrail.testing import plugin_monitors, random_splits

from .streams import PROMPTS, TEXTS, alone_and_together

NEEDS = Needs(layers=frozenset({1, -1}), logits=True, top_k=3)


class _Unbatched:
    """A backend observer a Guard does not wrap: the per-stream reads of before."""

    batchable = False

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@pytest.fixture(scope="module")
def raw(tiny_llama: Path) -> Any:
    return load_model_dir(tiny_llama, name="tiny-llama", window=4096)


@pytest.fixture(scope="module")
def small_window(tiny_llama: Path) -> Any:
    """A window that the longer streams overflow: batched reads also drop old tokens."""
    return load_model_dir(tiny_llama, name="tiny-llama", window=48)


def _wait_pending(observer: BatchedObserver, n: int) -> None:
    deadline = time.monotonic() + 60
    while observer.pending() < n:
        assert time.monotonic() < deadline, f"{observer.pending()} of {n} reads queued"
        time.sleep(0.005)


def _close(a: Any, b: Any) -> None:
    assert (a is None) == (b is None)
    if a is not None:
        torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), rtol=1e-4, atol=1e-4)


def _shared(stats: Any, streams: int, workers: int) -> None:
    """The streams' first reads shared one forward; with two forward workers, a batch was spread
    over two forwards run at once."""
    if workers == 1:
        assert stats.largest == streams and stats.spread == 0
    else:
        assert stats.spread >= 1


def _same_batch(a: Any, b: Any) -> None:
    assert a.hidden.keys() == b.hidden.keys()
    for layer in a.hidden:
        _close(a.hidden[layer], b.hidden[layer])
    _close(a.logits, b.logits)
    _close(a.top_logits, b.top_logits)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("fixture", ["raw", "small_window"])
def test_streams_read_in_one_forward_match_their_own_reads(request: pytest.FixtureRequest,
                                                            fixture: str, workers: int) -> None:
    """Five streams with contexts and chunks of different lengths, read round by round with
    every stream's chunk in one forward (or spread over two forwards run at once), give the rows
    of reading each stream alone."""
    plain = request.getfixturevalue(fixture)
    batched = BatchedObserver(plain, workers=workers)
    tokens = [plain.tokenizer.tokenize(t) for t in TEXTS]
    sizes = [1, 3, 2, 7, 5]  # tokens per read, per stream
    if workers > 1:  # reads long enough to spread (MIN_PART_TOKENS per part)
        sizes = [4 * size for size in sizes]
    alone, together = alone_and_together(plain, batched, NEEDS, PROMPTS, tokens, sizes)
    _shared(batched.stats, len(PROMPTS), workers)  # the contexts, then the first reads
    for mine, theirs in zip(together, alone, strict=True):
        for a, b in zip(mine, theirs, strict=True):
            _same_batch(a, b)


def test_a_bad_read_fails_its_stream_and_no_other(raw: Any) -> None:
    """In one batch: a token id past the vocabulary (the forward itself fails) and a token with
    no id (fails before it); the other streams get their reads as if alone."""
    batched = BatchedObserver(raw)
    tokens = [raw.tokenizer.tokenize(t)[:6] for t in TEXTS[:4]]
    bad_id = [TokenSpan(0, 1, raw.hf_tokenizer.vocab_size + 1000), *tokens[1][1:]]
    no_id = [TokenSpan(0, 1, None), *tokens[2][1:]]
    streams = [batched.start([{"role": "user", "content": p}], NEEDS) for p in PROMPTS[:4]]
    with batched.hold():
        futures = [batched.submit(streams[0], tokens[0], NEEDS),
                   batched.submit(streams[1], bad_id, NEEDS),
                   batched.submit(streams[2], no_id, NEEDS),
                   batched.submit(streams[3], tokens[3], NEEDS)]
    with pytest.raises(ObserverError, match="without an id"):
        futures[2].result(timeout=60)
    with pytest.raises(IndexError):
        futures[1].result(timeout=60)
    for k in (0, 3):
        state = raw.start([{"role": "user", "content": PROMPTS[k]}], NEEDS)
        _same_batch(futures[k].result(timeout=60), raw.extend(state, tokens[k], NEEDS))
    # the good streams read on; their next reads still match reading alone
    nxt = [raw.tokenizer.tokenize(TEXTS[k])[6:9] for k in (0, 3)]
    for k, toks in zip((0, 3), nxt, strict=True):
        state = raw.start([{"role": "user", "content": PROMPTS[k]}], NEEDS)
        raw.extend(state, tokens[k], NEEDS)
        _same_batch(batched.extend(streams[k], toks, NEEDS), raw.extend(state, toks, NEEDS))


def test_a_reader_that_gives_up_leaves_the_batch_to_the_others(raw: Any) -> None:
    """A read cancelled while queued (an async driver's task was cancelled) is skipped; the
    other streams of its batch get their reads."""
    batched = BatchedObserver(raw)
    tokens = [raw.tokenizer.tokenize(t)[:5] for t in TEXTS[:3]]
    streams = [batched.start([{"role": "user", "content": p}], NEEDS) for p in PROMPTS[:3]]
    with batched.hold():
        futures = [batched.submit(s, t, NEEDS) for s, t in zip(streams, tokens, strict=True)]
        assert futures[1].cancel()
    for k in (0, 2):
        state = raw.start([{"role": "user", "content": PROMPTS[k]}], NEEDS)
        _same_batch(futures[k].result(timeout=60), raw.extend(state, tokens[k], NEEDS))


class NormMonitor(Monitor):
    """Scores each token by the norm of its last-layer state; flags the largest."""

    def __init__(self, options: Any = None) -> None:
        pass

    def needs(self) -> Needs:
        return Needs(layers=frozenset({-1}), top_k=2)

    def update(self, state: Any, features: Features) -> list[Score]:
        rows = torch.as_tensor(features.hidden[-1])
        return [Score(i, float(torch.linalg.vector_norm(r)))
                for i, r in zip(features.indices, rows, strict=True)]


class WordMonitor(Monitor):
    """Reads layer 1 (so it waits for the observer); halts on the token that ends 'bomb'."""

    def __init__(self, options: Any = None) -> None:
        pass

    def needs(self) -> Needs:
        return Needs(layers=frozenset({1}))

    def update(self, state: Any, features: Features) -> list[Score]:
        text = features.text.lower()
        ends = [m + 3 for m in range(len(text)) if text.startswith("bomb", m)]
        return [Score(i, 1.0 if any(t.start <= e < t.end for e in ends) else 0.0)
                for i, t in zip(features.indices, features.tokens, strict=True)]


POLICY = {
    # reads when due (not sent ahead) on one worker: the reads meet in the forwards these
    # tests arrange
    "observer": {"max_delay_ms": 1e9, "read_ahead": False, "options": {"workers": 1}},
    "release": {"hold_back_tokens": 4},
    "on_error": "fail_closed",
    "monitors": [
        {"id": "norm", "use": "norm", "threshold": 6.0, "action": "flag"},
        {"id": "word", "use": "word", "threshold": 0.5, "action": "halt"},
    ],
}
STREAM_TEXTS = [*TEXTS[:4], "Some ask how to build a bomb and the guide says no, then go home."]


def _seen(events: list[Event], report: Report) -> dict[str, Any]:
    return {
        "released": [(e.text, e.end) for e in events if isinstance(e, Release)],
        "halt": [(h.monitor, h.at, h.released_text) for h in events if isinstance(h, Halt)],
        "flags": [(f.tokens, f.span) for f in events if isinstance(f, Flag)],
        "errors": [(e.monitor, e.outcome) for e in events if isinstance(e, Error)],
        "report": (report.tokens, report.released_tokens, report.halted),
    }


def _scores_close(a: Report, b: Report) -> None:
    assert a.scores.keys() == b.scores.keys()
    for key in a.scores:
        assert [i for i, _ in a.scores[key]] == [i for i, _ in b.scores[key]]
        assert [v for _, v in a.scores[key]] == pytest.approx([v for _, v in b.scores[key]],
                                                              rel=1e-4, abs=1e-4)


def _stream(guard: Guard, k: int, texts: list[str] = STREAM_TEXTS
            ) -> tuple[list[Event], Report]:
    session = guard.session(prompt=PROMPTS[k], record_scores=True)
    events: list[Event] = []
    for delta in random_splits(texts[k], seed=k):
        events += session.feed(delta)
    report = session.finish()
    return events + report.final_events, report


def _concurrently(guard: Guard, first_batch: int, texts: list[str] = STREAM_TEXTS
                  ) -> list[tuple[list[Event], Report]]:
    """Every stream in its own thread; the first reads (context and tokens) held until all are
    queued, so they share one forward; later reads meet as they come."""
    observer = guard.observer
    assert isinstance(observer, BatchedObserver)
    out: list[Any] = [None] * len(PROMPTS)

    def run(k: int) -> None:
        out[k] = _stream(guard, k, texts)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(PROMPTS))]
    with observer.hold():
        for t in threads:
            t.start()
        _wait_pending(observer, first_batch)
    for t in threads:
        t.join(timeout=120)
    assert all(o is not None for o in out)
    return out


def _with_workers(policy: dict[str, Any], workers: int) -> dict[str, Any]:
    return {**policy, "observer": {**policy["observer"], "options": {"workers": workers}}}


@pytest.mark.parametrize("workers", [1, 2])
def test_concurrent_sessions_release_and_halt_as_sequential_ones(raw: Any, workers: int) -> None:
    """Five sessions of different lengths on one Guard, fed from five threads: each one's
    releases, halt, flags and scores are those of running it alone on the unbatched observer,
    with one forward worker or two."""
    with plugin_monitors(norm=NormMonitor, word=WordMonitor) as host:
        alone_guard = Guard.from_policy(POLICY, host=host, observer=_Unbatched(raw))
        alone = [_stream(alone_guard, k) for k in range(len(PROMPTS))]
        raw.prefix.clear()  # the contexts read alone would be reused whole: read them again
        guard = Guard.from_policy(_with_workers(POLICY, workers), host=host, observer=raw)
        together = _concurrently(guard, 2 * len(PROMPTS))
    assert guard.observer.workers == workers
    _shared(guard.observer.stats, len(PROMPTS), workers)
    for (ev_a, rep_a), (ev_b, rep_b) in zip(together, alone, strict=True):
        assert _seen(ev_a, rep_a) == _seen(ev_b, rep_b)
        _scores_close(rep_a, rep_b)
    assert together[-1][1].halted and not any(r.halted for _, r in together[:-1])
    assert guard.observer.live_streams() == 0


class _PoisonTokenizer:
    """The observer's tokenizer, except that the word 'poison' gets an id past the vocabulary:
    a read that breaks the model's forward for that stream only."""

    def __init__(self, inner: Any, bad_id: int) -> None:
        self._inner = inner
        self._bad = bad_id

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def tokenize(self, text: str) -> list[TokenSpan]:
        at = text.find("poison")
        return [TokenSpan(t.start, t.end, self._bad) if 0 <= at < t.end and t.start < at + 6
                else t for t in self._inner.tokenize(text)]


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("on_error", ["fail_closed", "fail_open"])
def test_a_failing_read_follows_on_error_in_its_session_only(raw: Any, on_error: str,
                                                             workers: int) -> None:
    """One stream's text makes its read fail inside a batched forward: that session follows
    on_error (halts, or goes on unguarded by the observer's monitors); the four others in the
    same batch (in its forward or in the one run beside it) release, halt and score as alone."""
    policy = {**POLICY, "on_error": on_error}
    texts = list(STREAM_TEXTS)
    texts[1] = "It was poison, said the man, and he left the room without a word."
    batched = BatchedObserver(raw, workers=workers)
    batched.tokenizer = _PoisonTokenizer(raw.tokenizer, raw.hf_tokenizer.vocab_size + 1000)
    with plugin_monitors(norm=NormMonitor, word=WordMonitor) as host:
        alone_guard = Guard.from_policy(policy, host=host, observer=_Unbatched(raw))
        alone = [_stream(alone_guard, k) for k in range(len(PROMPTS))]
        # the contexts read alone would be reused whole: read them again, in one forward
        raw.prefix.clear()
        guard = Guard.from_policy(policy, host=host, observer=batched)
        together = _concurrently(guard, 2 * len(PROMPTS), texts)
    _shared(batched.stats, len(PROMPTS), workers)
    assert batched.stats.split >= 1  # the poisoned read broke a batched forward
    events, report = together[1]
    errors = [e for e in events if isinstance(e, Error)]
    # fail_open: both monitors that read the observer stop; fail_closed: the first one halts
    assert [e.outcome for e in errors] == [on_error] * (1 if on_error == "fail_closed" else 2)
    assert report.halted == (on_error == "fail_closed")
    if on_error == "fail_open":
        assert report.released_text == texts[1]
    for k in (0, 2, 3, 4):
        assert _seen(*together[k]) == _seen(*alone[k])
        _scores_close(together[k][1], alone[k][1])


def test_closed_and_aborted_sessions_free_their_cache(raw: Any) -> None:
    with plugin_monitors(norm=NormMonitor, word=WordMonitor) as host:
        guard = Guard.from_policy(POLICY, host=host, observer=raw)
    observer = guard.observer
    sessions = [guard.session(prompt=PROMPTS[k]) for k in (0, 1, 3)]
    for s, k in zip(sessions, (0, 1, 3), strict=True):
        s.feed(TEXTS[k])  # past the hold-back: read now
    assert observer.live_streams() == 3 and observer.cached_tokens() > 0
    held = observer.cached_tokens()
    state = sessions[1]._observer_state
    sessions[1].finish()
    assert observer.live_streams() == 2 and observer.cached_tokens() < held
    sessions[2].abort("client gone")
    assert observer.live_streams() == 1
    with pytest.raises(ObserverError, match="released"):
        observer.extend(state, raw.tokenizer.tokenize("more"), guard.needs)
    sessions[0].finish()
    assert observer.live_streams() == 0 and observer.cached_tokens() == 0


def test_async_sessions_await_reads_without_blocking_the_loop(raw: Any) -> None:
    """Five sessions as tasks on one event loop (afeed/afinish): while one awaits its read the
    others submit theirs, so the first reads share a forward; results as sequential sync runs."""
    with plugin_monitors(norm=NormMonitor, word=WordMonitor) as host:
        alone_guard = Guard.from_policy(POLICY, host=host, observer=_Unbatched(raw))
        alone = [_stream(alone_guard, k) for k in range(len(PROMPTS))]
        guard = Guard.from_policy(POLICY, host=host, observer=raw)
    observer = guard.observer

    async def one(k: int) -> tuple[list[Event], Report]:
        session = guard.session(prompt=PROMPTS[k], record_scores=True)
        events: list[Event] = []
        for delta in random_splits(STREAM_TEXTS[k], seed=k):
            events += await session.afeed(delta)
        report = await session.afinish()
        return events + report.final_events, report

    queued, held = threading.Event(), threading.Event()

    def hold() -> None:
        # Held from another thread: a read that blocked the loop would keep the other tasks
        # from queueing theirs; the hold then ends after 60 s, the reads run alone, and the
        # assertion on the batch size fails (instead of the test hanging).
        with observer.hold():
            held.set()
            queued.wait(timeout=60)

    async def main() -> list[tuple[list[Event], Report]]:
        holder = threading.Thread(target=hold)
        holder.start()
        held.wait()
        tasks = [asyncio.create_task(one(k)) for k in range(len(PROMPTS))]
        deadline = time.monotonic() + 60
        while observer.pending() < 2 * len(PROMPTS) and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        queued.set()
        results = list(await asyncio.gather(*tasks))
        holder.join()
        return results

    together = asyncio.run(main())
    assert observer.stats.largest == len(PROMPTS)
    for (ev_a, rep_a), (ev_b, rep_b) in zip(together, alone, strict=True):
        assert _seen(ev_a, rep_a) == _seen(ev_b, rep_b)
        _scores_close(rep_a, rep_b)


@pytest.mark.parametrize("bad", [0, -1, "two", 1.5, True])
def test_bad_workers_name_the_field(raw: Any, bad: Any) -> None:
    with plugin_monitors(norm=NormMonitor, word=WordMonitor) as host, \
            pytest.raises(ObserverError, match=r"observer\.options\.workers"):
        Guard.from_policy(_with_workers(POLICY, bad), host=host, observer=raw)


def test_auto_workers_spread_a_batch_only_while_it_gets_the_cores(raw: Any) -> None:
    """``workers: auto`` (the default) spreads a large batch over one worker per core, and stops
    spreading while the spread forwards do not get the cores (they took turns on one): a busy
    machine then pays no second forward's fixed cost, and every PROBE_S a batch measures again."""
    from guardrail.observer import batch

    observer = BatchedObserver(raw, workers="auto")
    assert observer.adaptive and observer.workers == max(1, os.cpu_count() or 1)
    observer.workers = 2  # as on a machine of two free cores
    picked = (0, 1, 3)  # the longer texts: reads of 16 to 20 tokens
    tokens = [raw.tokenizer.tokenize(TEXTS[k])[:20] for k in picked]
    assert sum(map(len, tokens)) >= 2 * batch.MIN_PART_TOKENS

    def read_all(streams: list[Any]) -> None:
        with observer.hold():
            futures = [observer.submit(s, t, NEEDS) for s, t in zip(streams, tokens, strict=True)]
        for future in futures:
            future.result(timeout=60)

    streams = [observer.start([{"role": "user", "content": PROMPTS[k]}], NEEDS) for k in picked]
    read_all(streams)
    spread = observer.stats.spread
    assert spread >= 1
    observer.share = batch.SHARE_MIN / 2  # as measured while another process held a core
    read_all(streams)
    assert observer.stats.spread == spread  # not spread: measured too recently
    observer._probed -= batch.PROBE_S  # time for another measure
    read_all(streams)
    assert observer.stats.spread == spread + 1


@pytest.mark.parametrize("gather_ms", [0, 60_000])
def test_streams_that_read_together_are_gathered_into_one_forward(raw: Any,
                                                                  gather_ms: int) -> None:
    """With ``gather_ms``, a read waits for the other streams that read recently: the two
    streams' next reads, submitted one after the other, share one forward; without it the first
    runs alone."""
    observer = BatchedObserver(raw, workers=1, gather_ms=gather_ms)
    tokens = [raw.tokenizer.tokenize(t) for t in TEXTS[:2]]
    streams = [observer.start([{"role": "user", "content": p}], NEEDS) for p in PROMPTS[:2]]
    with observer.hold():
        first = [observer.submit(s, t[:3], NEEDS) for s, t in zip(streams, tokens, strict=True)]
    for future in first:
        future.result(timeout=60)
    forwards = observer.stats.forwards
    a = observer.submit(streams[0], tokens[0][3:6], NEEDS)
    if gather_ms == 0:
        a.result(timeout=60)  # read alone, before the other stream submits
    b = observer.submit(streams[1], tokens[1][3:6], NEEDS)
    for future in (a, b):
        future.result(timeout=60)
    assert observer.stats.forwards - forwards == (1 if gather_ms else 2)
    for k, got in ((0, a), (1, b)):  # gathered or not, each stream's rows are its own
        state = raw.start([{"role": "user", "content": PROMPTS[k]}], NEEDS)
        raw.extend(state, tokens[k][:3], NEEDS)
        _same_batch(got.result(), raw.extend(state, tokens[k][3:6], NEEDS))


def test_a_batch_waits_for_absent_streams_no_longer_than_gather_ms(raw: Any) -> None:
    """A stream that read recently and then stops reading (its upstream went quiet) does not
    hold the others' reads: they run once ``gather_ms`` has passed."""
    observer = BatchedObserver(raw, workers=1, gather_ms=200)
    tokens = [raw.tokenizer.tokenize(t) for t in TEXTS[:2]]
    streams = [observer.start([{"role": "user", "content": p}], NEEDS) for p in PROMPTS[:2]]
    for s, t in zip(streams, tokens, strict=True):
        observer.extend(s, t[:3], NEEDS)
    for _ in range(3):  # stream 1 never reads again
        observer.submit(streams[0], tokens[0][3:6], NEEDS).result(timeout=60)


def test_a_streams_last_read_is_not_held_for_the_other_streams(raw: Any) -> None:
    """``gather_ms`` holds a batch for streams that read recently, but not a stream's last read:
    its reader waits for nothing else. A session whose fellow read a moment ago and went quiet
    finishes at once (with the gather of a minute, a held read would keep it a minute)."""
    policy = {**POLICY, "observer": {**POLICY["observer"],
                                     "options": {"workers": 1, "gather_ms": 60_000}}}
    with plugin_monitors(norm=NormMonitor, word=WordMonitor) as host:
        guard = Guard.from_policy(policy, host=host, observer=raw)
        quiet = guard.session(prompt=PROMPTS[1])
        quiet.feed(TEXTS[1])  # more than the hold-back: it reads, then its upstream goes quiet
        assert guard.observer.stats.reads >= 2  # its context and its first tokens
        session = guard.session(prompt=PROMPTS[0])
        reports: list[Report] = []
        ended = threading.Thread(target=lambda: (session.feed(TEXTS[0][:12]),
                                                 reports.append(session.finish())))
        ended.start()
        ended.join(timeout=30)
        assert not ended.is_alive(), "the last read waited for the quiet stream"
        assert reports[0].tokens == reports[0].released_tokens > 0
        quiet.abort("test over")


@pytest.mark.parametrize("bad", [-1, "soon", True, float("nan")])
def test_bad_gather_ms_names_the_field(raw: Any, bad: Any) -> None:
    policy = {**POLICY, "observer": {"max_delay_ms": 1e9, "options": {"gather_ms": bad}}}
    with plugin_monitors(norm=NormMonitor, word=WordMonitor) as host, \
            pytest.raises(ObserverError, match=r"observer\.options\.gather_ms"):
        Guard.from_policy(policy, host=host, observer=raw)


def test_at_exit_the_scheduler_ends_once_its_reads_are_done(raw: Any) -> None:
    """An idle scheduler thread lives on for ``IDLE_EXIT_S``; the exit hook ends it at once, so
    no daemon thread is still freeing tensors while the interpreter shuts down."""
    from guardrail.observer.batch import IDLE_EXIT_S, _close_schedulers

    batched = BatchedObserver(raw)
    state = batched.start([{"role": "user", "content": PROMPTS[0]}], NEEDS)
    tokens = raw.tokenizer.tokenize(TEXTS[0])
    batched.extend(state, tokens[:6], NEEDS)
    thread = batched._thread
    assert thread is not None and thread.is_alive()
    started = time.monotonic()
    _close_schedulers()
    assert not thread.is_alive()
    assert time.monotonic() - started < IDLE_EXIT_S / 3
    # a read after it still gets its answer (from a scheduler that ends when its queue is empty)
    plain = raw.start([{"role": "user", "content": PROMPTS[0]}], NEEDS)
    raw.extend(plain, tokens[:6], NEEDS)
    _same_batch(batched.extend(state, tokens[6:9], NEEDS), raw.extend(plain, tokens[6:9], NEEDS))
