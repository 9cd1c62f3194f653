"""Entry point of the ``guardrail`` plugin group for guardrail-openai: ``Guard.wrap``.

A module of its own, outside the package, so that loading plugins (every ``guardrail`` start)
does not import openai.
"""

from __future__ import annotations

from typing import Any

from guardrail import Guard, hookimpl
from guardrail.hookspecs import RegisterAdapter


def wrap(guard: Guard, client: Any, **kwargs: Any) -> Any:
    """``guard.wrap(client, **kwargs)``: see ``guardrail_openai.wrap``."""
    from guardrail_openai import wrap as wrap_client

    guard.warn_routes_recorded("the OpenAI client wrapper")
    return wrap_client(client, guard=guard, **kwargs)


@hookimpl
def guardrail_register_adapters(register: RegisterAdapter) -> None:
    register("wrap", wrap,
             description="guard.wrap(client): an OpenAI or AsyncOpenAI client, guarded")
