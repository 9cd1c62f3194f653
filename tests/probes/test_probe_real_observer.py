"""The feature cache and probes on the real Hugging Face observer over a tiny random Llama."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from guardrail.observer.hf import load_model_dir  # noqa: E402
from guardrail.probes.heads import LinearProbe  # noqa: E402
from guardrail.probes.io import ProbeFileError, load_paper_probe, load_probe, save_probe  # noqa: E402
from guardrail.testing.tiny_models import build_tiny_model  # noqa: E402
from guardrail.toolkit.features import extract_features  # noqa: E402
from guardrail.toolkit.train import entity_loss, score_records, train_head  # noqa: E402

RECORDS = [
    {"prompt": "Tell me about Marie Curie.",
     "response": "Marie Curie was born in Warsaw in 1867 and won two Nobel prizes.",
     "spans": [{"start": 24, "end": 30, "label": 0}, {"start": 34, "end": 38, "label": 1}]},
    {"prompt": "Capital of France?", "response": "The capital of France is Paris.",
     "spans": [{"start": 25, "end": 30, "label": 0}]},
    {"prompt": "Café?", "response": "Café, naïve, résumé: 東京 is Tokyo 🙂.", "label": 0},
]


@pytest.fixture(scope="module")
def tiny_observer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = build_tiny_model(tmp_path_factory.mktemp("models") / "llama", arch="llama")
    return load_model_dir(path, name="tiny-llama", window=4096)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    return path


def test_cached_states_and_surprisal_match_a_full_forward(tiny_observer: Any, data: Path,
                                                          tmp_path: Path) -> None:
    fs = extract_features(tiny_observer, data, tmp_path / "cache", layers=[1], top_k=5,
                          stats=True, dtype="float32", chunk_size=4, progress=False)
    model = tiny_observer.model
    for r in fs:
        context = tiny_observer.context_ids([{"role": "user", "content": r.prompt}])
        ids = context + r.ids.tolist()
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
        n = len(context)
        full_state = out.hidden_states[2][0, n:]  # after block 1
        assert torch.allclose(r.hidden[1], full_state, atol=1e-4)
        logp = torch.log_softmax(out.logits[0].float(), -1)
        expected = torch.tensor([-logp[n + i - 1, ids[n + i]] for i in range(len(r))])
        # The first response token is read from the context's last prediction, which the
        # observer does not return: its surprisal is NaN.
        assert r.surprisal is not None and torch.isnan(r.surprisal[0])
        assert torch.allclose(r.surprisal[1:], expected[1:], atol=1e-4)
        assert r.top_ids is not None and torch.equal(r.top_ids[:, 0], out.logits[0, n:].argmax(-1))
        # Offsets cover the response end to end (multi-byte characters included).
        assert r.offsets[-1, 1].item() == len(r.response)


def test_probe_trains_saves_and_loads_against_the_observer(tiny_observer: Any, data: Path,
                                                           tmp_path: Path) -> None:
    fs = extract_features(tiny_observer, data, tmp_path / "cache", layers=[2], progress=False)
    result = train_head(LinearProbe(tiny_observer.hidden_size), fs.records, [], layer=2,
                        loss_fn=entity_loss(), epochs=1, progress=False)
    save_probe(tmp_path / "probe", result.head, {"base_model": "tiny-llama", "layer": 2})
    loaded = load_probe(tmp_path / "probe", observer=tiny_observer)
    assert score_records(loaded.head, fs.records, 2) == score_records(result.head, fs.records, 2)
    small = LinearProbe(8)
    save_probe(tmp_path / "small", small, {"layer": 2})
    with pytest.raises(ProbeFileError, match="hidden size 8 but observer 'tiny-llama' has"):
        load_probe(tmp_path / "small", observer=tiny_observer)


def test_paper_format_probe_scores_tiny_model_states(tiny_observer: Any, data: Path,
                                                     tmp_path: Path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    linear = torch.nn.Linear(tiny_observer.hidden_size, 1)
    directory = tmp_path / "paper"
    directory.mkdir()
    (directory / "probe_config.json").write_text(json.dumps(
        {"layer_idx": 3, "hidden_size": tiny_observer.hidden_size,
         "target_layer_name": "LlamaDecoderLayer"}))
    save_file(dict(linear.state_dict()), str(directory / "probe_head.safetensors"))
    loaded = load_paper_probe(directory, observer=tiny_observer)
    assert loaded.layer is not None
    fs = extract_features(tiny_observer, data, tmp_path / "cache", layers=[loaded.layer],
                          dtype="float32", progress=False)
    scores = score_records(loaded.head, fs.records, loaded.layer)
    with torch.no_grad():
        expected = torch.sigmoid(linear(fs[0].hidden[3])).squeeze(-1)
    assert torch.allclose(torch.tensor(scores[0]), expected, atol=1e-6)
