"""The plugin host: a pluggy manager behind a typed facade.

Plugins come from three places, in this order: the entry-point group ``guardrail`` (unless
``GUARDRAIL_DISABLE_PLUGIN_AUTOLOAD=1``; only those named in ``GUARDRAIL_LOAD_PLUGINS=a,b`` when
it is set; names in ``GUARDRAIL_BLOCK_PLUGINS=a,b`` are skipped), plugins registered in code
(``host.register(obj)``), and the built-ins in ``DEFAULT_PLUGINS``.
``GUARDRAIL_TRACE_PLUGINS=1`` logs every hook call.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pluggy
from pydantic import BaseModel, ValidationError

from . import hookspecs
from .errors import GuardrailError, MonitorNotFound
from .monitor import Monitor

if TYPE_CHECKING:
    from .events import Event
    from .session import GuardSession, Report

__all__ = [
    "DEFAULT_PLUGINS",
    "AdapterEntry",
    "MonitorEntry",
    "ObserverEntry",
    "PluginHost",
    "build_monitor",
    "get_host",
    "reset_host",
]

log = logging.getLogger("guardrail.plugins")

DEFAULT_PLUGINS = (
    "guardrail.builtin.text_monitors",
    "guardrail.builtin.observers",
    "guardrail.builtin.audit",
    "guardrail.toolkit.commands",
)

ENV_DISABLE_AUTOLOAD = "GUARDRAIL_DISABLE_PLUGIN_AUTOLOAD"
ENV_BLOCK = "GUARDRAIL_BLOCK_PLUGINS"
ENV_LOAD = "GUARDRAIL_LOAD_PLUGINS"
ENV_TRACE = "GUARDRAIL_TRACE_PLUGINS"


@dataclass(frozen=True)
class MonitorEntry:
    """A registered monitor factory and the plugin that registered it."""

    name: str
    factory: Any
    description: str
    plugin: str
    default: bool = False  # part of the built-in default policy


@dataclass(frozen=True)
class ObserverEntry:
    """A registered observer factory (or trainer) and the plugin that registered it."""

    name: str
    factory: Callable[..., Any]
    description: str
    plugin: str


# A registered ``Guard`` method (``wrap``, ``as_runnable``...): ``factory(guard, *args, **kw)``.
AdapterEntry = ObserverEntry


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


class PluginHost:
    """Typed facade over ``pluggy.PluginManager`` for the guardrail hooks."""

    def __init__(self, *, autoload: bool | None = None, blocked: list[str] | None = None) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        if autoload is None:
            autoload = not _truthy(os.environ.get(ENV_DISABLE_AUTOLOAD))
        if blocked is None:
            blocked = [b.strip() for b in os.environ.get(ENV_BLOCK, "").split(",") if b.strip()]
        for name in blocked:
            self.pm.set_blocked(name)
        if autoload:
            only: list[str | None] = [
                n.strip() for n in os.environ.get(ENV_LOAD, "").split(",") if n.strip()]
            for ep_name in only or [None]:
                self.pm.load_setuptools_entrypoints(hookspecs.PROJECT, ep_name)
        for module_name in DEFAULT_PLUGINS:
            if not self.pm.is_blocked(module_name):
                self.pm.register(importlib.import_module(module_name), module_name)
        self.pm.check_pending()
        if _truthy(os.environ.get(ENV_TRACE)):
            self.pm.add_hookcall_monitoring(self._trace_before, self._trace_after)
        self._monitors: dict[str, MonitorEntry] | None = None
        self._observers: dict[str, ObserverEntry] | None = None
        self._trainers: dict[str, ObserverEntry] | None = None
        self._adapters: dict[str, AdapterEntry] | None = None

    # -- registration ---------------------------------------------------------------------

    def register(self, plugin: object, name: str | None = None) -> str:
        """Register a plugin object (module or instance with hookimpls); returns its name."""
        registered = self.pm.register(plugin, name)
        if registered is None:
            raise GuardrailError(f"plugin {name or plugin!r} is blocked")
        self.pm.check_pending()
        self._monitors = self._observers = self._trainers = self._adapters = None
        return registered

    def unregister(self, name: str) -> None:
        self.pm.unregister(name=name)
        self._monitors = self._observers = self._trainers = self._adapters = None

    def plugin_name(self, plugin: object) -> str:
        return self.pm.get_name(plugin) or repr(plugin)

    def plugins(self) -> list[dict[str, Any]]:
        """What is loaded and from where: name, distribution, hooks."""
        dists = {id(p): d for p, d in self.pm.list_plugin_distinfo()}
        out = []
        for name, plugin in sorted(self.pm.list_name_plugin(), key=lambda item: str(item[0])):
            if plugin is None:
                continue
            dist = dists.get(id(plugin))
            hooks = sorted(
                caller.name for caller in self.pm.get_hookcallers(plugin) or []
            )
            out.append({
                "name": name,
                "distribution": f"{dist.project_name} {dist.version}" if dist else None,
                "module": getattr(plugin, "__name__", type(plugin).__name__),
                "builtin": name in DEFAULT_PLUGINS,
                "hooks": hooks,
            })
        return out

    # -- typed hook facade ----------------------------------------------------------------

    def monitors(self) -> dict[str, MonitorEntry]:
        """Every registered monitor by name."""
        if self._monitors is None:
            self._monitors = self._collect("guardrail_register_monitors", MonitorEntry)
        return self._monitors

    def observers(self) -> dict[str, ObserverEntry]:
        """Every registered observer by name."""
        if self._observers is None:
            self._observers = self._collect("guardrail_register_observers", ObserverEntry)
        return self._observers

    def trainers(self) -> dict[str, ObserverEntry]:
        """Every registered trainer (``guardrail train NAME``) by name."""
        if self._trainers is None:
            self._trainers = self._collect("guardrail_register_trainers", ObserverEntry)
        return self._trainers

    def adapters(self) -> dict[str, AdapterEntry]:
        """The ``Guard`` methods installed adapters provide (``wrap``...), by name."""
        if self._adapters is None:
            self._adapters = self._collect("guardrail_register_adapters", AdapterEntry)
        return self._adapters

    def add_commands(self, subparsers: argparse._SubParsersAction[argparse.ArgumentParser]
                     ) -> dict[str, str]:
        """Let each plugin add its ``guardrail`` subcommands; a name taken twice is an error
        naming the plugin. Returns the plugin that added each command."""
        added: dict[str, str] = {}
        for impl in reversed(self.pm.hook.guardrail_register_commands.get_hookimpls()):
            before = set(subparsers.choices)
            try:
                impl.function(**{arg: subparsers for arg in impl.argnames})
            except argparse.ArgumentError as exc:
                raise GuardrailError(f"plugin {impl.plugin_name!r} adds a command that "
                                     f"exists: {exc}") from None
            added.update(dict.fromkeys(sorted(set(subparsers.choices) - before),
                                       impl.plugin_name))
        return added

    def monitor(self, name: str) -> MonitorEntry:
        """The monitor registered as ``name``, its factory imported if it was registered as
        ``"module:attribute"``."""
        entries = self.monitors()
        if name not in entries:
            raise MonitorNotFound(name, list(entries))
        entries[name] = _imported(entries[name])
        return entries[name]

    def observer(self, name: str) -> ObserverEntry:
        entries = self.observers()
        if name not in entries:
            raise MonitorNotFound(name, list(entries), kind="observer")
        return entries[name]

    def on_event(self, event: Event, session: GuardSession) -> None:
        self.pm.hook.guardrail_on_event(event=event, session=session)

    def session_start(self, session: GuardSession) -> None:
        self.pm.hook.guardrail_session_start(session=session)

    def session_end(self, session: GuardSession, report: Report) -> None:
        self.pm.hook.guardrail_session_end(session=session, report=report)

    # -- internals ------------------------------------------------------------------------

    def _collect(self, hook_name: str, entry_type: Any) -> dict[str, Any]:
        """Call each implementation of a register hook with a callback that records which
        plugin registered what, so duplicates name both plugins."""
        caller = getattr(self.pm.hook, hook_name)
        entries: dict[str, Any] = {}
        # pluggy calls the last-registered implementation first; keep that order.
        for impl in reversed(caller.get_hookimpls()):
            plugin_name = impl.plugin_name

            def register(name: str, factory: Any, *, description: str = "",
                         _plugin: str = plugin_name, **extra: Any) -> None:
                if not isinstance(name, str) or not name:
                    raise GuardrailError(f"plugin {_plugin!r} registered a nameless entry")
                if name in entries:
                    raise GuardrailError(
                        f"{name!r} is registered twice: by {entries[name].plugin!r} "
                        f"and by {_plugin!r}"
                    )
                try:
                    entries[name] = entry_type(name, factory, description, _plugin, **extra)
                except TypeError:
                    raise GuardrailError(f"plugin {_plugin!r} registered {name!r} with unknown "
                                         f"arguments {sorted(extra)}") from None

            kwargs = {arg: register for arg in impl.argnames}
            impl.function(**kwargs)
        return entries

    @staticmethod
    def _trace_before(hook_name: str, hook_impls: Any, kwargs: Mapping[str, Any]) -> None:
        log.info("hook %s -> %s", hook_name, [i.plugin_name for i in hook_impls])

    @staticmethod
    def _trace_after(outcome: Any, hook_name: str, hook_impls: Any, kwargs: Any) -> None:
        log.info("hook %s done", hook_name)


def build_monitor(entry: MonitorEntry, options: Mapping[str, Any]) -> Monitor:
    """Instantiate a registered monitor with the policy's ``options`` mapping.

    Raises ``ValueError`` with a readable message for bad options.
    """
    factory = _imported(entry).factory
    if isinstance(factory, type) and issubclass(factory, Monitor):
        options_model: type[BaseModel] = factory.Options
        try:
            parsed = options_model.model_validate(dict(options))
        except ValidationError as exc:
            raise _OptionsError(exc) from None
        monitor = factory(parsed)  # type: ignore[call-arg]
    else:
        try:
            monitor = factory(**options)
        except ValidationError as exc:
            raise _OptionsError(exc) from None
        except TypeError as exc:
            raise ValueError(f"bad options for monitor {entry.name!r}: {exc}") from None
    if not isinstance(monitor, Monitor):
        raise GuardrailError(
            f"monitor factory {entry.name!r} from {entry.plugin!r} returned "
            f"{type(monitor).__name__}, not a guardrail.Monitor"
        )
    return monitor


def _imported(entry: MonitorEntry) -> MonitorEntry:
    """``entry`` with a ``"module:attribute"`` factory imported."""
    if not isinstance(entry.factory, str):
        return entry
    module, _, attribute = entry.factory.partition(":")
    try:
        factory = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as exc:
        raise GuardrailError(f"monitor {entry.name!r} from {entry.plugin!r}: cannot import "
                             f"{entry.factory!r} ({type(exc).__name__}: {exc})") from exc
    return dataclasses.replace(entry, factory=factory)


class _OptionsError(ValueError):
    """Bad monitor options; ``errors`` holds (relative path, message) pairs."""

    def __init__(self, exc: ValidationError) -> None:
        self.errors = [
            (tuple(e["loc"]), "unknown option" if e["type"] == "extra_forbidden" else e["msg"])
            for e in exc.errors()
        ]
        super().__init__("; ".join(f"{'.'.join(map(str, p))}: {m}" for p, m in self.errors))


_host: PluginHost | None = None


def get_host() -> PluginHost:
    """The process-wide plugin host, created on first use."""
    global _host
    if _host is None:
        _host = PluginHost()
    return _host


def reset_host() -> None:
    """Forget the process-wide host (tests; after installing a plugin at run time)."""
    global _host
    _host = None
