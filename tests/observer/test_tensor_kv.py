"""The torch KV cache's views (``TensorKV.tensors``, made once per change of the cache) always show
what the buffers hold: after appends, growth, drops and crops, and through a batched stream that
outgrows its window."""

from __future__ import annotations

from pathlib import Path

import torch

from guardrail.monitor import Needs
from guardrail.observer.batch import BatchedObserver
from guardrail.observer.hf import load_model_dir
from guardrail.observer.model import GROW, TensorKV

TEXT = ("The capital of France is Paris. Marie Curie was born in Warsaw in 1867 and won two "
        "Nobel prizes. The river Seine runs through the city and under many old bridges. ")


def _expect(kv: TensorKV, rows: list[torch.Tensor]) -> None:
    """Every block's view holds ``rows`` (one ``(1, heads, 1, dim)`` position each), in order."""
    want = torch.cat(rows, 2)
    views = kv.tensors
    assert len(views) == 4 and kv.length() == want.shape[2]
    for k, view in enumerate(views):
        assert torch.equal(view, want + k)


def test_views_follow_appends_growth_drops_and_crops() -> None:
    kv = TensorKV(2, 3, 4, torch.float32, window=None)
    rows: list[torch.Tensor] = []

    def append(n: int) -> None:
        new = [torch.randn(1, 3, 1, 4) for _ in range(n)]
        rows.extend(new)
        block = torch.cat(new, 2)
        kv.append([block + k for k in range(4)])

    append(3)
    _expect(kv, rows)
    assert kv.tensors is kv.tensors  # made once, until the cache changes
    append(GROW)  # past the first buffer: it grows
    _expect(kv, rows)
    kv.drop(1, 5)
    del rows[1:6]
    _expect(kv, rows)
    kv.crop(10)
    del rows[10:]
    _expect(kv, rows)
    append(2)
    _expect(kv, rows)


def test_a_batched_stream_past_its_window_reads_as_unbatched(tiny_llama: Path) -> None:
    """The window drops old positions between reads; the batched forward reads each block's
    cache from the views: the states match the unbatched observer's."""
    needs = Needs(layers=frozenset({1, 2}), logits=True)
    alone = load_model_dir(tiny_llama, name="tiny", window=64)
    batched = BatchedObserver(load_model_dir(tiny_llama, name="tiny", window=64))
    tokens = alone.tokenizer.tokenize(TEXT * 3)
    assert len(tokens) > 2 * 64
    messages = [{"role": "user", "content": "Facts?"}]
    a, b = alone.start(messages, needs), batched.start(messages, needs)
    for i in range(0, len(tokens), 5):
        want = alone.extend(a, tokens[i:i + 5], needs)
        got = batched.extend(b, tokens[i:i + 5], needs)
        for layer in needs.layers:
            torch.testing.assert_close(got.hidden[layer], want.hidden[layer], atol=1e-4,
                                       rtol=1e-4)
        torch.testing.assert_close(got.logits, want.logits, atol=1e-4, rtol=1e-4)
    assert a.dropped > 0
    batched.release(b)
