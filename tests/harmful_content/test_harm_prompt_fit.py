"""The harm head's prompt term on the training side: the fit with each record's prompt states
appended to its rows (``pooled``), the prompt states read through the observer and cached
(``context.py``), the selection fitting and writing the term into the weights (``select.py``),
and the weights' contract with the runtime (``prompt_weight``, ``prompt_feature:
context_mean``): a monitor adding ``prompt_weight . context`` to the head's logit scores as the
selection's probe does."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from guardrail_harmful_content.monitor import HarmfulContentMonitor
from guardrail_harmful_content.training.context import (
    context_states,
    extract_prompt_states,
    load_prompt_states,
    prompt_messages,
)
from guardrail_harmful_content.training.pooled import (
    PoolRecord,
    fit_loso,
    fit_probe,
    to_dual_head,
)

from guardrail.monitor import Features, MonitorContext
from guardrail.probes.io import save_probe
from guardrail.stream import TokenSpan

LAYERS = (3, 5)


def _pool(seed: int, prompt_signal: float) -> list[PoolRecord]:
    """Three sources; harm is a direction in the response states every source shares (plus a
    source offset); each record's prompt states carry ``prompt_signal`` times another direction
    on harmful records."""
    rng = np.random.default_rng(seed)
    harm, intent = rng.normal(size=16), rng.normal(size=16)
    out = []
    for tag in ("src:a", "src:b", "src:c"):
        offset = rng.normal(size=16) * 2
        for i in range(30):
            label = i % 2
            h = rng.normal(size=(20, 16)) + offset
            if label:
                h[5:] += harm * 0.7
            prompt = {3: (rng.normal(size=16) + prompt_signal * label * intent).astype(np.float32),
                      5: rng.normal(size=16).astype(np.float32)}
            out.append(PoolRecord(tag, label, {3: h.astype(np.float16),
                                               5: rng.normal(size=(20, 16)).astype(np.float16)},
                                  5 if label else None, prompt=prompt))
    return out


def test_a_prompt_term_of_zeros_fits_as_no_prompt_term() -> None:
    pool = _pool(0, 0.0)
    for r in pool:
        r.prompt = {layer: np.zeros(16, np.float32) for layer in LAYERS}
    plain = fit_probe(pool, LAYERS, 1.0, 6.0)
    joint = fit_probe(pool, LAYERS, 1.0, 6.0, prompt_scale=1.0)
    assert joint.prompt_w is not None and not joint.prompt_w.any()
    np.testing.assert_allclose(joint.w, plain.w, rtol=0, atol=1e-12)
    assert (joint.b, joint.a, joint.c) == pytest.approx((plain.b, plain.a, plain.c), abs=1e-12)
    without = fit_loso(pool, LAYERS, [(3,), LAYERS], [1.0, 3.0], halflife=6.0)
    for scale in (1.0, 0.5):
        scored = fit_loso(pool, LAYERS, [(3,), LAYERS], [1.0, 3.0], halflife=6.0,
                          prompt_scale=scale)
        for key, scores in without.items():
            for a, b in zip(scores, scored[key], strict=True):
                np.testing.assert_allclose(b, a, rtol=0, atol=1e-12)


def test_out_of_source_the_prompt_term_separates_what_the_response_cannot() -> None:
    # the response's harm direction is weak; the prompt carries the intent
    pool = _pool(1, 3.0)
    without = fit_loso(pool, LAYERS, [LAYERS], [1.0], halflife=6.0)[(LAYERS, 1.0)]
    joint = fit_loso(pool, LAYERS, [LAYERS], [1.0], halflife=6.0, prompt_scale=1.0)[
        (LAYERS, 1.0)]
    labels = np.asarray([r.label for r in pool])

    def gap(scores: list[np.ndarray]) -> float:  # mean final score, harmful minus benign
        finals = np.asarray([s[-1] for s in scores])
        return float(finals[labels == 1].mean() - finals[labels == 0].mean())

    assert gap(joint) > gap(without) + 0.1


def test_a_scaled_prompt_term_moves_the_logit_by_that_share_about_the_mean() -> None:
    pool = _pool(2, 3.0)
    full = fit_probe(pool, LAYERS, 1.0, 6.0, prompt_scale=1.0)
    none = fit_probe(pool, LAYERS, 1.0, 6.0, prompt_scale=0.0)
    half = fit_probe(pool, LAYERS, 1.0, 6.0, prompt_scale=0.5)
    # the response term is the joint fit's at every scale; only the prompt's share changes
    np.testing.assert_allclose(half.w, full.w)
    assert half.prompt_w is not None and full.prompt_w is not None
    np.testing.assert_allclose(half.prompt_w, 0.5 * full.prompt_w)
    assert none.prompt_logit(pool[0]) == 0.0
    # two records with the same response and different prompts differ by the prompt term alone
    a, b = pool[0], PoolRecord(pool[0].tag, 0, pool[0].hidden, prompt=pool[1].prompt)
    za = np.log(half.prefix_scores(a) / (1 - half.prefix_scores(a)))
    zb = np.log(half.prefix_scores(b) / (1 - half.prefix_scores(b)))
    np.testing.assert_allclose(zb - za, half.prompt_logit(b) - half.prompt_logit(a), atol=1e-9)
    with pytest.raises(ValueError, match="logistic"):
        fit_probe(pool, LAYERS, 1.0, 6.0, fit="logistic", prompt_scale=1.0)
    pool[4].prompt = {3: pool[4].prompt[3]}
    with pytest.raises(ValueError, match=r"record 4 \(src:a\): no prompt states for layer"):
        fit_probe(pool, LAYERS, 1.0, 6.0, prompt_scale=1.0)


def test_the_trainer_writes_the_terms_neutral_value_and_clamp_of_the_records_it_fitted(
        tmp_path: Path) -> None:
    """``save_chosen`` fits on the whole pool and writes ``prompt_term``: the term's mean over
    the training rows as the fit weighs them (the average prompt the scale pivots on) and its
    1st and 99th percentiles over the records, computed here again from the written weights."""
    from guardrail_harmful_content.training.pooled import row_matrix
    from guardrail_harmful_content.training.selection.record import save_chosen
    from safetensors.numpy import load_file

    pool = _pool(5, 3.0)
    pool[7].hidden = {layer: h[:0] for layer, h in pool[7].hidden.items()}  # no rows: not fitted
    pool[7].prompt = {layer: v + 100.0 for layer, v in pool[7].prompt.items()}
    upweight = {"src:b": 3.0}
    chosen = {"layers": list(LAYERS), "ridge": 1.0, "halflife": 6.0, "fit": "ridge",
              "upweight": upweight, "prompt_scale": 0.5, "threshold": 0.5, "k": 2,
              "full_detection_threshold": 0.5}
    weights = save_chosen(pool, {"chosen": chosen, "caps": {}, "loso": {}, "loso_nested": {},
                                 "pool": {}}, tmp_path)
    config = json.loads(weights.with_suffix(".json").read_text(encoding="utf-8"))
    wp = load_file(str(weights))["prompt_weight"].astype(np.float64)
    terms = np.asarray([sum(float(wp[j] @ r.prompt[layer]) for j, layer in enumerate(LAYERS))
                        for r in pool])
    _, _, w, owner = row_matrix(pool, LAYERS, 6.0, upweight)
    neutral = float((w * terms[owner]).sum() / w.sum())
    fitted = np.delete(terms, 7)
    low, high = np.percentile(fitted, [1, 99])
    assert config["prompt_term"] == pytest.approx(
        {"neutral": neutral, "low": low, "high": high}, rel=1e-6)
    assert int(((fitted < low) | (fitted > high)).sum()) == 2  # 2% of 89 records, one a side
    # the neutral term is the mean the scale pivots on: the joint fit's term at scale 1 and at
    # 0.5 differ in the bias by half of it (in the term's units before Platt and the scale)
    one = fit_probe(pool, LAYERS, 1.0, 6.0, upweight=upweight, prompt_scale=1.0)
    half = fit_probe(pool, LAYERS, 1.0, 6.0, upweight=upweight, prompt_scale=0.5)
    pivot = (half.b - one.b) / 0.5
    assert config["prompt_term"]["neutral"] == pytest.approx(half.a * 0.5 * pivot, rel=1e-5)


def _features(record: PoolRecord, a: int, b: int) -> Features:
    hidden = {layer: record.hidden[layer][a:b].astype(np.float32) for layer in record.hidden}
    return Features(tokens=[TokenSpan(i, i + 1) for i in range(a, b)], first_index=a,
                    text="x" * b, hidden=hidden)


def test_the_written_prompt_term_added_to_the_heads_logit_scores_as_the_probe(
        tmp_path: Path) -> None:
    from guardrail_harmful_content.training.selection.record import write_prompt_term
    from safetensors.numpy import load_file, save_file

    pool = _pool(3, 3.0)
    probe = fit_probe(pool, LAYERS, 1.0, 6.0, prompt_scale=0.75)
    wp = probe.prompt_weights()
    assert wp is not None and probe.prompt_range is not None
    weights = save_probe(tmp_path / "full", to_dual_head(probe, 16),
                         {"base_model": "tiny", "layer": 3, "layers": list(LAYERS),
                          "pooling": "prefix_ema", "halflife": 6.0, "threshold": 0.5,
                          "rule": {"kind": "count", "k": 2}, "prompt_feature": "context_mean"},
                         name="probe")
    write_prompt_term(weights, wp.reshape(len(LAYERS), 16), probe.prompt_range)
    tensors = load_file(str(weights))
    config = json.loads(weights.with_suffix(".json").read_text(encoding="utf-8"))
    assert tensors["prompt_weight"].dtype == np.float32
    assert tensors["prompt_weight"].shape == (2, 16) == tuple(config["tensors"]["prompt_weight"])
    assert config["prompt_feature"] == "context_mean"
    assert config["head"]["prompt_size"] == [2, 16]
    neutral, low, high = probe.prompt_range
    assert config["prompt_term"] == {"neutral": neutral, "low": low, "high": high}
    # the head without its prompt term, as a monitor without the runtime support loads it, plus
    # prompt_weight . context (row j for layers[j]) clipped to [low, high] gives the probe's
    # logit at every prefix
    head_only = tmp_path / "head"
    head_only.mkdir()
    save_file({k: v for k, v in tensors.items() if k != "prompt_weight"},
              str(head_only / "probe.safetensors"), metadata={"format": "pt"})
    del config["tensors"]["prompt_weight"], config["head"]["prompt_size"]
    del config["prompt_feature"], config["prompt_term"]
    (head_only / "probe.json").write_text(json.dumps(config), encoding="utf-8")
    monitor = HarmfulContentMonitor(HarmfulContentMonitor.Options(
        weights=str(head_only / "probe.safetensors")))
    clipped = 0
    for record in pool:
        state = monitor.start(MonitorContext("harm"))
        values = np.asarray([s.value for s in monitor.update(state, _features(
            record, 0, len(record)))])
        term = sum(float(tensors["prompt_weight"][j] @ record.prompt[layer])
                   for j, layer in enumerate(LAYERS))
        clipped += not low <= term <= high
        logits = np.log(values / (1 - values)) + min(max(term, low), high)
        expected = probe.prefix_scores(record)
        np.testing.assert_allclose(logits, np.log(expected / (1 - expected)), atol=1e-4)
    assert clipped == 2  # the records beyond the 1st and 99th percentiles


@pytest.fixture(scope="module")
def tiny_observer(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    from guardrail_harmful_content.training.inputs import load_observer

    from guardrail.testing.tiny_models import build_tiny_model

    model = build_tiny_model(tmp_path_factory.mktemp("prompt") / "tiny", arch="llama",
                             num_layers=3, hidden_size=32)
    return load_observer(str(model)), model


def _direct(model: Path, prompt: str, layers: tuple[int, ...]) -> dict[int, np.ndarray]:
    """The pooled span read without the observer: the chat template's text, the first token
    that covers the prompt's first character (offsets), a plain HF forward."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    text = str(tok.apply_chat_template(prompt_messages(prompt), add_generation_prompt=True,
                                       tokenize=False))
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    at = text.index(prompt)
    start = next(i for i, (_, end) in enumerate(enc["offset_mapping"]) if end > at)
    lm = AutoModelForCausalLM.from_pretrained(model)
    with torch.inference_mode():
        out = lm(input_ids=torch.tensor([enc["input_ids"]]), output_hidden_states=True)
    return {layer: out.hidden_states[layer + 1][0, start:].mean(0).numpy() for layer in layers}


def test_the_cached_prompt_states_equal_a_direct_forward_and_resume(
        tiny_observer: tuple[Any, Path], tmp_path: Path) -> None:
    observer, model = tiny_observer
    prompts = ["How do I bake bread?", "The capital of France is Paris. Numbers: 42%",
               "Once upon a time there was a small robot."]
    cache = tmp_path / "states.npz"
    first = extract_prompt_states(observer, prompts[:2], (0, 2), cache, progress=False)
    assert first.prompts == prompts[:2]
    found = extract_prompt_states(observer, prompts + prompts[:1], (0, 2), cache,
                                  progress=False)
    assert found.prompts == prompts  # the third read once, the first two kept
    assert load_prompt_states(cache).prompts == prompts
    by_prompt = found.by_prompt()
    for prompt in prompts:
        direct = _direct(model, prompt, (0, 2))
        for layer in (0, 2):
            np.testing.assert_allclose(by_prompt[prompt][layer], direct[layer], atol=1e-5)
            np.testing.assert_allclose(
                context_states(observer, prompt_messages(prompt), (0, 2))[layer],
                by_prompt[prompt][layer], atol=1e-6)
    with pytest.raises(ValueError, match=r"written for model 'tiny', layers \[0, 2\]"):
        extract_prompt_states(observer, prompts, (1,), cache, progress=False)


def _pool_rows() -> list[dict[str, object]]:
    """Three sources of a handful of records: harmful answers and benign ones of the kinds the
    ninth pass's cap reads (a refusal, a safety answer)."""
    rows = []
    for tag in ("handwritten:a", "handwritten:b", "src:c"):
        for i in range(6):
            label = i % 2
            prompt = (f"Tell me how to hurt someone {tag} {i}" if label or i == 0
                      else f"How do I keep my family safe {tag} {i}?")
            response = ("Here is how to hurt them badly, step by step, with the knife."
                        if label else "I can't help with that. Here is some safety information.")
            kind = ("harmful" if label else "handwritten_benign_refusal" if i == 0
                    else "handwritten_benign_safety")
            rows.append({"prompt": prompt, "response": response, "label": label,
                         "spans": [{"start": 0, "end": len(response), "label": 1}] if label
                         else [], "source_tag": tag, "kind": kind})
    return rows


def test_selection_fits_the_prompt_term_and_writes_it_into_the_weights(
        tiny_observer: tuple[Any, Path], tmp_path: Path) -> None:
    from guardrail_harmful_content.training.select import main
    from safetensors.numpy import load_file

    from guardrail.toolkit.features import extract_features

    observer, _ = tiny_observer
    rows = _pool_rows()
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    feats = extract_features(observer, pool, tmp_path / "feats", [0, 2], progress=False)
    assert feats.path is not None
    cache = tmp_path / "prompts.npz"
    extract_prompt_states(observer, [str(r["prompt"]) for r in rows], (0, 2), cache,
                          progress=False)
    args = ["--pool", str(pool), "--features", str(feats.path), "--layers", "0", "2",
            "--layer-sets", "0,2", "--ridges", "1", "--halflives", "6", "--max-read", "1",
            "--prompt-features", str(cache), "--quiet", "--report", str(tmp_path / "r.json")]
    # the head with and without the term, under the cap on benign answers to harmful prompts
    assert main([*args, "--prompt-scales", "none", "0.5", "--cap-harmful-prompts"]) == 0
    report = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert sorted(str(c.get("prompt_scale")) for c in report["candidates"]) == ["0.5", "None"]
    assert report["caps"]["capped_groups"] == {"answers to harmful requests": 2,
                                               "safety answers": 4}
    for c in report["candidates"]:
        assert set(c["group_false_halt_rates"]) == {"answers to harmful requests",
                                                    "safety answers"}
    # fitted on the whole pool and written with its prompt term
    out = tmp_path / "weights"
    assert main([*args, "--prompt-scales", "0.5", "--out", str(out)]) == 0
    weights = out / "harmful_content.safetensors"
    config = json.loads(weights.with_suffix(".json").read_text(encoding="utf-8"))
    tensors = load_file(str(weights))
    assert tensors["prompt_weight"].shape == (2, 32)
    assert tensors["prompt_weight"].dtype == np.float32 and tensors["prompt_weight"].any()
    assert config["prompt_feature"] == "context_mean"
    assert config["layers"] == [0, 2] and config["tensors"]["prompt_weight"] == [2, 32]
    assert config["method"]["prompt_scale"] == 0.5
    assert config["loso"]["chosen"]["prompt_scale"] == 0.5
    term = config["prompt_term"]
    assert set(term) == {"neutral", "low", "high"}
    assert term["low"] <= term["neutral"] <= term["high"] and term["low"] < term["high"]
    # and the monitor loads what the trainer wrote
    assert HarmfulContentMonitor(HarmfulContentMonitor.Options(
        weights=str(weights))).needs().context


def test_select_names_a_prompt_the_cache_lacks(
        tiny_observer: tuple[Any, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from guardrail_harmful_content.training.select import main

    from guardrail.toolkit.features import extract_features

    observer, _ = tiny_observer
    rows = _pool_rows()
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    feats = extract_features(observer, pool, tmp_path / "feats", [0, 2], progress=False)
    cache = tmp_path / "prompts.npz"
    extract_prompt_states(observer, [str(r["prompt"]) for r in rows[1:]], (0, 2), cache,
                          progress=False)
    with pytest.raises(SystemExit):
        main(["--pool", str(pool), "--features", str(feats.path), "--layers", "0", "2",
              "--prompt-features", str(cache), "--report", str(tmp_path / "r.json")])
    assert "record 0 (handwritten:a): its prompt 'Tell me how to hurt someone" in (
        capsys.readouterr().err)


RUNTIME = "context" in getattr(Features, "__dataclass_fields__", {})
needs_runtime = pytest.mark.skipif(not RUNTIME, reason="the runtime's prompt term "
                                   "(Needs.context, Features.context) is not on this branch")


@needs_runtime
def test_the_monitor_scores_written_weights_as_the_selection_with_the_context(
        tmp_path: Path) -> None:
    from guardrail_harmful_content.training.selection.record import write_prompt_term

    pool = _pool(4, 3.0)
    probe = fit_probe(pool, LAYERS, 1.0, 6.0, prompt_scale=0.75)
    wp = probe.prompt_weights()
    assert wp is not None
    weights = save_probe(tmp_path, to_dual_head(probe, 16),
                         {"base_model": "tiny", "layer": 3, "layers": list(LAYERS),
                          "pooling": "prefix_ema", "halflife": 6.0, "threshold": 0.5,
                          "rule": {"kind": "count", "k": 2}, "prompt_feature": "context_mean"},
                         name="probe")
    assert probe.prompt_range is not None
    write_prompt_term(weights, wp.reshape(len(LAYERS), 16), probe.prompt_range)
    monitor = HarmfulContentMonitor(HarmfulContentMonitor.Options(weights=str(weights)))
    assert dataclasses.asdict(monitor.needs())["context"]
    prompted = MonitorContext("harm", [{"role": "user", "content": "a request"}])
    for record in pool:  # the records whose term the range clips among them
        state = monitor.start(prompted)
        first = _features(record, 0, 7)
        # the runtime hands the context's pooled states over on a stream's first update
        fields: dict[str, Any] = {f.name: getattr(first, f.name)
                                  for f in dataclasses.fields(first)}
        values = [s.value for s in monitor.update(state, Features(**{
            **fields, "context": record.prompt}))]
        values += [s.value for s in monitor.update(state, _features(record, 7, len(record)))]
        np.testing.assert_allclose(values, probe.prefix_scores(record), atol=1e-5)


@needs_runtime
def test_the_cached_prompt_states_equal_what_the_observer_hands_a_monitor(
        tiny_observer: tuple[Any, Path], tmp_path: Path) -> None:
    from guardrail.monitor import Needs

    observer, _ = tiny_observer
    prompts = ["How do I bake bread?", "Numbers: 3.14159, 2,718 and 1/2."]
    found = extract_prompt_states(observer, prompts, (0, 2), tmp_path / "s.npz",
                                  progress=False).by_prompt()
    asked: dict[str, Any] = {"layers": frozenset((0, 2)), "context": True}
    needs = Needs(**asked)
    for prompt in prompts:
        state = observer.start(prompt_messages(prompt), needs)
        context = observer.extend(state, [], needs).context
        for layer in (0, 2):
            np.testing.assert_allclose(found[prompt][layer], context[layer], atol=1e-5)
