"""The accelerators' batched path (guardrail.observer.padded), run here on the CPU with the
observer's ``padded`` flag on: streams' caches in one pool, attention for all streams of a batch in
one padded call, rows copied back at once. Each stream still gets what its own unbatched read on
the CPU's default path gives, through window drops, a failing read in its batch, released streams
whose slots are reused, and a shared conversation prefix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from guardrail.monitor import Needs
from guardrail.observer.batch import BatchedObserver
from guardrail.observer.hf import load_model_dir
from guardrail.observer.padded import PooledKV
from guardrail.stream import TokenSpan

from .streams import PROMPTS, TEXTS

NEEDS = Needs(layers=frozenset({0, 1, -1}), logits=True, top_k=3)


def _pair(tiny_llama: Path, window: int) -> tuple[Any, Any]:
    """The CPU's default observer, and one like it on the padded path."""
    plain = load_model_dir(tiny_llama, name="tiny-llama", window=window)
    padded = load_model_dir(tiny_llama, name="tiny-llama", window=window)
    assert not plain.padded  # the CPU's default
    padded.padded = True
    return plain, BatchedObserver(padded)


def _same(a: Any, b: Any) -> None:
    assert a.hidden.keys() == b.hidden.keys()
    for layer in a.hidden:
        torch.testing.assert_close(a.hidden[layer], b.hidden[layer], rtol=1e-4, atol=1e-4)
    for x, y in ((a.logits, b.logits), (a.top_logits, b.top_logits)):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


def _alone(plain: Any, prompt: str, tokens: list[TokenSpan], size: int,
           needs: Needs = NEEDS) -> list[Any]:
    state = plain.start([{"role": "user", "content": prompt}], needs)
    return [plain.extend(state, tokens[i:i + size], needs) for i in range(0, len(tokens), size)]


def _rounds(batched: BatchedObserver, streams: dict[int, Any], tokens: list[list[TokenSpan]],
            sizes: list[int], needs: Needs = NEEDS) -> dict[int, list[Any]]:
    """Each round, every live stream's next read, all in one batch."""
    got: dict[int, list[Any]] = {k: [] for k in streams}
    r = 0
    while any(r * sizes[k] < len(tokens[k]) for k in streams):
        with batched.hold():
            futures = {k: batched.submit(s, tokens[k][r * sizes[k]:(r + 1) * sizes[k]], needs)
                       for k, s in streams.items() if r * sizes[k] < len(tokens[k])}
        for k, future in futures.items():
            got[k].append(future.result(timeout=60))
        r += 1
    return got


@pytest.mark.parametrize("window", [4096, 48])
@pytest.mark.parametrize("sizes", [[1, 3, 2, 7, 5], [4, 4, 4, 4, 4]])
def test_padded_reads_match_each_stream_read_alone(tiny_llama: Path, window: int,
                                                   sizes: list[int]) -> None:
    """Five streams with contexts and reads of different lengths (or all of 4 tokens), each
    round's reads in one padded forward, give the rows of each stream read alone on the CPU's
    default path; window 48: the longer streams drop old tokens on the way."""
    plain, batched = _pair(tiny_llama, window)
    tokens = [plain.tokenizer.tokenize(t) for t in TEXTS]
    alone = [_alone(plain, p, t, n) for p, t, n in zip(PROMPTS, tokens, sizes, strict=True)]
    streams = {k: batched.start([{"role": "user", "content": p}], NEEDS)
               for k, p in enumerate(PROMPTS)}
    together = _rounds(batched, streams, tokens, sizes)
    assert batched.stats.padded >= len(alone[3]) and batched.stats.largest == len(PROMPTS)
    assert all(isinstance(s.state.kv, PooledKV) for s in streams.values())
    if window == 48:
        assert any(s.state.dropped for s in streams.values())
    for k, mine in together.items():
        assert len(mine) == len(alone[k])
        for a, b in zip(mine, alone[k], strict=True):
            _same(a, b)


def test_a_bad_read_in_a_padded_batch_fails_its_stream_alone(tiny_llama: Path) -> None:
    """A token id past the vocabulary breaks the padded forward: the batch is rerun stream by
    stream, that stream alone gets the error, and the others' reads, then and after (their
    caches untouched by the failed forward's writes), are their reads alone."""
    plain, batched = _pair(tiny_llama, 4096)
    picked = (0, 1, 3)  # texts of 9 tokens at least
    tokens = [plain.tokenizer.tokenize(TEXTS[k])[:9] for k in picked]
    bad = [TokenSpan(0, 1, plain.hf_tokenizer.vocab_size + 1000), *tokens[1][1:6]]
    streams = [batched.start([{"role": "user", "content": PROMPTS[k]}], NEEDS) for k in picked]
    with batched.hold():
        futures = [batched.submit(streams[0], tokens[0][:6], NEEDS),
                   batched.submit(streams[1], bad, NEEDS),
                   batched.submit(streams[2], tokens[2][:6], NEEDS)]
    with pytest.raises(IndexError):
        futures[1].result(timeout=60)
    assert batched.stats.split >= 1
    for k in (0, 2):
        want = _alone(plain, PROMPTS[picked[k]], tokens[k], 6)
        _same(futures[k].result(timeout=60), want[0])
        _same(batched.extend(streams[k], tokens[k][6:], NEEDS), want[1])


def test_released_slots_are_reused_and_freed(tiny_llama: Path) -> None:
    """Streams released mid-run give their slots back: a new stream (same conversation as a
    live one, its context reused from the prefix cache) takes the lowest free slot, where an old
    stream's keys lie past its own, and reads beside a stream in a slot apart (a batch of slots
    not side by side) what it reads alone; the pool's memory goes when its last stream does."""
    plain, batched = _pair(tiny_llama, 4096)
    tokens = [plain.tokenizer.tokenize(t) for t in TEXTS]
    streams = {k: batched.start([{"role": "user", "content": PROMPTS[k]}], NEEDS)
               for k in range(4)}
    _rounds(batched, streams, tokens, [5, 5, 5, 5])
    pool = streams[0].state.kv.pool
    assert pool.nbytes() > 0
    for k in (0, 1, 2):
        batched.release(streams.pop(k))
    again = batched.start([{"role": "user", "content": PROMPTS[3]}], NEEDS)
    sizes = [3, 3, 3, 4]
    together = _rounds(batched, {0: again, 3: streams[3]}, [tokens[4], [], [], tokens[4]],
                       sizes)
    assert again.state.kv.slot == 0 and streams[3].state.kv.slot == 3
    assert batched.inner.prefix.hits >= 1
    state = plain.start([{"role": "user", "content": PROMPTS[3]}], NEEDS)
    plain.extend(state, tokens[3], NEEDS)
    want3 = [plain.extend(state, tokens[4][i:i + 4], NEEDS) for i in range(0, len(tokens[4]), 4)]
    for a, b in zip(together[0], _alone(plain, PROMPTS[3], tokens[4], 3), strict=True):
        _same(a, b)
    for a, b in zip(together[3], want3, strict=True):
        _same(a, b)
    batched.release(again)
    batched.release(streams.pop(3))
    assert batched.cached_tokens() == 0 and pool.nbytes() == 0


def test_rows_without_logits_beside_rows_with_them(tiny_llama: Path) -> None:
    """One stream reads a layer only, another logits and top-k: one padded forward, and each
    gets exactly what it asked for."""
    plain, batched = _pair(tiny_llama, 4096)
    layer_only = Needs(layers=frozenset({-1}))
    tokens = [plain.tokenizer.tokenize(t)[:8] for t in TEXTS[:2]]
    a = batched.start([{"role": "user", "content": PROMPTS[0]}], layer_only)
    b = batched.start([{"role": "user", "content": PROMPTS[1]}], NEEDS)
    with batched.hold():
        fa = batched.submit(a, tokens[0], layer_only)
        fb = batched.submit(b, tokens[1], NEEDS)
    got_a, got_b = fa.result(timeout=60), fb.result(timeout=60)
    assert got_a.logits is None and got_a.top_logits is None
    _same(got_a, _alone(plain, PROMPTS[0], tokens[0], 8, layer_only)[0])
    _same(got_b, _alone(plain, PROMPTS[1], tokens[1], 8)[0])
    assert batched.stats.padded >= 1


@pytest.mark.parametrize("on_error", ["fail_closed", "fail_open"])
def test_guard_sessions_on_the_padded_path_release_and_halt_as_alone(tiny_llama: Path,
                                                                     on_error: str) -> None:
    """Five sessions on one Guard whose observer takes the padded path, fed from five threads,
    one of them with a word whose read breaks the batched forward: that session follows
    on_error; the other four release, halt, flag and score as each does alone on the CPU's
    default observer (the last one halts on 'bomb')."""
    from guardrail import Guard
    from guardrail.events import Error
    from guardrail.testing import plugin_monitors

    from .test_batch import (
        POLICY,
        STREAM_TEXTS,
        NormMonitor,
        WordMonitor,
        _concurrently,
        _PoisonTokenizer,
        _scores_close,
        _seen,
        _stream,
        _Unbatched,
    )

    policy = {**POLICY, "on_error": on_error}
    texts = list(STREAM_TEXTS)
    texts[1] = "It was poison, said the man, and he left the room without a word."
    plain, batched = _pair(tiny_llama, 4096)
    batched.tokenizer = _PoisonTokenizer(plain.tokenizer, plain.hf_tokenizer.vocab_size + 1000)
    with plugin_monitors(norm=NormMonitor, word=WordMonitor) as host:
        alone_guard = Guard.from_policy(policy, host=host, observer=_Unbatched(plain))
        alone = [_stream(alone_guard, k) for k in range(len(PROMPTS))]
        guard = Guard.from_policy(policy, host=host, observer=batched)
        together = _concurrently(guard, 2 * len(PROMPTS), texts)
    assert batched.stats.padded >= 1 and batched.stats.split >= 1
    events, report = together[1]
    assert [e.outcome for e in events if isinstance(e, Error)] == (
        [on_error] * (1 if on_error == "fail_closed" else 2))
    assert report.halted == (on_error == "fail_closed")
    for k in (0, 2, 3, 4):
        assert _seen(*together[k]) == _seen(*alone[k])
        _scores_close(together[k][1], alone[k][1])
    assert together[4][1].halted and batched.live_streams() == 0
