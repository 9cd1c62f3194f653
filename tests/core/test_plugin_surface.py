"""What plugins add besides monitors: membership of the default policy, ``Guard`` methods
(``guardrail_register_adapters``) and ``guardrail`` commands (``guardrail_register_commands``),
each declared by the plugin, none named by the core."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

import guardrail
from guardrail import Guard, GuardrailError, hookimpl
from guardrail.builtin.text_monitors import KeywordMonitor
from guardrail.cli import add_policy_args, build_parser, main, policy_from_args
from guardrail.guard import default_policy
from guardrail.plugins import PluginHost, get_host, reset_host


class Bells(KeywordMonitor):
    default_spec = {"id": "bells", "action": "halt", "options": {"words": ["bell"]}}


class Whistles(KeywordMonitor):
    default_spec = {"id": "whistles", "options": {"words": ["whistle"]}}


class Defaults:
    @hookimpl
    def guardrail_register_monitors(self, register: guardrail.RegisterMonitor) -> None:
        register("bells", Bells, description="in the default policy", default=True)
        register("whistles", Whistles, description="installed, not a default")


def test_a_monitor_registered_as_default_joins_the_default_policy(host: PluginHost) -> None:
    host.register(Defaults(), name="defaults")
    policy = default_policy(host)
    assert [(m.id, m.use) for m in policy.monitors] == [("bells", "bells")]
    session = Guard(policy, host=host).session()
    session.feed("ring the bell now please")
    report = session.finish()
    assert report.halt is not None and report.halt.monitor == "bells"
    assert "bell" not in report.released_text


def test_a_monitor_registered_by_import_path_loads_when_a_policy_uses_it(
        host: PluginHost) -> None:
    class ByPath:
        @hookimpl
        def guardrail_register_monitors(self, register: guardrail.RegisterMonitor) -> None:
            register("bells", f"{__name__}:Bells", default=True)
            register("broken", f"{__name__}:NoSuchMonitor")

    host.register(ByPath(), name="by-path")
    assert host.monitors()["bells"].factory == f"{__name__}:Bells"  # not imported yet
    assert [m.id for m in default_policy(host).monitors] == ["bells"]
    assert host.monitor("bells").factory is Bells
    with pytest.raises(GuardrailError) as err:
        Guard.from_policy({"monitors": [{"id": "b", "use": "broken"}]}, host=host)
    assert "'broken' from 'by-path': cannot import" in str(err.value)
    assert "NoSuchMonitor" in str(err.value)


def test_a_registration_with_an_unknown_argument_names_the_plugin(host: PluginHost) -> None:
    class Odd:
        @hookimpl
        def guardrail_register_observers(self, register: Any) -> None:
            register("odd", lambda spec: None, default=True)  # only monitors can be defaults

    host.register(Odd(), name="odd")
    with pytest.raises(GuardrailError, match="'odd' registered 'odd' with unknown arguments"):
        host.observers()


class Wrapped:
    def __init__(self, guard: Guard, client: Any, **kwargs: Any) -> None:
        self.guard, self.client, self.kwargs = guard, client, kwargs


class ClientAdapter:
    @hookimpl
    def guardrail_register_adapters(self, register: guardrail.RegisterAdapter) -> None:
        register("wrap", Wrapped, description="wraps anything")


def test_guard_wrap_reaches_the_adapter_a_plugin_registers(host: PluginHost) -> None:
    host.register(ClientAdapter(), name="client-adapter")
    guard = Guard.from_policy({"monitors": []}, host=host)
    wrapped = guard.wrap("a client", timeout=3)
    assert isinstance(wrapped, Wrapped)
    assert (wrapped.guard, wrapped.client, wrapped.kwargs) == (guard, "a client", {"timeout": 3})


def test_a_missing_adapter_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    # Neither the guard's host nor the process-wide one (the fallback) has the LangChain adapter.
    monkeypatch.setenv("GUARDRAIL_BLOCK_PLUGINS", "langchain")
    reset_host()
    try:
        guard = Guard.from_policy({"monitors": []}, host=PluginHost(autoload=False))
        with pytest.raises(GuardrailError,
                           match="wrap_model needs an adapter.*pip install guardrail-langchain"):
            guard.wrap_model(object())
    finally:
        reset_host()


@pytest.fixture
def process_host() -> Iterator[PluginHost]:
    """The process-wide host the CLI uses, fresh, and forgotten afterwards."""
    reset_host()
    yield get_host()
    reset_host()


class Greeter:
    @hookimpl
    def guardrail_register_commands(
        self, subparsers: argparse._SubParsersAction[argparse.ArgumentParser]
    ) -> None:
        p = subparsers.add_parser("greet", help="print the monitors of a policy")
        add_policy_args(p)
        p.set_defaults(func=self.greet)

    @staticmethod
    def greet(args: argparse.Namespace) -> int:
        print("hello", [m.id for m in policy_from_args(args).monitors])
        return 7


def test_a_plugin_adds_a_command_with_the_policy_arguments(
        process_host: PluginHost, tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    process_host.register(Greeter(), name="greeter")
    policy = tmp_path / "p.yaml"
    policy.write_text("version: 1\nmonitors:\n  - {id: a, use: keywords, options: {words: [x]}}\n"
                      "  - {id: b, use: regex, options: {patterns: [y]}}\n")
    assert main(["greet", "--policy", str(policy), "--monitor", "b"]) == 7
    assert capsys.readouterr().out == "hello ['b']\n"


def test_the_help_names_each_command_a_plugin_adds_and_no_other(
        process_host: PluginHost, monkeypatch: pytest.MonkeyPatch) -> None:
    process_host.register(Greeter(), name="greeter")
    epilog = build_parser().epilog or ""
    assert "greet (greeter)" in epilog
    # The core names no distribution: a host without the adapters' entry points lists none.
    monkeypatch.setenv("GUARDRAIL_DISABLE_PLUGIN_AUTOLOAD", "1")
    reset_host()
    assert build_parser().epilog is None


def test_a_command_that_clashes_is_an_error_naming_the_plugin(
        process_host: PluginHost, capsys: pytest.CaptureFixture[str]) -> None:
    class Clash:
        @hookimpl
        def guardrail_register_commands(self, subparsers: Any) -> None:
            subparsers.add_parser("run")

    process_host.register(Clash(), name="clash")
    assert main(["plugins"]) == 1
    assert "plugin 'clash' adds a command that exists" in capsys.readouterr().err


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "guardrail.cli", *args], capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=120)


def test_the_installed_adapters_add_serve_and_the_guard_methods() -> None:
    out = _cli("plugins", "--json")
    assert out.returncode == 0, out.stderr
    adapters = json.loads(out.stdout)["adapters"]
    assert {name: a["plugin"] for name, a in adapters.items()} == {
        "as_runnable": "langchain", "wrap": "openai", "wrap_model": "langchain"}
    assert "--upstream" in _cli("serve", "--help").stdout


@pytest.mark.slow
def test_load_plugins_loads_only_the_named_entry_points() -> None:
    out = _cli("plugins", "--json", GUARDRAIL_LOAD_PLUGINS="shouting")
    data = json.loads(out.stdout)
    assert "shouting" in data["monitors"] and "keywords" in data["monitors"]  # built-ins stay
    assert "harmful-content" not in data["monitors"] and data["adapters"] == {}
    served = _cli("serve", "--help", GUARDRAIL_LOAD_PLUGINS="shouting")
    assert served.returncode == 2 and "invalid choice: 'serve'" in served.stderr
