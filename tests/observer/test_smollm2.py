"""The real embedded observer, SmolLM2-135M-Instruct (converted once into the cache)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from guardrail.monitor import Needs
from guardrail.policy import ObserverSpec

pytestmark = pytest.mark.real_model

TEXT = "Marie Curie was born in Warsaw in 1867. She won two Nobel prizes, in physics and chemistry."


@pytest.fixture(scope="module")
def smollm2() -> Any:
    from guardrail.observer.hf import load_smollm2, smollm2_gguf

    try:
        smollm2_gguf()
    except Exception as exc:  # noqa: BLE001 - the wheel is optional on a dev machine
        pytest.skip(str(exc))
    # float32 products: states compared with the HF forward's
    return load_smollm2(ObserverSpec(window=512, options={"matmul": "float32"}))


def test_smollm2_shape_and_incremental_states(smollm2: Any) -> None:
    assert (smollm2.num_layers, smollm2.hidden_size) == (30, 576)
    needs = Needs(layers=frozenset({15, -1}), top_k=5)
    messages = [{"role": "user", "content": "Who was Marie Curie?"}]
    tokens = smollm2.tokenizer.tokenize(TEXT)
    assert smollm2.tokenizer.hf.decode([t.id for t in tokens]) == TEXT
    state = smollm2.start(messages, needs)
    rows = [smollm2.extend(state, tokens[i:i + 4], needs) for i in range(0, len(tokens), 4)]
    mid = torch.cat([r.hidden[15] for r in rows])
    context = smollm2.context_ids(messages)
    with torch.inference_mode():
        ref = smollm2.model(torch.tensor([context + [t.id for t in tokens]]),
                            output_hidden_states=True)
    torch.testing.assert_close(mid, ref.hidden_states[16][0, len(context):], atol=2e-3, rtol=2e-3)
    top = torch.cat([r.top_logits for r in rows])
    assert top.shape == (len(tokens), 5)
    # The model knows where the text is going: after "won two Nobel" comes " prizes".
    nobel = next(i for i, t in enumerate(tokens) if TEXT[t.start:t.end] == " Nobel")
    with torch.inference_mode():
        head = smollm2.model.get_output_embeddings()
        logits = head(ref.hidden_states[-1][0, len(context) + nobel])
    predicted = smollm2.tokenizer.hf.decode([int(logits.argmax())])
    assert predicted.strip().lower().startswith("p")  # " prizes" or " Prize"


def test_smollm2_streamed_deltas_give_the_whole_texts_tokens(smollm2: Any) -> None:
    from guardrail.stream import Aligner

    for size in (1, 3, 7):
        aligner = Aligner(smollm2.tokenizer)
        ids = []
        for i in range(0, len(TEXT), size):
            ids += [t.id for t in aligner.feed(TEXT[i:i + size])]
        ids += [t.id for t in aligner.flush()]
        assert ids == smollm2.tokenizer.encode(TEXT)
