"""``GuardedModel``: a chat model and its guard as one Runnable, ``prompt | guard.wrap_model(m)``.

It hands the model's input (the prompt's messages) to the guard as the conversation, in every
mode: ``invoke`` and ``batch`` too, where ``prompt | model | guard.as_runnable()`` cannot see the
prompt (the guard runs after the model has finished).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.runnables import Runnable, RunnableConfig, RunnableSerializable
from pydantic import ConfigDict

from ._conversation import input_messages
from ._runnable import GuardIO, GuardRunnable

__all__ = ["GuardedModel", "wrap_model"]


class GuardedModel(RunnableSerializable[Any, GuardIO]):
    """``model | guard`` where the guard reads the model's input messages as context."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    model: Runnable[Any, Any]
    guard_runnable: GuardRunnable
    name: str | None = "guarded_model"

    @classmethod
    def is_lc_serializable(cls) -> bool:
        return False

    def _chain(self, input: Any) -> Runnable[Any, GuardIO]:
        guard = self.guard_runnable
        if guard.messages is None:
            guard = guard.model_copy(update={"messages": input_messages(input)})
        return self.model | guard

    def invoke(self, input: Any, config: RunnableConfig | None = None,
               **kwargs: Any) -> GuardIO:
        return self._chain(input).invoke(input, config, **kwargs)

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None,
                      **kwargs: Any) -> GuardIO:
        return await self._chain(input).ainvoke(input, config, **kwargs)

    def stream(self, input: Any, config: RunnableConfig | None = None,
               **kwargs: Any) -> Iterator[GuardIO]:
        yield from self._chain(input).stream(input, config, **kwargs)

    async def astream(self, input: Any, config: RunnableConfig | None = None,
                      **kwargs: Any) -> AsyncIterator[GuardIO]:
        async for chunk in self._chain(input).astream(input, config, **kwargs):
            yield chunk


def wrap_model(model: Runnable[Any, Any], *, guard: Any, **kwargs: Any) -> GuardedModel:
    """``guard.wrap_model(model, **as_runnable_kwargs)``."""
    return GuardedModel(model=model, guard_runnable=GuardRunnable(guard=guard, **kwargs))
