"""The Llama step on packed projections (the default for Llama-family float32 observers on the
CPU): its states and logits equal the Hugging Face model's forward, read whole, and the default
guard's verdicts and scores are the same with it as with the model's own projections."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from guardrail.monitor import Needs
from guardrail.observer.hf import load_model_dir

from .streams import VERDICT_ANSWERS, read_in_steps, verdicts

# float32 products (observer.options.matmul), so reads compare with the HF forward tightly
EXACT = {"matmul": "float32"}

TEXT = ("The capital of France is Paris. Marie Curie was born in Warsaw in 1867 and won two "
        "Nobel prizes. Café 🙂 déjà vu. ") * 2
MESSAGES = [{"role": "user", "content": "Who was Marie Curie?"}]
# The router reads the top 100 logits (tens of units, float32 noise about 1e-4): its score moved
# by up to 2e-5 here, where a read per delta instead of reads when due already moves it by 7e-6.
TOLERANCE = {"router": 5e-5}


def _reference(observer: Any, ids: list[int], context: list[int]) -> tuple[Any, Any]:
    """The HF model's hidden states and logits over context + response, read in one forward."""
    with torch.inference_mode():
        out = observer.model(torch.tensor([context + ids]), output_hidden_states=True)
    n = len(context)
    return [h[0, n:] for h in out.hidden_states], out.logits[0, n:]


def _check(observer: Any, layers: set[int], tol: float) -> None:
    needs = Needs(layers=frozenset(layers), logits=True, top_k=5)
    tokens = observer.tokenizer.tokenize(TEXT)
    ref_hidden, ref_logits = _reference(observer, [t.id for t in tokens],
                                        observer.context_ids(MESSAGES))
    for step in (1, 2, 9):  # 1 and 2: products padded to four rows (llama_step.MIN_ROWS)
        hidden, logits = read_in_steps(observer, MESSAGES, needs, tokens, step)
        for layer in layers:
            want = ref_hidden[observer.hidden_index(layer)]
            assert torch.allclose(hidden[layer], want, atol=tol, rtol=tol), (layer, step)
        assert torch.allclose(logits, ref_logits, atol=tol, rtol=tol), step


def test_llama_observers_on_the_cpu_read_with_packed_projections(tiny_llama: Path,
                                                                 tiny_gpt2: Path) -> None:
    llama = load_model_dir(tiny_llama, name="tiny-llama", window=4096, options=EXACT)
    assert llama.packed is not None
    assert len(llama.packed.blocks) == llama.num_layers
    # bfloat16 weights and non-Llama models keep the model's own projections
    assert load_model_dir(tiny_llama, name="tiny-llama", window=4096,
                          options={"dtype": "bfloat16"}).packed is None
    assert load_model_dir(tiny_gpt2, name="tiny-gpt2", window=256).packed is None


def test_packed_step_equals_the_hf_forward_on_a_tiny_llama(tiny_llama: Path) -> None:
    observer = load_model_dir(tiny_llama, name="tiny-llama", window=4096, options=EXACT)
    assert observer.packed is not None
    _check(observer, {0, 1, 2, -1}, 1e-5)


def test_unbatched_packed_step_equals_the_model_projections(tiny_llama: Path) -> None:
    """``TorchObserver.extend`` (the step outside the scheduler) on packed weights and on the
    model's own modules give the same rows."""
    observer = load_model_dir(tiny_llama, name="tiny-llama", window=4096, options=EXACT)
    needs = Needs(layers=frozenset({1, -1}), logits=True, top_k=5)
    tokens = observer.tokenizer.tokenize(TEXT)
    outs = []
    for packed in (observer.packed, None):
        observer.packed, observer._steps = packed, {}
        state = observer.start(MESSAGES, needs)
        outs.append([observer.extend(state, tokens[i:i + 7], needs)
                     for i in range(0, len(tokens), 7)])
    for fast, plain in zip(*outs, strict=True):
        assert torch.allclose(fast.logits, plain.logits, atol=1e-5, rtol=1e-5)
        for layer in needs.layers:
            assert torch.allclose(fast.hidden[layer], plain.hidden[layer], atol=1e-5, rtol=1e-5)


@pytest.mark.real_model
def test_packed_step_equals_the_hf_forward_on_smollm2() -> None:
    from guardrail.observer.hf import load_smollm2, smollm2_gguf
    from guardrail.policy import ObserverSpec

    try:
        smollm2_gguf()
    except Exception as exc:  # noqa: BLE001 - the wheel is optional on a dev machine
        pytest.skip(str(exc))
    observer = load_smollm2(ObserverSpec(window=512, options=EXACT))
    assert observer.packed is not None
    # float32 noise over 30 blocks: logits are tens of units, states up to hundreds
    _check(observer, {6, 15, -1}, 1e-3)


@pytest.mark.real_model
def test_default_guard_scores_and_verdicts_are_the_same_on_packed_projections() -> None:
    """The default policy's guard on packed float32 products, on its default products
    (q4_1_tail_q8, q4_1 or float16 where the CPU runs them) and on the model's own projections:
    float32 packed gives the same releases, flags and halts and scores to float noise; the
    default the same releases and harm verdicts, scores within the int8 tail's drift (harm
    0.01, facts 0.02, router 0.15: it reads the last layer and the logits, and a router flag
    may move)."""
    from guardrail import Guard
    from guardrail.guard import default_policy

    policy = default_policy()
    assert policy.observer is not None
    exact = policy.observer.model_copy(update={"options": {**policy.observer.options,
                                                           **EXACT}})
    guards = {"default": Guard.default(),
              "float32": Guard(policy.model_copy(update={"observer": exact}))}
    assert guards["float32"].observer.inner.packed is not None
    texts = [TEXT, *VERDICT_ANSWERS]
    got = {name: [verdicts(guard, t) for t in texts] for name, guard in guards.items()}
    guards["float32"].observer.inner.packed = None  # the model's own projections
    plain = [verdicts(guards["float32"], t) for t in texts]
    drift = {"harm": 0.01, "facts": 0.02, "router": 0.15}
    for name, tolerance in (("float32", TOLERANCE), ("default", drift)):
        for (events, scores), (events0, scores0) in zip(got[name], plain, strict=True):
            if name == "float32":
                assert events == events0, name
            else:
                assert [e for e in events if e[2] != "router"] == \
                    [e for e in events0 if e[2] != "router"]
            assert scores.keys() == scores0.keys()
            for monitor, rows in scores.items():
                assert [i for i, _ in rows] == [i for i, _ in scores0[monitor]], monitor
                for (_, a), (_, b) in zip(rows, scores0[monitor], strict=True):
                    assert abs(a - b) <= tolerance.get(monitor, 1e-5), (name, monitor, a, b)
