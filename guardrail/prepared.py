"""A conversation read before its stream: ``Guard.prepare``.

A session reads its conversation (system prompt, user turns) when its first text arrives, so the
first releases wait for that read. An adapter knows the conversation earlier, when it sends the
request upstream: ``guard.prepare(messages)`` starts the observer's read then, while the upstream
works on its first token, and the session given it (``guard.session(..., prepared=)``) takes over
the read under way. Nothing else starts early: no monitor, hook or metric sees a stream until its
session exists, so a request that fails upstream leaves no trace but the read, which ``close``
frees (or garbage collection, should the adapter drop it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .errors import GuardrailError
from .messages import normalize_messages
from .monitor import Message

if TYPE_CHECKING:
    from types import TracebackType

    from .guard import Guard

__all__ = ["Prepared"]


class Prepared:
    """The observer's read of one conversation, started ahead of its stream.

    Give it to ``guard.session(messages, prepared=...)``, which takes it over (the session frees
    it when it ends), or ``close()`` it when no stream follows (the upstream failed). A guard
    whose observer reads on the caller's thread (no batched ``submit``), or that reads no layers,
    starts nothing here: the handle is empty and the session reads as usual."""

    def __init__(self, guard: Guard, messages: Sequence[Message | Any]) -> None:
        self.guard = guard
        self.messages: list[Message] = list(normalize_messages(messages))
        self._state: Any = None
        self._closed = False
        self._claimed = False  # given to a session, which takes the read at its first text
        observer = guard.observer
        if guard.needs.observer and callable(getattr(observer, "submit", None)):
            try:
                self._state = observer.start(self.messages, guard.needs)
            except Exception:  # noqa: BLE001 - the session starts it again and follows on_error
                self._state = None

    @property
    def started(self) -> bool:
        """Whether a read is under way (or done) and not yet taken or closed."""
        return self._state is not None

    @property
    def closed(self) -> bool:
        return self._closed

    def claim(self, guard: Guard, messages: Sequence[Message]) -> Prepared:
        """Hand the read to a session of ``guard`` on ``messages`` (once)."""
        if guard is not self.guard:
            raise GuardrailError("prepared= was made by another Guard (guard.prepare); "
                                 "a session takes only its own guard's read")
        if self._claimed or self._closed:
            raise GuardrailError("prepared= was already taken by a session or closed")
        if list(messages) != self.messages:
            raise GuardrailError("prepared= read another conversation than this session's "
                                 "messages; prepare the messages the session is given")
        self._claimed = True
        return self

    def take(self) -> Any:
        """The observer stream, handed over once (None if nothing was started); the handle is
        closed afterwards and the taker owns the stream."""
        state, self._state = self._state, None
        self._closed = True
        return state

    def close(self) -> None:
        """Free the read if no session took it (idempotent)."""
        state = self.take()
        release = getattr(self.guard.observer, "release", None)
        if state is not None and release is not None:
            release(state)

    def __enter__(self) -> Prepared:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        status = "started" if self.started else "closed" if self._closed else "empty"
        return f"<Prepared {status}, {len(self.messages)} message(s)>"
