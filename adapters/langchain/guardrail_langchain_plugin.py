"""Entry point of the ``guardrail`` plugin group for guardrail-langchain: ``Guard.as_runnable``
and ``Guard.wrap_model``.

A module of its own, outside the package, so that loading plugins (every ``guardrail`` start)
does not import LangChain.
"""

from __future__ import annotations

from typing import Any

from guardrail import Guard, hookimpl
from guardrail.hookspecs import RegisterAdapter


def as_runnable(guard: Guard, **kwargs: Any) -> Any:
    """``guard.as_runnable(**kwargs)``: a ``guardrail_langchain.GuardRunnable``."""
    from guardrail_langchain import GuardRunnable

    guard.warn_routes_recorded("the LangChain runnable")
    return GuardRunnable(guard=guard, **kwargs)


def wrap_model(guard: Guard, model: Any, **kwargs: Any) -> Any:
    """``guard.wrap_model(model, **kwargs)``: see ``guardrail_langchain.wrap_model``."""
    from guardrail_langchain import wrap_model as wrap

    guard.warn_routes_recorded("the LangChain runnable")
    return wrap(model, guard=guard, **kwargs)


@hookimpl
def guardrail_register_adapters(register: RegisterAdapter) -> None:
    register("as_runnable", as_runnable,
             description="prompt | model | guard.as_runnable(): a LangChain stream, guarded")
    register("wrap_model", wrap_model,
             description="prompt | guard.wrap_model(model): a LangChain chat model, guarded")
