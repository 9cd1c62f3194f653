"""The model's own answers as harmless records: generation that resumes a cut run, files checked
against the prompt order, and a build that adds them without moving any other record."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from guardrail_harmful_content.training.data import BuildConfig
from guardrail_harmful_content.training.data.__main__ import main as data_main
from guardrail_harmful_content.training.data.longform import (
    HELDOUT_TOPICS,
    LongFactPrompt,
    read_longfact,
)
from guardrail_harmful_content.training.data.own_answers import (
    KIND,
    TEST_FIRST,
    OwnAnswersConfig,
    OwnAnswersError,
    default_answers_file,
    generate_own_answers,
    prompt_order,
    read_own_answers,
)

from guardrail.testing.tiny_models import build_tiny_model

PROMPTS = [LongFactPrompt(text, "astronomy", "objects") for text in (
    "Who was Marie Curie?", "What is the capital of France?", "How do I bake bread?",
    "Tell me about the river that flows north.", "What did Albert Einstein publish in 1915?")]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = build_tiny_model(tmp_path_factory.mktemp("own") / "m", seed=4, spread=0.5)
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_a_cut_run_resumes_to_the_same_file(tiny_lm: tuple[Any, Any], tmp_path: Path) -> None:
    model, tokenizer = tiny_lm
    config = OwnAnswersConfig(count=4, max_new_tokens=8, batch_size=2, model="tiny")
    whole = tmp_path / "whole.jsonl"
    summary = generate_own_answers(whole, PROMPTS, model, tokenizer, config, progress=False)
    assert summary["answers"] == summary["generated"] == 4
    rows = _lines(whole)
    assert [r["index"] for r in rows] == [0, 1, 2, 3]  # count caps the prompts answered
    assert [r["prompt"] for r in rows] == [p.prompt for p in PROMPTS[:4]]
    assert all(r["model"] == "tiny" and r["tokens"] <= 8 for r in rows)
    assert len({r["response"] for r in rows}) > 1

    cut = tmp_path / "cut.jsonl"
    cut.write_text(whole.read_text(encoding="utf-8").splitlines(keepends=True)[0],
                   encoding="utf-8")
    again = generate_own_answers(cut, PROMPTS, model, tokenizer, config, progress=False)
    assert again["generated"] == 3
    assert sorted(_lines(cut), key=lambda r: r["index"]) == rows
    assert generate_own_answers(whole, PROMPTS, model, tokenizer, config,
                                progress=False)["generated"] == 0


def test_a_file_from_another_run_is_refused(tiny_lm: tuple[Any, Any], tmp_path: Path) -> None:
    model, tokenizer = tiny_lm
    path = tmp_path / "answers.jsonl"
    generate_own_answers(path, PROMPTS, model, tokenizer,
                         OwnAnswersConfig(count=2, max_new_tokens=4, model="tiny"),
                         progress=False)
    with pytest.raises(OwnAnswersError, match="'other'"):
        generate_own_answers(path, PROMPTS, model, tokenizer,
                             OwnAnswersConfig(count=3, max_new_tokens=4, model="other"),
                             progress=False)
    shuffled = list(reversed(PROMPTS))
    with pytest.raises(OwnAnswersError, match=r"line 1: prompt 0 is not the prompt"):
        read_own_answers(path, shuffled)
    path.write_text(path.read_text(encoding="utf-8") + '{"index": 1}\n', encoding="utf-8")
    with pytest.raises(OwnAnswersError, match="line 3: not an own-answer line"):
        read_own_answers(path, PROMPTS)


def _write_answers(path: Path, prompts: list[LongFactPrompt], n: int) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for i in range(n):
            # Answer 3 is too short to be long-form text and is dropped.
            response = "Paris." if i == 3 else (
                f"Answer {i}. The subject has a long history, and scholars have written about "
                "it for many years.")
            fh.write(json.dumps({"index": i, "prompt": prompts[i].prompt, "response": response,
                                 "tokens": 20, "model": "m", "decoding": "greedy"}) + "\n")


def test_a_build_adds_own_answers_and_moves_no_other_record(
        full_build: Path, tmp_path: Path,
        read_split: Callable[[Path, str], list[dict[str, Any]]]) -> None:
    config = BuildConfig()
    prompts = prompt_order(read_longfact(config.longfact_dir))
    answers = tmp_path / "own.jsonl"
    _write_answers(answers, prompts, 400)
    out, without = tmp_path / "build", tmp_path / "without"
    assert data_main(["build", "--out", str(out), "--own-answers", str(answers)]) == 0
    assert data_main(["build", "--out", str(without), "--no-own-answers"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    entry = next(s for s in manifest["sources"] if s["name"] == "own-answers")
    assert (entry["answers"], entry["too_short"], entry["model"]) == (400, 1, "m")

    placed: dict[int, str] = {}
    for split in ("train", "val", "test"):
        before = read_split(without, split)
        after = read_split(out, split)
        assert [r for r in after if r["kind"] != KIND] == before
        for r in after:
            if r["kind"] == KIND:
                assert (r["label"], r["spans"]) == (0, [])
                placed[r["own_index"]] = split
    assert len(placed) == 399 and 3 not in placed
    assert all(placed[i] == "test" for i in placed if i < TEST_FIRST)
    assert all(placed[i] == "test" for i in placed if prompts[i].topic in HELDOUT_TOPICS)
    later = [placed[i] for i in placed if i >= TEST_FIRST
             and prompts[i].topic not in HELDOUT_TOPICS]
    assert later.count("train") > later.count("val") > 0


def test_bad_own_answer_files_are_clear_cli_errors(
        full_build: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.jsonl"
    assert data_main(["build", "--out", str(tmp_path / "b"), "--own-answers", str(missing)]) == 2
    assert "own answers not found" in capsys.readouterr().err
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"index": 0, "prompt": "Not a LongFact prompt", "response": "x"})
                     + "\n", encoding="utf-8")
    assert data_main(["build", "--out", str(tmp_path / "b"), "--own-answers", str(wrong)]) == 2
    assert "line 1: prompt 0 is not the prompt" in capsys.readouterr().err


@pytest.mark.real_model
def test_the_shipped_answers_are_smollm2s_greedy_answers(tmp_path: Path) -> None:
    """The first batch again, cut short: greedy decoding's first tokens do not depend on how many
    follow, so each shipped answer starts with what a 24-token run writes."""
    from guardrail.observer.hf import load_smollm2
    from guardrail.policy import ObserverSpec

    config = BuildConfig()
    prompts = prompt_order(read_longfact(config.longfact_dir))
    shipped = {r["index"]: r for r in read_own_answers(default_answers_file(), prompts)}
    assert sorted(shipped) == list(range(OwnAnswersConfig.count))
    first = OwnAnswersConfig()
    assert {(r["model"], r["decoding"]) for r in shipped.values()} == {(first.model,
                                                                        first.decoding)}
    observer = load_smollm2(ObserverSpec())
    again = tmp_path / "again.jsonl"
    generate_own_answers(again, prompts, observer.model, observer.hf_tokenizer,
                         OwnAnswersConfig(count=first.batch_size, max_new_tokens=24),
                         progress=False)
    for row in _lines(again):
        assert row["tokens"] > 0
        assert shipped[row["index"]]["response"].startswith(row["response"].rstrip("\ufffd"))
