"""The conversation a guarded stream answers, taken from the chain itself.

In ``prompt | model | guard.as_runnable()`` the guard never sees the prompt: LangChain hands it
only the model's output. While a guarded stream runs, a callback handler held in a context
variable (LangChain adds it to every run that starts in that context, see
``register_configure_hook``) records the messages of the chat model (or the prompts of the LLM)
that starts to feed it. The model starts when the guard pulls its first chunk, so the messages are
known before the guard's session is opened.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextvars import ContextVar, Token
from typing import Any

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import BaseMessage, HumanMessage, convert_to_messages
from langchain_core.prompt_values import PromptValue
from langchain_core.tracers.context import register_configure_hook

from guardrail import Prepared

__all__ = ["Catching", "ConversationCatcher", "current_catcher", "input_messages", "start_catching",
           "stop_catching"]


class ConversationCatcher(BaseCallbackHandler):
    """Keeps the input of the latest chat model or LLM run started in its context."""

    ignore_chain = True
    ignore_agent = True
    ignore_retriever = True
    ignore_custom_event = True

    def __init__(self, prepare: Callable[[list[BaseMessage]], Prepared] | None = None) -> None:
        self.messages: list[BaseMessage] | None = None
        # The guard's read of the conversation, begun as the model starts (Guard.prepare): the
        # guard's session takes it over when the first chunk arrives.
        self._prepare = prepare
        self.prepared: Prepared | None = None

    def on_chat_model_start(self, serialized: dict[str, Any], messages: list[list[BaseMessage]],
                            **kwargs: Any) -> None:
        if messages:
            self._caught(list(messages[0]))

    def on_llm_start(self, serialized: dict[str, Any], prompts: list[str],
                     **kwargs: Any) -> None:
        if prompts:
            self._caught([HumanMessage(prompts[0])])

    def _caught(self, messages: list[BaseMessage]) -> None:
        self.messages = messages
        if self._prepare is not None:
            self.close()  # a model that started again (a retry): its read is the one wanted
            try:
                self.prepared = self._prepare(messages)
            except Exception:  # noqa: BLE001 - an unreadable message: the session names it
                self.prepared = None

    def take_prepared(self) -> Prepared | None:
        """The read begun for the caught conversation, handed over once."""
        prepared, self.prepared = self.prepared, None
        return prepared

    def close(self) -> None:
        """Free a read no session took (the model failed before its first chunk)."""
        prepared = self.take_prepared()
        if prepared is not None:
            prepared.close()


_catcher: ContextVar[ConversationCatcher | None] = ContextVar("guardrail_conversation",
                                                              default=None)
register_configure_hook(_catcher, inheritable=False)


Catching = tuple[Token[ConversationCatcher | None], ConversationCatcher]
"""What ``start_catching`` set: the context variable's token and the stream's catcher."""


def start_catching(prepare: Callable[[list[BaseMessage]], Prepared] | None = None) -> Catching:
    """Catch the conversation of the models that start from here on in this context
    (``prepare``: begin the guard's read of it there)."""
    catcher = ConversationCatcher(prepare)
    return _catcher.set(catcher), catcher


def stop_catching(catching: Catching) -> None:
    """Stop catching; a read begun for the stream and not taken is freed (this stream's catcher,
    even when the generator is closed from another context)."""
    token, catcher = catching
    catcher.close()
    try:
        _catcher.reset(token)
    except ValueError:  # a generator closed from another context: that context never had it
        pass


def current_catcher() -> ConversationCatcher | None:
    return _catcher.get()


def input_messages(value: Any) -> list[BaseMessage]:
    """A chat model's input (a prompt value, a string or a list of messages) as messages."""
    if isinstance(value, PromptValue):
        return value.to_messages()
    if isinstance(value, str):
        return [HumanMessage(value)]
    if isinstance(value, BaseMessage):
        return [value]
    if isinstance(value, Sequence):
        return convert_to_messages(value)
    raise TypeError(f"cannot read a chat model input of type {type(value).__name__}")
