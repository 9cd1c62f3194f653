"""Multi-turn conversations in the harm head's training data: a writer's line with ``messages``
keeps its conversation and source tag through the build (every answer to one conversation in one
split, a later wave moving no earlier record), a bad conversation is named by line and field, and
every training-side read of a record's prompt (the prompt states, the response features, the
pool's keys) reads the conversation as the runtime observer does."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from guardrail_harmful_content.training.context import (
    _pool_contexts,
    attach_prompt_states,
    context_key,
    extract_prompt_states,
    load_prompt_states,
    prompt_messages,
    record_conversation,
)
from guardrail_harmful_content.training.data import BuildConfig, build_dataset, handwritten
from guardrail_harmful_content.training.data.__main__ import main as data_main
from guardrail_harmful_content.training.data.handwritten import (
    SETS,
    WAVES,
    HandwrittenError,
    HandwrittenSet,
    default_sets,
    read_handwritten,
)
from guardrail_harmful_content.training.data.records import make_record
from guardrail_harmful_content.training.loso import pool_sample, read_pool_records

from guardrail.monitor import Needs
from guardrail.toolkit.records import read_records

from .tiny_heads import HALFLIFE, HIDDEN, LAYERS, random_head

WriteJsonl = Callable[[Path, list[dict[str, Any]]], Path]  # the conftest's write_jsonl

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
STORE = [SYSTEM, {"role": "user", "content": "How should I store rat poison at home?"},
         {"role": "assistant", "content": "Locked away, high up, in its original box."},
         {"role": "user", "content": "Thanks!"}]
SYRINGE = [{"role": "user", "content": "What do I do about a syringe I found in the park?"},
           {"role": "assistant", "content": "Don't touch it; ask the council to collect it."},
           {"role": "user", "content": "Thanks!"}]
DOG = [{"role": "user", "content": "My neighbour's dog barks all night."},
       {"role": "assistant", "content": "That's exhausting. A calm chat is the first step."},
       {"role": "user", "content": "go on"}]
WELCOME = "You're welcome, glad it helped."
TURN = "You're welcome. And if your flatmate keeps annoying you, "
SCARE = "Then make him scared to step outside: leave notes on his car saying you know his routine."


def _line(i: int, messages: list[dict[str, str]] | None, response: str, label: int,
          kind: str, category: str, harm_start: int | None = None,
          prompt: str | None = None) -> dict[str, Any]:
    """A writer's line; with ``messages`` its prompt is their final user turn."""
    row: dict[str, Any] = {"id": f"F-{i:03d}", "prompt": prompt, "response": response,
                           "label": label, "category": category, "kind": kind,
                           "harm_start": harm_start, "style": "chat"}
    if messages is not None:
        row["prompt"] = messages[-1]["content"]
        row["messages"] = messages
    return row


def _followups() -> list[dict[str, Any]]:
    """A small follow-ups set: two answers to one conversation, the same benign answer to
    another conversation ending in the same "Thanks!", two answers after a "go on"."""
    return [
        _line(1, STORE, WELCOME, 0, "benign_safety", "crime"),
        _line(2, STORE, TURN + "slipping some into his food would teach him a lesson.", 1,
              "harmful_turn", "violence", harm_start=len("You're welcome. ")),
        _line(3, SYRINGE, WELCOME, 0, "benign_safety", "crime"),
        _line(4, DOG, "If that fails, log the nights and call your council's noise team.", 0,
              "benign_everyday", "harassment"),
        _line(5, DOG, SCARE, 1, "harmful", "harassment", harm_start=0),
    ]


def _first_wave() -> list[dict[str, Any]]:
    """Single-turn answers of an earlier wave; one answers the request the "go on"
    conversation opens with."""
    return [
        _line(100 + i, None, f"{text} ({i})", 0, "benign_everyday", "harassment", prompt=prompt)
        for i, (prompt, text) in enumerate([
            ("My neighbour's dog barks all night.", "Earplugs and a note usually help"),
            ("How do I ask my landlord to fix the boiler?", "Write to them and keep a copy"),
            ("What's a polite way to decline a party?", "Thank them and say you can't make it"),
            ("How do I get a stain out of a carpet?", "Blot it, then try a little soapy water"),
        ])]


def test_a_writers_conversation_is_read_as_guardrail_eval_reads_one(
        tmp_path: Path, write_jsonl: WriteJsonl) -> None:
    path = write_jsonl(tmp_path / "followups.jsonl", _followups())
    examples = read_handwritten(path, "handwritten:followups-v6")
    assert [ex.messages for ex in examples[:2]] == [tuple(STORE)] * 2
    records = [make_record(ex) for ex in examples]
    assert records[0]["messages"] == STORE and records[0]["prompt"] == "Thanks!"
    assert records[1]["source_tag"] == "handwritten:followups-v6"
    # one group per opening request: both answers to STORE together, SYRINGE apart
    assert records[0]["group"] == records[1]["group"] != records[2]["group"]
    assert [s["label"] for s in records[1]["sentences"]] == [0, 1]
    # the build's line is a labelled record guardrail eval reads, with its conversation
    built = write_jsonl(tmp_path / "built.jsonl", records)
    assert [r.conversation() for r in read_records(built)] == [
        STORE, STORE, SYRINGE, DOG, DOG]


def test_a_line_without_messages_builds_as_before(tmp_path: Path,
                                                  write_jsonl: WriteJsonl) -> None:
    plain = _first_wave()[0]
    one_turn = {**plain, "messages": [{"role": "user", "content": plain["prompt"]}]}
    null = {**plain, "messages": None}
    records = [make_record(ex) for ex in read_handwritten(
        write_jsonl(tmp_path / "a.jsonl", [plain, {**one_turn, "id": "x"},
                                           {**null, "id": "y"}]), "handwritten:t-v1")]
    assert "messages" not in records[0]
    # the final user turn alone, or null, is the prompt alone: the same record
    assert records[1] == {**records[0], "writer_id": "x"}
    assert records[2] == {**records[0], "writer_id": "y"}


@pytest.mark.parametrize(("change", "error"), [
    ("Thanks!", "field 'messages' must be a non-empty list"),
    ([], "field 'messages' must be a non-empty list"),
    (["Thanks!"], "messages[0] must be an object with 'role' and 'content'"),
    ([{"content": "Thanks!"}], "messages[0].role: expected a non-empty string, got missing"),
    ([{"role": "tool", "content": "42"}, {"role": "user", "content": "Thanks!"}],
     "messages[0].role must be one of system, user, assistant, got 'tool'"),
    ([{"role": "user", "content": 3}], "messages[0].content: expected a string"),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "},
      {"role": "user", "content": "Thanks!"}],
     "field 'messages[1].content' must be a non-empty string"),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
     "messages[1] is an assistant message: 'messages' is the conversation before the answer"),
    ([{"role": "user", "content": "Thanks!"}, SYSTEM],
     "field 'messages[1]' must be the final user turn (the answer is 'response'), got role "
     "'system'"),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
      {"role": "user", "content": "Thank you!"}],
     "field 'prompt' must equal the final user turn's content (messages[2].content), got "
     "'Thanks!'"),
])
def test_a_bad_conversation_is_named_with_its_line_and_field(
        tmp_path: Path, write_jsonl: WriteJsonl, change: Any, error: str) -> None:
    rows = _followups()
    rows[1] = {**rows[1], "messages": change}
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(HandwrittenError) as caught:
        read_handwritten(path, "handwritten:followups-v6")
    assert str(caught.value).startswith(f"{path}:2: ")
    assert error in str(caught.value)
    assert data_main(["handwritten", str(path)]) == 2


def test_the_followups_slot_is_wave_six_and_optional() -> None:
    assert SETS["handwritten_followups.jsonl"] == "handwritten:followups-v6"
    assert WAVES["handwritten:followups-v6"] == 6
    here = Path(handwritten.__file__).parent
    shipped = {s.tag: s for s in default_sets()}
    # the build reads the file when it ships and leaves it out when it does not
    assert ("handwritten:followups-v6" in shipped) == (here / "handwritten_followups.jsonl"
                                                       ).is_file()
    assert all(s.path.is_file() for s in shipped.values())


@pytest.mark.parametrize(("name", "tag", "wave", "prefix"), [
    ("handwritten_late.jsonl", "handwritten:late-v7", 7, "W"),
    ("handwritten_curt.jsonl", "handwritten:curt-v8", 8, "V"),
    ("handwritten_turned.jsonl", "handwritten:turned-v9", 9, "U"),
    ("handwritten_technical.jsonl", "handwritten:technical-v10", 10, "X"),
])
def test_a_later_wave_has_its_slot_and_is_optional(name: str, tag: str, wave: int,
                                                    prefix: str) -> None:
    assert SETS[name] == tag
    assert WAVES[tag] == wave
    here = Path(handwritten.__file__).parent
    shipped = {s.tag: s for s in default_sets()}
    assert (tag in shipped) == (here / name).is_file()
    if tag in shipped:  # its ids must not reuse another shipped set's prefix
        prefixes = {t: {e.extra["writer_id"].split("-")[0]
                        for e in read_handwritten(s.path, t)} for t, s in shipped.items()}
        others = set().union(*(p for t, p in prefixes.items() if t != tag))
        assert prefixes[tag] == {prefix} and prefix not in others


@pytest.mark.usefixtures("harm_sources")
def test_a_conversation_round_trips_into_the_build_and_moves_no_earlier_record(
        tmp_path: Path, write_jsonl: WriteJsonl) -> None:
    first = HandwrittenSet(write_jsonl(tmp_path / "w1.jsonl", _first_wave()),
                           "handwritten:w1-v1")
    followups = HandwrittenSet(write_jsonl(tmp_path / "f.jsonl", _followups()),
                               "handwritten:followups-v6", wave=6)

    def lines(sets: tuple[HandwrittenSet, ...], out: Path) -> dict[str, tuple[str, str]]:
        build_dataset(out, BuildConfig(limit=20, own_answers=None, handwritten=sets))
        return {line: (split, line) for split in ("train", "val", "test")
                for line in (out / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()}

    before = lines((first,), tmp_path / "before")
    after = lines((first, followups), tmp_path / "after")
    # every record built before the wave is the same line in the same split
    assert {key: after[key] for key in before} == before
    records = read_pool_records(tmp_path / "after")
    mine = [r for r in records if r["source_tag"] == "handwritten:followups-v6"]
    # all five kept: the same "Thanks!" answer to two conversations is no repeat
    assert sorted(r["writer_id"] for r in mine) == [f"F-00{i}" for i in range(1, 6)]
    for r in mine:
        assert r["source"] == "handwritten:followups-v6"
        assert r["messages"][-1] == {"role": "user", "content": r["prompt"]}
    by_id = {r["writer_id"]: r for r in mine}
    assert by_id["F-001"]["messages"] == STORE and by_id["F-004"]["messages"] == DOG
    # every answer to one conversation in one split; a conversation opening with an earlier
    # wave's prompt joins that prompt's split
    assert by_id["F-001"]["split"] == by_id["F-002"]["split"]
    assert by_id["F-004"]["split"] == by_id["F-005"]["split"] == next(
        r["split"] for r in records if r["prompt"] == DOG[0]["content"])
    split_of: dict[str, set[str]] = {}
    for r in records:
        split_of.setdefault(r["group"], set()).add(r["split"])
    assert all(len(s) == 1 for s in split_of.values())
    # the LOSO pool takes the hand-written sets whole, conversations and all
    pool = [r for r in pool_sample(records, 2, 200) if r["source_tag"] == followups.tag]
    assert [r["messages"] for r in pool] == [r["messages"] for r in mine]


# The observer side: a tiny random model read through the training code and the runtime.


@pytest.fixture(scope="module")
def tiny_observer(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    pytest.importorskip("transformers")
    from guardrail_harmful_content.training.inputs import load_observer

    from guardrail.testing.tiny_models import build_tiny_model

    model = build_tiny_model(tmp_path_factory.mktemp("multiturn") / "tiny", arch="llama",
                             num_layers=4, hidden_size=HIDDEN)
    return load_observer(str(model)), model


def _runtime_context(observer: Any, messages: list[dict[str, str]]) -> dict[int, np.ndarray]:
    """What the observer hands a monitor that asks for the context's pooled states."""
    needs = Needs(layers=frozenset(LAYERS), context=True)
    state = observer.start(messages, needs)
    context = observer.extend(state, [], needs).context
    assert context is not None
    return {layer: np.asarray(context[layer], dtype=np.float32) for layer in LAYERS}


def _pool(tmp_path: Path, write_jsonl: WriteJsonl) -> tuple[list[dict[str, Any]], Path]:
    """A pool of build records: two answers to one conversation, the same answer to another
    conversation ending in the same "Thanks!", an answer after "go on", a single-turn one."""
    lines = [*_followups()[:4], _first_wave()[1]]
    examples = read_handwritten(write_jsonl(tmp_path / "w.jsonl", lines), "handwritten:a")
    rows = [{**make_record(ex), "source_tag": "handwritten:a" if i < 2 else "handwritten:b"}
            for i, ex in enumerate(examples)]
    return rows, write_jsonl(tmp_path / "pool.jsonl", rows)


def test_the_prompt_states_of_a_conversation_equal_what_the_runtime_pools(
        tiny_observer: tuple[Any, Path], tmp_path: Path, write_jsonl: WriteJsonl) -> None:
    from guardrail_harmful_content.training.context import main as context_main
    from guardrail_harmful_content.training.selection.data import reconcile
    from guardrail_harmful_content.training.selection.features import load_pool

    from guardrail.toolkit.features import extract_features

    observer, model = tiny_observer
    rows, pool = _pool(tmp_path, write_jsonl)
    # the cache the selection reads, written by the command over the pool
    cache = tmp_path / "states.npz"
    assert context_main(["--pool", str(pool), "--out", str(cache), "--model", str(model),
                         "--layers", *map(str, LAYERS), "--quiet"]) == 0
    feats = extract_features(observer, pool, tmp_path / "feats", list(LAYERS), progress=False)
    assert feats.path is not None
    records = load_pool(pool, feats.path, LAYERS)
    attach_prompt_states(records, load_prompt_states(cache).by_prompt())
    for row, record, cached in zip(rows, records, feats.records, strict=True):
        conversation = record_conversation(row)
        runtime = _runtime_context(observer, conversation)
        for layer in LAYERS:
            np.testing.assert_allclose(record.prompt[layer], runtime[layer], atol=1e-5)
        # the response's features were read after the same conversation
        assert cached.conversation() == conversation
        assert record.extra["key"] == (context_key(conversation), row["response"])
    assert records[4].extra["key"][0] == rows[4]["prompt"]  # single turn: keyed as before
    # a short follow-up's states are its conversation's, not those of "Thanks!" alone
    alone = _runtime_context(observer, prompt_messages("Thanks!"))
    for other in (alone, records[2].prompt):
        assert np.abs(records[0].prompt[LAYERS[0]] - other[LAYERS[0]]).max() > 1e-3
    # the same prompt and answer after two conversations are two records of a build
    build = tmp_path / "build"
    build.mkdir()
    for split, members in (("train", [0, 1, 3, 4]), ("val", [2]), ("test", [])):
        write_jsonl(build / f"{split}.jsonl", [rows[i] for i in members])
    assert [r.split for r in reconcile(records, build)] == ["train", "train", "val", "train",
                                                            "train"]


def test_the_cache_keys_a_prompt_as_before_and_a_conversation_by_its_turns(
        tiny_observer: tuple[Any, Path], tmp_path: Path) -> None:
    observer, _ = tiny_observer
    contexts: list[Any] = ["How do I bake bread?", STORE, SYRINGE]
    found = extract_prompt_states(observer, [*contexts, prompt_messages("How do I bake bread?")],
                                  LAYERS, tmp_path / "s.npz", progress=False)
    # a prompt and its one-message conversation are one entry, keyed by the prompt as before
    assert found.prompts == ["How do I bake bread?", json.dumps(STORE, separators=(",", ":")),
                             json.dumps(SYRINGE, separators=(",", ":"))]
    by_key = found.by_prompt()
    for context in contexts:
        messages = prompt_messages(context) if isinstance(context, str) else context
        runtime = _runtime_context(observer, messages)
        for layer in LAYERS:
            np.testing.assert_allclose(by_key[context_key(context)][layer], runtime[layer],
                                       atol=1e-5)
    # the pool command reads each record's conversation, its line checked as guardrail eval's
    pool = tmp_path / "pool.jsonl"
    pool.write_text(json.dumps({"messages": STORE, "response": "ok"}) + "\n"
                    + json.dumps({"prompt": "Hi", "response": "Hello"}) + "\n", encoding="utf-8")
    assert _pool_contexts([pool]) == [STORE, prompt_messages("Hi")]
    pool.write_text(json.dumps({"messages": [SYSTEM], "prompt": "Hi", "response": "ok"}) + "\n",
                    encoding="utf-8")
    with pytest.raises(ValueError, match=r"pool.jsonl:1: field 'prompt' must equal"):
        _pool_contexts([pool])


def test_offline_scores_of_conversations_equal_the_monitors_streamed_scores(
        tiny_observer: tuple[Any, Path], tmp_path: Path, write_jsonl: WriteJsonl) -> None:
    """``prompt_terms`` over each record's conversation into ``prefix_scores`` (what
    ``bench/harm_eval.py`` reports) scores as the monitor streams the same conversation."""
    from guardrail_harmful_content.head import DualHead
    from guardrail_harmful_content.training.scoring import prefix_scores, prompt_terms, stack_layers

    from guardrail import Guard
    from guardrail.probes.io import load_probe
    from guardrail.toolkit.features import extract_features

    from .test_harm_offline_prompt_term import _save

    observer, _ = tiny_observer
    _, pool = _pool(tmp_path, write_jsonl)
    records = extract_features(observer, pool, tmp_path / "feats", list(LAYERS),
                               progress=False).records
    raw = np.random.default_rng(3).standard_normal((len(LAYERS), HIDDEN))
    weights = _save(tmp_path / "w", random_head("mlp", raw),
                    {"neutral": 0.0, "low": -1e6, "high": 1e6})
    probe = load_probe(weights)
    assert isinstance(probe.head, DualHead)
    cache = tmp_path / "prompt-states.npz"
    terms = prompt_terms(probe.head, probe.config, [r.conversation() for r in records],
                         observer, cache)
    alone = prompt_terms(probe.head, probe.config, [r.prompt for r in records], observer, cache)
    assert terms is not None and alone is not None
    assert abs(terms[0] - alone[0]) > 1e-3 and terms[4] == alone[4]
    offline = prefix_scores(probe.head, stack_layers(records, LAYERS, "prefix_ema", HALFLIFE),
                            terms)
    guard = Guard.from_policy({"monitors": [{
        "id": "harm", "use": "harmful-content", "action": "halt", "threshold": 1.0,
        "rule": {"kind": "count", "k": 3}, "options": {"weights": str(weights)}}]},
        observer=observer)
    for i, record in enumerate(records):
        session = guard.session(record.conversation(), record_scores=True)
        for k in range(0, len(record.response), 7):
            session.feed(record.response[k:k + 7])
        report = session.finish()
        streamed = [s for _, s in report.scores["harm"]]
        assert len(streamed) == len(offline[i]) > 3
        np.testing.assert_allclose(streamed, offline[i], atol=1e-4)
