"""The hooks a guardrail plugin can implement (pluggy project name ``"guardrail"``).

Implement any of them in a module or class, mark each with ``guardrail.hookimpl`` and expose the
module through the ``guardrail`` entry-point group. Hook implementations may take fewer
arguments than the spec names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import pluggy

if TYPE_CHECKING:
    import argparse

    from .events import Event
    from .session import GuardSession, Report

__all__ = [
    "PROJECT",
    "RegisterAdapter",
    "RegisterMonitor",
    "RegisterObserver",
    "RegisterTrainer",
    "hookimpl",
    "hookspec",
]

PROJECT = "guardrail"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class RegisterMonitor(Protocol):
    def __call__(self, name: str, factory: Any, *, description: str = "",
                 default: bool = False) -> None:
        """Register ``factory`` under ``name``. ``factory`` is a ``Monitor`` subclass (its
        ``Options`` model validates the policy's ``options:`` and is passed to ``__init__``) or any
        callable taking the options as keyword arguments and returning a ``Monitor``, or either
        one as ``"module:attribute"``, imported when a policy first uses it (so listing and
        building other monitors never imports this one's model stack). ``default=True`` puts
        the monitor in the built-in default policy (``Guard.default()``) with its
        ``default_spec``."""


class RegisterObserver(Protocol):
    def __call__(self, name: str, factory: Any, *, description: str = "") -> None:
        """Register an observer factory: a callable ``factory(spec: ObserverSpec) -> Observer``."""


class RegisterTrainer(Protocol):
    def __call__(self, name: str, train: Any, *, description: str = "") -> None:
        """Register ``train(argv: list[str]) -> int`` for ``guardrail train NAME [ARGS...]``."""


class RegisterAdapter(Protocol):
    def __call__(self, name: str, factory: Any, *, description: str = "") -> None:
        """Provide the ``Guard`` method ``name`` (``wrap``, ``as_runnable``, ``wrap_model``):
        ``guard.NAME(*args, **kwargs)`` returns ``factory(guard, *args, **kwargs)``."""


# -- registration hooks: called once when a Guard is built -----------------------------------


@hookspec
def guardrail_register_monitors(register: RegisterMonitor) -> None:
    """Register monitor factories by name.

    :param register: call ``register(name, factory, description=...)`` once per monitor.

    Example::

        @guardrail.hookimpl
        def guardrail_register_monitors(register):
            register("shouting", ShoutingMonitor, description="flags ALL-CAPS words")
    """


@hookspec
def guardrail_register_observers(register: RegisterObserver) -> None:
    """Register hidden-state observers (model sources shared by every monitor) by name.

    :param register: call ``register(name, factory, description=...)``; ``factory(spec)`` gets the
        policy's ``ObserverSpec`` and returns a loaded observer.
    """


@hookspec
def guardrail_register_trainers(register: RegisterTrainer) -> None:
    """Register training entry points for ``guardrail train NAME ...`` (usually one per monitor).

    :param register: call ``register(name, train, description=...)``; ``train(argv)`` parses its
        own arguments (``argv`` excludes ``NAME``) and returns an exit code.
    """


@hookspec
def guardrail_register_adapters(register: RegisterAdapter) -> None:
    """Provide the ``Guard`` methods that hand a guard to another library: ``wrap`` (an OpenAI
    client), ``as_runnable`` and ``wrap_model`` (LangChain). The adapter distributions implement
    it, so the core imports none of them.

    :param register: call ``register(name, factory, description=...)``; ``guard.NAME(...)``
        returns ``factory(guard, ...)``.
    """


@hookspec
def guardrail_register_commands(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    """Add ``guardrail`` subcommands (as ``guardrail serve`` and ``guardrail demo`` are added).

    :param subparsers: the CLI's subparsers: ``p = subparsers.add_parser(NAME, help=...)``, then
        ``p.set_defaults(func=handler)`` where ``handler(args) -> int`` returns the exit code.
        Import heavy modules inside the handler: every ``guardrail`` command builds the parser.
    """


# -- stream hooks: called by every session ---------------------------------------------------


@hookspec
def guardrail_session_start(session: GuardSession) -> None:
    """A stream started. ``session.id`` names it in later hooks.

    :param session: the new session (read ``session.policy``, ``session.messages``).
    """


@hookspec
def guardrail_on_event(event: Event, session: GuardSession) -> None:
    """Every event a session emits: ``Release``, ``Flag``, ``Halt``, ``Route`` and ``Error``.

    Called before the adapter acts on it, so an audit sink that writes here has the record before
    the reader sees a halt. Keep it quick: it runs on the stream's path.

    :param event: the event.
    :param session: the session that emitted it.
    """


@hookspec
def guardrail_session_end(session: GuardSession, report: Report) -> None:
    """A stream ended (finished, halted or abandoned).

    :param session: the session.
    :param report: what happened: tokens read and released, verdicts, timings.
    """

