"""Models on a GPU: ``observer.options.device`` and ``LocalGenerator(device=...)``.

The option checks run everywhere. The tests marked ``cuda`` run only where torch sees a CUDA GPU
(CI has none; they were run on a lent H100, see docs/observer.md): the same tiny random models
on the GPU give the CPU's states, logits, text and halts, and the monitors always get CPU rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from guardrail import Features, Guard, GuardrailError, Halt, Monitor, Needs, ObserverError, Score
from guardrail.observer.batch import BatchedObserver
from guardrail.observer.hf import load_model_dir, resolve_device
from guardrail.stream import TokenSpan
from guardrail.testing import plugin_monitors, split_text

from .streams import alone_and_together

MESSAGES = [{"role": "user", "content": "Tell me some facts."}]
TEXT = "The capital of France is Paris. Marie Curie was born in Warsaw in 1867. Café 🙂."
NEEDS = Needs(layers=frozenset({0, 2, -1}), logits=True, top_k=3)
HAS_CUDA = torch.cuda.is_available()
cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
# GPU kernels (TF32 off by default, other reduction orders) differ from the CPU's in the last bits.
TOL = 2e-4


# -- the option, everywhere ----------------------------------------------------------------------


def test_device_defaults_to_the_cpu() -> None:
    assert resolve_device("m", None) == torch.device("cpu")
    assert resolve_device("m", "cpu") == torch.device("cpu")
    assert resolve_device("m", "auto") == torch.device("cuda" if HAS_CUDA else "cpu")


def test_an_unknown_device_names_the_option() -> None:
    with pytest.raises(ObserverError, match=r"observer.options.device 'gpu0' is not a device"):
        resolve_device("m", "gpu0")


@pytest.mark.skipif(HAS_CUDA, reason="this machine has a CUDA GPU")
def test_cuda_without_a_gpu_is_a_clear_error(tiny_llama: Path) -> None:
    with pytest.raises(ObserverError, match="torch sees no CUDA GPU"):
        load_model_dir(tiny_llama, name="tiny", window=64, options={"device": "cuda"})


def test_a_cpu_only_backend_refuses_a_gpu_device(tiny_llama: Path) -> None:
    device = "cuda" if HAS_CUDA else "cpu"
    if not HAS_CUDA:  # any device but the CPU will do: the check comes before the model loads
        device = "meta"
    with pytest.raises(ObserverError, match="onnx backend runs on the CPU"):
        load_model_dir(tiny_llama, name="tiny", window=64, backend="onnx",
                       options={"device": device})


def test_a_loaded_model_is_not_moved_for_the_user(tiny_llama: Path) -> None:
    from guardrail_transformers import LocalGenerator

    obs = load_model_dir(tiny_llama, name="tiny", window=64)
    with pytest.raises(GuardrailError, match=r"model.to\(device\)"):
        LocalGenerator(obs.model, obs.hf_tokenizer, device="cuda")


# -- on a GPU --------------------------------------------------------------------------------


def _read(obs: Any, chunk: int) -> dict[str, torch.Tensor]:
    state = obs.start(MESSAGES, NEEDS)
    tokens = obs.tokenizer.tokenize(TEXT)
    batches = [obs.extend(state, tokens[i:i + chunk], NEEDS) for i in range(0, len(tokens), chunk)]
    out = {f"hidden{k}": torch.cat([b.hidden[k] for b in batches]) for k in NEEDS.layers}
    out["logits"] = torch.cat([b.logits for b in batches])
    out["top"] = torch.cat([b.top_logits for b in batches])
    return out


@cuda
@pytest.mark.parametrize("chunk", [1, 5])
def test_an_observer_on_the_gpu_reads_what_the_cpu_one_reads(tiny_path: Path,
                                                             chunk: int) -> None:
    cpu = _read(load_model_dir(tiny_path, name="tiny", window=256), chunk)
    gpu_obs = load_model_dir(tiny_path, name="tiny", window=256, options={"device": "cuda"})
    assert next(gpu_obs.model.parameters()).is_cuda
    gpu = _read(gpu_obs, chunk)
    for key, want in cpu.items():
        assert gpu[key].device.type == "cpu", key  # monitors get CPU rows
        torch.testing.assert_close(gpu[key], want, atol=TOL, rtol=TOL)


@cuda
def test_a_gpu_observer_survives_window_drops_and_truncation(tiny_llama: Path) -> None:
    results = []
    for options in ({}, {"device": "cuda"}):
        obs = load_model_dir(tiny_llama, name="tiny", window=24, options=options)
        state = obs.start(MESSAGES, NEEDS)
        tokens = obs.tokenizer.tokenize(TEXT * 3)
        first = obs.extend(state, tokens[:30], NEEDS)
        obs.truncate(state, 10)
        again = obs.extend(state, tokens[10:40], NEEDS)
        results.append((first.hidden[-1], again.hidden[-1], again.logits))
    for cpu, gpu in zip(*results, strict=True):
        torch.testing.assert_close(gpu, cpu, atol=TOL, rtol=TOL)


class StateNorm(Monitor):
    """Halts-worthy score on every token whose layer-1 row is a real CPU state."""

    def needs(self) -> Needs:
        return Needs(layers=frozenset({1}))

    def update(self, state: Any, features: Features) -> Sequence[Score]:
        rows = features.hidden[1]
        assert isinstance(rows, torch.Tensor) and rows.device.type == "cpu"
        return [Score(i, float(r.norm() > 0)) for i, r in zip(features.indices, rows, strict=True)]


@cuda
def test_a_policy_puts_the_observer_on_the_gpu(tiny_llama: Path) -> None:
    policy = {
        "observer": {"model": str(tiny_llama), "window": 128, "options": {"device": "cuda"}},
        "monitors": [{"id": "norm", "use": "state-norm", "threshold": 0.5,
                      "rule": {"kind": "count", "k": 3}, "action": "halt"}],
    }
    with plugin_monitors(state_norm=lambda: StateNorm()) as host:
        guard = Guard.from_policy(policy, host=host)
        assert next(guard.observer.model.parameters()).is_cuda
        session = guard.session(prompt="Tell me about Paris.")
        events = [e for d in split_text(TEXT, [4]) for e in session.feed(d)]
        report = session.finish()
    halts = [e for e in [*events, *report.final_events] if isinstance(e, Halt)]
    assert len(halts) == 1 and halts[0].at == 2


class FireAt(Monitor):
    def update(self, state: Any, features: Features) -> Sequence[Score]:
        return [Score(i, float(i == 5)) for i in features.indices]


@cuda
def test_a_generator_on_the_gpu_writes_and_halts_as_on_the_cpu(tiny_llama: Path) -> None:
    from guardrail_transformers import LocalGenerator, guarded_generate

    cpu = LocalGenerator(tiny_llama)
    gpu = LocalGenerator(tiny_llama, device="cuda")
    assert next(gpu.model.parameters()).is_cuda
    needs = Needs(layers=frozenset({1, -1}), logits=True)
    cpu_steps = list(cpu.steps("The capital of France is", needs=needs, max_new_tokens=12))
    gpu_steps = list(gpu.steps("The capital of France is", needs=needs, max_new_tokens=12))
    assert [s.text for s in gpu_steps] == [s.text for s in cpu_steps]  # greedy: same tokens
    for a, b in zip(gpu_steps, cpu_steps, strict=True):
        assert a.hidden is not None and b.hidden is not None and a.logits is not None
        assert a.hidden[1].device.type == "cpu" and a.logits.device.type == "cpu"
        torch.testing.assert_close(a.hidden[-1], b.hidden[-1], atol=TOL, rtol=TOL)
    policy = {"monitors": [{"id": "stop", "use": "fire-at", "action": "halt",
                            "message": "Stopped."}], "release": {"hold_back_tokens": 2}}
    outs = []
    for gen in (cpu, gpu):
        with plugin_monitors(fire_at=lambda: FireAt()) as host:
            outs.append(guarded_generate(Guard.from_policy(policy, host=host),
                                         "The capital of France is", generator=gen,
                                         max_new_tokens=12, temperature=1.0, seed=7))
    assert outs[1].halted and outs[1].report.halt is not None and outs[1].report.halt.at == 5
    assert outs[1].text.endswith("Stopped.")


@cuda
def test_routing_between_two_gpu_generators(tiny_llama: Path) -> None:
    from guardrail_transformers import LocalGenerator, guarded_stream

    small = LocalGenerator(tiny_llama, device="cuda")
    large = LocalGenerator(tiny_llama, device="cuda")
    large.model.model.norm.weight.data.mul_(-1)  # so it disagrees with the small model
    policy = {"monitors": [{"id": "stop", "use": "fire-at", "action": "route",
                            "route_to": {"base_url": "http://unused", "model": "large"}}],
              "release": {"hold_back_tokens": 2}}
    with plugin_monitors(fire_at=lambda: FireAt()) as host:
        stream = guarded_stream(Guard.from_policy(policy, host=host), "The capital of France is",
                                generator=small, route_to={"large": large}, max_new_tokens=10)
        list(stream)
    assert stream.routed_tokens == [5] and stream.report is not None
    assert not stream.report.halted


# -- the Guard's batched observer on a GPU -------------------------------------------------------


def _rows(batch: Any) -> dict[str, torch.Tensor]:
    out = {f"hidden{k}": v for k, v in batch.hidden.items()}
    out["logits"], out["top"] = batch.logits, batch.top_logits
    return out


@cuda
@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("window", [256, 24])
def test_streams_batched_on_the_gpu_read_what_each_reads_alone_on_the_cpu(tiny_llama: Path,
                                                                          window: int,
                                                                          padded: bool) -> None:
    """Three streams with chunks of different lengths, each round's chunks in one forward on
    the GPU (the padded one, the GPU's default, or the packed one of the CPU), give each stream
    the CPU's unbatched rows (window 24: old tokens are dropped too)."""
    cpu = load_model_dir(tiny_llama, name="tiny", window=window)
    gpu = load_model_dir(tiny_llama, name="tiny", window=window, options={"device": "cuda"})
    assert gpu.padded
    gpu.padded = padded
    batched = BatchedObserver(gpu)
    prompts = ["Hi.", "Tell me about Paris, please.", "Who was Marie Curie?"]
    tokens = cpu.tokenizer.tokenize(TEXT)
    sizes = [1, 3, 5]
    alone, together = alone_and_together(cpu, batched, NEEDS, prompts, [tokens] * len(prompts),
                                         sizes)
    assert batched.stats.largest == len(prompts)  # the rounds shared forwards
    assert (batched.stats.padded > 0) == padded
    for mine, theirs in zip(together, alone, strict=True):
        for a, b in zip(mine, theirs, strict=True):
            got, want = _rows(a), _rows(b)
            for key in want:
                assert got[key].device.type == "cpu", key
                torch.testing.assert_close(got[key], want[key], atol=TOL, rtol=TOL)


@cuda
def test_a_bad_token_id_on_the_gpu_fails_its_stream_and_no_other(tiny_llama: Path) -> None:
    """An id past the embedding would be a device-side assert on the GPU, breaking every read
    after it: it is refused before the forward, naming the id, and the other streams of its
    batch, and every later read, get their rows."""
    plain = load_model_dir(tiny_llama, name="tiny", window=256, options={"device": "cuda"})
    batched = BatchedObserver(plain)
    tokens = plain.tokenizer.tokenize(TEXT)[:6]
    bad = [TokenSpan(0, 1, plain.hf_tokenizer.vocab_size + 1000), *tokens[1:]]
    streams = [batched.start(MESSAGES, NEEDS) for _ in range(3)]
    with batched.hold():
        futures = [batched.submit(streams[0], tokens, NEEDS),
                   batched.submit(streams[1], bad, NEEDS),
                   batched.submit(streams[2], tokens, NEEDS)]
    with pytest.raises(ObserverError, match="outside its vocabulary"):
        futures[1].result(timeout=60)
    cpu = load_model_dir(tiny_llama, name="tiny", window=256)
    state = cpu.start(MESSAGES, NEEDS)
    want = _rows(cpu.extend(state, tokens, NEEDS))
    for k in (0, 2):
        got = _rows(futures[k].result(timeout=60))
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=TOL, rtol=TOL)
    assert batched.stats.padded >= 1  # the GPU's batched path
    # a stream's own (unbatched) read refuses it too; the GPU reads on
    alone = plain.start(MESSAGES, NEEDS)
    with pytest.raises(ObserverError, match="outside its vocabulary"):
        plain.extend(alone, bad, NEEDS)
    nxt = plain.tokenizer.tokenize(TEXT)[6:9]
    got = _rows(batched.extend(streams[0], nxt, NEEDS))
    want = _rows(cpu.extend(state, nxt, NEEDS))
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=TOL, rtol=TOL)
