"""Plugin discovery through real entry points, switches, registration errors, hook docs."""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import guardrail
from guardrail import Guard, GuardrailError, hookimpl, hookspecs
from guardrail.plugins import PluginHost

ROOT = Path(__file__).resolve().parents[2]


def guardrail_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "guardrail.cli", *args],
        capture_output=True, text=True, env={**os.environ, **env}, timeout=120,
    )


def test_installed_example_plugin_is_found_through_its_entry_point() -> None:
    out = guardrail_cli("plugins", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["monitors"]["shouting"]["plugin"] == "shouting"
    plugin = next(p for p in data["plugins"] if p["name"] == "shouting")
    assert plugin["distribution"].startswith("guardrail-shouting ")
    assert plugin["hooks"] == ["guardrail_register_monitors"]


def test_an_entry_point_monitor_guards_a_stream() -> None:
    g = Guard.from_policy({"monitors": [{"id": "calm", "use": "shouting",
                                         "rule": {"kind": "consecutive", "k": 2},
                                         "action": "halt"}],
                           "release": {"hold_back_tokens": 0}},
                          host=PluginHost())
    session = g.session()
    for word in "please stay calm. STOP SHOUTING AT ME".split(" "):
        session.feed(word + " ")
    report = session.finish()
    assert report.halt is not None and report.halt.at == 5  # "SHOUTING", 2nd in a row
    assert report.released_text == "please stay calm. STOP"


@pytest.mark.slow
def test_autoload_can_be_switched_off() -> None:
    out = guardrail_cli("plugins", "--json", GUARDRAIL_DISABLE_PLUGIN_AUTOLOAD="1")
    assert "shouting" not in json.loads(out.stdout)["monitors"]
    assert "keywords" in json.loads(out.stdout)["monitors"]  # built-ins stay


@pytest.mark.slow
def test_block_list_skips_named_plugins() -> None:
    out = guardrail_cli("plugins", "--json", GUARDRAIL_BLOCK_PLUGINS="shouting, other")
    assert "shouting" not in json.loads(out.stdout)["monitors"]


def test_same_monitor_name_from_two_plugins_is_an_error(host: PluginHost) -> None:
    class Dup:
        @hookimpl
        def guardrail_register_monitors(self, register: Any) -> None:
            register("keywords", lambda: None)

    host.register(Dup(), name="dup")
    with pytest.raises(GuardrailError, match="'keywords' is registered twice.*dup"):
        host.monitors()


def test_a_misspelt_hook_is_caught_at_registration(host: PluginHost) -> None:
    class Typo:
        @hookimpl
        def guardrail_register_monitor(self, register: Any) -> None:  # missing "s"
            pass

    with pytest.raises(Exception, match="unknown hook"):
        host.register(Typo(), name="typo")


def test_a_factory_must_return_a_monitor(host: PluginHost) -> None:
    class Bad:
        @hookimpl
        def guardrail_register_monitors(self, register: Any) -> None:
            register("bad", lambda: "not a monitor")

    host.register(Bad(), name="bad")
    with pytest.raises(GuardrailError, match="not a guardrail.Monitor"):
        Guard.from_policy({"monitors": [{"id": "b", "use": "bad"}]}, host=host)


HOOKS = sorted(name for name in dir(hookspecs) if name.startswith("guardrail_"))


def test_hook_list_is_what_we_expect() -> None:
    assert HOOKS == [
        "guardrail_on_event",
        "guardrail_register_adapters",
        "guardrail_register_commands",
        "guardrail_register_monitors",
        "guardrail_register_observers",
        "guardrail_register_trainers",
        "guardrail_session_end",
        "guardrail_session_start",
    ]


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented_with_its_signature(hook: str) -> None:
    args = ", ".join(inspect.signature(getattr(hookspecs, hook)).parameters)
    assert f"### {hook}({args})" in (ROOT / "docs" / "hooks.md").read_text()


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_exercised_by_a_test(hook: str) -> None:
    tests = "".join(p.read_text() for p in (ROOT / "tests").rglob("test_*.py"))
    assert re.search(rf"def {hook}\(", tests), f"no test implements {hook}"


def test_public_names_are_exported() -> None:
    exported = set(guardrail.__all__)
    assert {"Guard", "Monitor", "hookimpl", "GuardSession", "StreamStep", "Policy"} <= exported
    for name in guardrail.__all__:
        assert hasattr(guardrail, name), name
    assert len(set(guardrail.__all__)) == len(guardrail.__all__)
