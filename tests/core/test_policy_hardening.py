"""A policy file cannot make the loader blow up (YAML bombs, deep nesting, huge files and word
lists), a policy written out by ``to_yaml`` loads back the same, and the policy's paths and the
observer options reach only what they name. Probe files don't get their values echoed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardrail import Guard, Needs, ObserverError, PolicyError, load_policy
from guardrail.plugins import PluginHost
from guardrail.policy import MAX_ALIAS_NODES, MAX_LIST_ITEMS, MAX_NESTING, MAX_POLICY_BYTES
from guardrail.testing import ScriptedMonitor, plugin_monitors

KEYWORDS = """\
monitors:
  - id: kw
    use: keywords
    action: halt
    options:
"""


def _issue(exc: pytest.ExceptionInfo[PolicyError]) -> tuple[int | None, str]:
    [issue] = exc.value.issues
    return issue.line, issue.message


def _laughs(levels: int) -> str:
    """A "billion laughs" inside a monitor's free-form options: each level is 9 aliases of the
    one before, so ``levels`` levels expand to 9**levels strings."""
    rows = ['      l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        rows.append(f"      l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    return KEYWORDS + "      words: [bomb]\n      extra:\n" + "\n".join(rows) + "\n"


def test_a_billion_laughs_is_refused_at_the_alias_that_crosses_the_budget() -> None:
    text = _laughs(5)  # 59,049 strings: small enough to load before the budget existed
    assert len(text) < 600
    with pytest.raises(PolicyError) as exc:
        load_policy(text)
    line, message = _issue(exc)
    assert f"aliases expand past {MAX_ALIAS_NODES} nodes" in message and "*l3" in message
    assert line == 12 and "*l3" in text.splitlines()[line - 1]


@pytest.mark.slow
def test_the_full_nine_level_bomb_is_refused_through_the_cli(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_laughs(10))
    out = subprocess.run([sys.executable, "-m", "guardrail.cli", "check", str(bomb)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "line 12: <policy>: aliases expand past" in out.stderr


def test_aliases_within_the_budget_still_work() -> None:
    text = KEYWORDS + "      words: &w [bomb, grenade]\n  - id: kw2\n    use: keywords\n" \
        "    options: {words: *w}\n"
    policy = load_policy(text)
    assert policy.monitors[1].options["words"] == ["bomb", "grenade"]
    assert policy.line_of(("monitors", 1, "options", "words")) == 9


@pytest.mark.parametrize("text,line", [
    ("monitors: " + "[" * 5000 + "]" * 5000 + "\n", 1),
    (KEYWORDS + "      words: [bomb]\n      deep:\n" + "".join(
        "  " * (4 + i) + f"k{i}:\n" for i in range(MAX_NESTING)) + "  " * 60 + "end: 1\n",
     8 + MAX_NESTING - 4),  # the line of k46, whose mapping is the 51st collection
])
def test_deep_nesting_is_a_clear_error_not_a_recursion_error(text: str, line: int) -> None:
    with pytest.raises(PolicyError) as exc:
        load_policy(text)
    assert _issue(exc) == (line, f"nested deeper than {MAX_NESTING} levels")


def test_an_alias_inside_its_own_anchor_is_refused() -> None:
    with pytest.raises(PolicyError) as exc:
        load_policy(KEYWORDS + "      words: [bomb]\n      loop: &me [1, *me]\n")
    assert _issue(exc) == (7, "alias *me refers to a value that contains it")


def test_a_huge_policy_file_is_refused_unread(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text(KEYWORDS + "      words: [bomb]\n# " + "x" * MAX_POLICY_BYTES + "\n")
    with pytest.raises(PolicyError, match=f"larger than {MAX_POLICY_BYTES} bytes"):
        load_policy(big)
    with pytest.raises(PolicyError, match=f"larger than {MAX_POLICY_BYTES} bytes"):
        load_policy(big.read_text())


def test_a_word_list_past_the_cap_is_refused_with_its_line() -> None:
    words = [f"w{i}" for i in range(MAX_LIST_ITEMS + 1)]
    with pytest.raises(PolicyError) as exc:
        load_policy(KEYWORDS + f"      words: [{', '.join(words)}]\n")
    assert _issue(exc) == (6, f"a list with more than {MAX_LIST_ITEMS} items")
    policy = {"monitors": [{"id": "kw", "use": "keywords", "options": {"words": words}}]}
    with pytest.raises(PolicyError, match=r"monitors\[0\]\.options\.words"):
        Guard.from_policy(policy, host=PluginHost(autoload=False))


# -- to_yaml round trip -----------------------------------------------------------------------

_text = st.text(st.characters(codec="utf-8"), max_size=12)
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-10**9, 10**9)
    | st.floats(allow_nan=False, allow_infinity=False) | _text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=8)
_options = st.dictionaries(_text, _json, max_size=3)
_rules = st.one_of(
    st.fixed_dictionaries({"kind": st.just("threshold")}),
    st.fixed_dictionaries({"kind": st.sampled_from(["count", "consecutive"])},
                          optional={"k": st.integers(1, 50)}),
    st.fixed_dictionaries({"kind": st.just("span_max")}),
)
_target = st.fixed_dictionaries({"model": _text}, optional={
    "base_url": st.none() | _text, "api_key_env": st.none() | _text,
    "max_tokens": st.integers(1, 500), "until": st.sampled_from(["sentence", "tokens"])})


@st.composite
def _monitor(draw: st.DrawFn, index: int) -> dict[str, Any]:
    action = draw(st.sampled_from(["flag", "halt", "route", "redact"]))
    spec: dict[str, Any] = draw(st.fixed_dictionaries({}, optional={
        "threshold": st.none() | st.floats(allow_nan=False),
        "rule": _rules, "message": st.none() | _text,
        "on_error": st.none() | st.sampled_from(["fail_open", "fail_closed"]),
        "timeout_ms": st.none() | st.floats(min_value=0.001, max_value=1e6),
        "enabled": st.booleans(), "options": _options}))
    spec.update(id=f"m{index}", use=draw(_text.filter(bool)))
    if action != "flag" or draw(st.booleans()):
        spec["action"] = action
    if action == "route" or draw(st.booleans()):
        spec["route_to"] = draw(_target)
    return spec


@st.composite
def _policies(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(0, 3))
    return draw(st.fixed_dictionaries({}, optional={
        "version": st.just(1),
        "observer": st.fixed_dictionaries({}, optional={
            "model": _text, "backend": st.sampled_from(["torch", "onnx"]),
            "window": st.integers(16, 10**6), "options": _options}),
        "release": st.fixed_dictionaries({}, optional={"hold_back_tokens": st.integers(0, 64)}),
        "on_error": st.sampled_from(["fail_open", "fail_closed"]),
        "halt_message": _text, "raise_on_halt": st.booleans(),
        "audit": st.fixed_dictionaries({"path": st.sampled_from(
            ["audit.jsonl", "/var/log/guardrail/audit.jsonl", "~/a b/ä.jsonl"])},
            optional={"fsync": st.booleans()}),
        "monitors": st.tuples(*[_monitor(i) for i in range(n)]).map(list),
    }))


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_policies())
def test_to_yaml_loads_back_the_same_policy(data: dict[str, Any]) -> None:
    policy = load_policy(data)
    again = load_policy(policy.to_yaml())
    assert again.model_dump() == policy.model_dump()
    # a monitor's rule left out means "the monitor's own default": that must survive too
    assert [("rule" in m.model_fields_set) for m in again.monitors] == \
        [("rule" in m.model_fields_set) for m in policy.monitors]
    assert again.to_yaml() == policy.to_yaml()


def test_to_yaml_keeps_the_rule_kind() -> None:
    policy = load_policy({"monitors": [{"id": "h", "use": "harmful-content", "action": "halt",
                                        "rule": {"kind": "count", "k": 1}}]})
    assert yaml.safe_load(policy.to_yaml())["monitors"][0]["rule"] == {"kind": "count", "k": 1}
    assert load_policy(policy.to_yaml()).monitors[0].rule == policy.monitors[0].rule


# -- paths and options the policy names ---------------------------------------------------


@pytest.mark.parametrize("path", ["logs/../../escape/audit.jsonl", "../audit.jsonl",
                                  "..\\escape\\audit.jsonl", "/var/log/../../tmp/a.jsonl"])
def test_an_audit_path_with_parent_parts_is_refused(path: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    text = f"audit:\n  path: {json.dumps(path)}\n"
    with pytest.raises(PolicyError) as exc:
        load_policy(text)
    [issue] = exc.value.issues
    assert issue.path == "audit.path" and issue.line == 2 and "'..'" in issue.message
    assert list(tmp_path.iterdir()) == [] and not (tmp_path.parent / "escape").exists()


def test_an_audit_path_without_parent_parts_still_writes(tmp_path: Path) -> None:
    log = tmp_path / "new" / "audit.jsonl"
    guard = Guard.from_policy({"audit": {"path": str(log)}, "monitors": [
        {"id": "kw", "use": "keywords", "options": {"words": ["bomb"]}, "action": "halt"}]},
        host=PluginHost(autoload=False))
    session = guard.session(prompt="hi")
    session.feed("a bomb here")
    session.finish()
    assert '"kind": "halt"' in log.read_text()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    from guardrail.testing.tiny_models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", arch="llama")


def _observed(model: Path, dtype: Any) -> Guard:
    """A guard whose one monitor reads hidden states, so it loads the observer."""
    monitor = ScriptedMonitor.factory({}, needs=Needs(layers=frozenset({1})))
    with plugin_monitors(scripted=monitor) as host:
        return Guard.from_policy({
            "observer": {"model": str(model), "options": {"dtype": dtype}},
            "monitors": [{"id": "s", "use": "scripted"}]}, host=host)


@pytest.mark.parametrize("dtype", ["nn", "load", "float64", 3])
def test_observer_dtype_is_one_of_a_fixed_set(tiny_model: Path, dtype: Any) -> None:
    with pytest.raises(ObserverError) as exc:
        _observed(tiny_model, dtype)
    assert str(exc.value).endswith("observer.options.dtype must be one of float32, float16, "
                                   "bfloat16")


def test_observer_dtype_bfloat16_loads(tiny_model: Path) -> None:
    import torch

    guard = _observed(tiny_model, "bfloat16")
    assert next(guard.observer.model.parameters()).dtype == torch.bfloat16


def test_a_probe_config_format_value_is_not_echoed(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from guardrail.probes.heads import LinearProbe
    from guardrail.probes.io import ProbeFileError, load_probe, save_probe

    weights = save_probe(tmp_path, LinearProbe(8), {"layer": 1})
    config_path = weights.with_suffix(".json")
    config = json.loads(config_path.read_text())
    for key, value in [("format", "<script>sk-live-SECRET</script>"),
                       ("head", {**config["head"], "kind": "sk-live-SECRET"})]:
        config_path.write_text(json.dumps({**config, key: value}))
        with pytest.raises(ProbeFileError) as exc:
            load_probe(weights)
        assert "SECRET" not in str(exc.value) and str(config_path) in str(exc.value)
