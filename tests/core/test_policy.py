"""Policy files: every error names the field and its line; the schema is exported."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from guardrail import Features, Guard, Monitor, PolicyError, Score, load_policy
from guardrail.plugins import PluginHost
from guardrail.testing import plugin_monitors

GOOD = """\
version: 1
release: {hold_back_tokens: 4}
on_error: fail_open
monitors:
  - id: words
    use: keywords
    threshold: 0.5
    rule: {kind: count, k: 2}
    action: halt
    message: "Stopped."
    options:
      words: [bomb, napalm]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return path


def issues(tmp_path: Path, text: str, host: PluginHost | None = None) -> list[str]:
    with pytest.raises(PolicyError) as info:
        Guard.from_yaml(write(tmp_path, text), host=host or PluginHost(autoload=False))
    return [str(i) for i in info.value.issues]


def test_a_good_policy_loads(tmp_path: Path, host: PluginHost) -> None:
    guard = Guard.from_yaml(write(tmp_path, GOOD), host=host)
    spec = guard.policy.monitors[0]
    assert spec.rule.kind == "count" and spec.rule.k == 2 and spec.action == "halt"
    assert guard.policy.release.hold_back_tokens == 4 and guard.policy.on_error == "fail_open"


def test_wrong_type_names_field_and_line(tmp_path: Path) -> None:
    found = issues(tmp_path, GOOD.replace("hold_back_tokens: 4", "hold_back_tokens: lots"))
    assert found == ["line 2: release.hold_back_tokens: Input should be a valid integer, "
                     "unable to parse string as an integer"]


def test_unknown_field_names_field_and_line(tmp_path: Path) -> None:
    found = issues(tmp_path, GOOD.replace("    action: halt", "    actoin: halt"))
    assert found == ["line 9: monitors[0].actoin: unknown field"]


def test_unknown_monitor_names_installed_ones(tmp_path: Path) -> None:
    found = issues(tmp_path, GOOD.replace("use: keywords", "use: keywordz"))
    assert len(found) == 1
    assert found[0].startswith("line 6: monitors[0].use: unknown monitor 'keywordz'; installed:")
    assert "keywords" in found[0] and "regex" in found[0]


def test_bad_monitor_option_names_the_option(tmp_path: Path) -> None:
    found = issues(tmp_path, GOOD.replace("words: [bomb, napalm]", "wordz: [bomb]"))
    assert "line 12: monitors[0].options.wordz: unknown option" in found
    assert any(f.startswith("line 11: monitors[0].options.words: Field required") for f in found)


@pytest.mark.parametrize(("threshold", "outcome"), [("80", "never fire"),
                                                     ("-0.5", "fire on every token")])
def test_a_threshold_outside_the_monitors_scores_is_an_error(tmp_path: Path, threshold: str,
                                                             outcome: str) -> None:
    found = issues(tmp_path, GOOD.replace("threshold: 0.5", f"threshold: {threshold}"))
    assert found == [f"line 7: monitors[0].threshold: {float(threshold):g} is outside the "
                     f"scores 'keywords' gives (0 to 1): it would {outcome}"]
    for edge in ("0", "1"):  # the ends are scores it gives
        guard = Guard.from_yaml(write(tmp_path, GOOD.replace("threshold: 0.5",
                                                             f"threshold: {edge}")),
                                host=PluginHost(autoload=False))
        assert guard.policy.monitors[0].threshold == float(edge)


class _EveryTokenScoresOne(Monitor):
    """Scores 1.0 on every token; its own default rule halts at the third."""

    default_rule: dict[str, Any] | None = {"kind": "count", "k": 3}

    def __init__(self, options: Any = None) -> None:
        self.options = options

    def update(self, state: Any, features: Features) -> list[Score]:
        return [Score(i, 1.0) for i in features.indices]


@pytest.mark.parametrize(("rule", "halt_at"), [(None, 2), ({"kind": "threshold"}, 0),
                                               ({"kind": "count", "k": 2}, 1)])
def test_a_monitors_default_rule_applies_when_the_policy_gives_none(
        rule: dict[str, Any] | None, halt_at: int) -> None:
    spec: dict[str, Any] = {"id": "m", "use": "ones", "action": "halt"}
    if rule is not None:
        spec["rule"] = rule
    with plugin_monitors(ones=_EveryTokenScoresOne) as host:
        guard = Guard.from_policy({"version": 1, "monitors": [spec]}, host=host)
        report = guard.check("one two three four five")
    assert report.halt is not None and report.halt.at == halt_at


def test_an_invalid_default_rule_is_a_policy_error() -> None:
    class Broken(_EveryTokenScoresOne):
        default_rule = {"kind": "count", "k": 0}

    with plugin_monitors(broken=Broken) as host, pytest.raises(PolicyError) as info:
        Guard.from_policy({"version": 1, "monitors": [{"id": "b", "use": "broken"}]}, host=host)
    assert [i.path for i in info.value.issues] == ["monitors[0].rule"]
    assert "'broken' has an invalid default rule" in str(info.value)


def test_bad_yaml_syntax_gives_the_line(tmp_path: Path) -> None:
    found = issues(tmp_path, GOOD.replace("words: [bomb, napalm]", "words: [bomb, napalm"))
    assert len(found) == 1 and found[0].startswith("line 13: <policy>: YAML syntax error")


def test_unknown_rule_kind_and_missing_route_target(tmp_path: Path) -> None:
    text = GOOD.replace("kind: count", "kind: sometimes").replace("action: halt", "action: route")
    found = issues(tmp_path, text)
    assert any("monitors[0].rule: unknown rule kind" in f for f in found)
    text = GOOD.replace("action: halt", "action: route")
    assert any("action 'route' needs route_to" in f for f in issues(tmp_path, text))


def test_every_error_is_reported_at_once(tmp_path: Path) -> None:
    text = GOOD.replace("fail_open", "fail_sometimes").replace("threshold: 0.5", "threshold: hi")
    found = issues(tmp_path, text)
    assert [f.split(":")[0] for f in found] == ["line 3", "line 7"]


def test_duplicate_ids_and_missing_file(tmp_path: Path) -> None:
    dup = GOOD + GOOD.split("monitors:\n", 1)[1]
    assert any("duplicate monitor id 'words'" in f for f in issues(tmp_path, dup))
    with pytest.raises(PolicyError, match="file not found"):
        load_policy(tmp_path / "missing.yaml")


def test_yaml_cannot_construct_python_objects(tmp_path: Path) -> None:
    evil = "version: !!python/object/apply:os.system ['echo pwned']\nmonitors: []\n"
    found = issues(tmp_path, evil)
    assert len(found) == 1 and "YAML syntax error" in found[0]


def test_narrowing_to_one_monitor(tmp_path: Path) -> None:
    policy = load_policy(write(tmp_path, GOOD))
    assert [m.id for m in policy.narrowed(["words"]).monitors] == ["words"]
    with pytest.raises(PolicyError, match="no monitor with id 'nope'"):
        policy.narrowed(["nope"])


def test_json_schema_describes_the_policy() -> None:
    from guardrail import policy_json_schema

    schema = policy_json_schema()
    json.dumps(schema)
    assert set(schema["properties"]) >= {"version", "observer", "release", "on_error",
                                         "monitors"}
    monitor = schema["$defs"]["MonitorSpec"]["properties"]
    assert set(monitor["action"]["enum"]) == {"flag", "halt", "route", "redact"}
