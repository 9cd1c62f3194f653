"""The observer shard of guardrail serve --ray, run in this process (no Ray instance; a batch is
handed to it as ``@serve.batch`` hands it one): each stream of a batch gets its own rows, one
stream's failing read fails only that stream, a stream the replica does not hold is reported
lost, and closing frees the stream."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("ray.serve", reason="guardrail serve --ray needs ray[serve] "
                    "(pip install 'guardrail-server[ray]')")

from guardrail_server.ray import ObserverShard

from guardrail import Needs
from guardrail.observer.hf import load_model_dir
from guardrail.stream import TokenSpan
from guardrail.testing.tiny_models import build_tiny_model

NEEDS = Needs(layers=frozenset({1}))
CHAT = [{"role": "user", "content": "Tell me about Paris."}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("shard") / "llama", arch="llama")


def _shard(tiny: Path, **settings: Any) -> ObserverShard:
    return ObserverShard({"model": str(tiny), "window": 256}, settings)


def test_reads_gathered_in_one_batch_are_each_streams_own(tiny: Path) -> None:
    shard = _shard(tiny)
    alone = load_model_dir(tiny, name="tiny", window=256)
    texts = ["The capital of France is Paris.", "Once upon a time there was a robot.",
             "Mix flour, water, salt and yeast."]

    async def run() -> list[Any]:
        for i in range(3):
            assert (await shard.open(f"s{i}", CHAT, NEEDS)).error is None
        return shard._read_all([(f"s{i}", alone.tokenizer.tokenize(t), NEEDS)
                                for i, t in enumerate(texts)])

    replies = asyncio.run(run())
    for text, reply in zip(texts, replies, strict=True):
        assert reply.error is None
        state = alone.start(CHAT, NEEDS)
        want = alone.extend(state, alone.tokenizer.tokenize(text), NEEDS)
        assert torch.allclose(reply.value.hidden[1], want.hidden[1], atol=1e-5)


def test_a_failing_read_fails_only_its_stream(tiny: Path) -> None:
    shard = _shard(tiny)
    alone = load_model_dir(tiny, name="tiny", window=256)
    good = alone.tokenizer.tokenize("The river flows north.")
    bad = [TokenSpan(0, 3, None)]  # a token without an id: the observer refuses it

    async def run() -> list[Any]:
        await shard.open("a", CHAT, NEEDS)
        await shard.open("b", CHAT, NEEDS)
        return shard._read_all([("a", bad, NEEDS), ("b", good, NEEDS)])

    failed, fine = asyncio.run(run())
    assert failed.error is not None and "ObserverError" in failed.error and not failed.lost
    assert fine.error is None and fine.value.hidden[1].shape[0] == len(good)


def test_a_stream_the_replica_does_not_hold_is_lost_and_closing_frees_it(tiny: Path) -> None:
    shard = _shard(tiny, max_streams=1)
    alone = load_model_dir(tiny, name="tiny", window=256)
    tokens = alone.tokenizer.tokenize("Hello there.")

    async def run() -> tuple[Any, ...]:
        opened = await shard.open("a", CHAT, NEEDS)
        refused = await shard.open("b", CHAT, NEEDS)  # max_streams=1
        restarted = await shard.read("a", "an-older-incarnation", tokens, NEEDS)
        shard.close("a")
        closed = await shard.read("a", opened.value, tokens, NEEDS)
        reopened = await shard.open("b", CHAT, NEEDS)
        return refused, restarted, closed, reopened

    refused, restarted, closed, reopened = asyncio.run(run())
    assert refused.full and "full" in (refused.error or "")
    assert restarted.lost and "restarted" in (restarted.error or "")
    assert closed.lost and shard.stats()["streams"] == 1 and reopened.error is None
