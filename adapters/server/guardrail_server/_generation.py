"""Serve a guardrail-transformers ``LocalGenerator`` (``guardrail serve --local smollm2-135m``).

Unlike a plain local model (text only, see ``_local``), the generator's answer goes through
``guardrail_transformers.guarded_stream``: monitors read the generator's own hidden states and
logits with every token (no observer forward), and a halt stops generation before the next
forward pass. This module turns that stream's events into OpenAI chunks, one step at a time in a
worker thread (under the model's step lock, so concurrent requests interleave).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncGenerator, Mapping
from typing import Any

import anyio

from guardrail import Event, Guard, Halt, Release, Report, event_to_dict

from ._local import LocalModel, _Pieces, _step_lock
from ._sse import DONE, sse_data
from ._stream import ReportHook

__all__ = ["generator_completion", "generator_sse", "is_generator"]

log = logging.getLogger("guardrail.server")


def is_generator(model: LocalModel) -> bool:
    """True for a ``guardrail_transformers.LocalGenerator``."""
    try:
        from guardrail_transformers import LocalGenerator
    except ImportError:
        return False
    return isinstance(model, LocalGenerator)


def _options(body: Mapping[str, Any]) -> dict[str, Any]:
    """OpenAI request fields as ``guarded_stream`` options."""
    options: dict[str, Any] = {}
    for alias in ("max_completion_tokens", "max_tokens"):
        if body.get(alias) is not None:
            options.setdefault("max_new_tokens", int(body[alias]))
    for key in ("temperature", "top_p", "seed", "stop"):
        if body.get(key) is not None:
            options[key] = body[key]
    return options


class _Answer:
    """One guarded answer from the generator, pulled an event at a time."""

    def __init__(self, guard: Guard, generator: Any, body: Mapping[str, Any],
                 messages: list[dict[str, Any]], metadata: Mapping[str, Any]) -> None:
        from guardrail_transformers import guarded_stream

        session = guard.session(messages, metadata={**metadata, "choice": 0})
        self.stream = guarded_stream(guard, messages=messages, generator=generator,
                                     session=session, **_options(body))
        self.events = _Pieces(iter(self.stream), _step_lock(generator))
        self.id, self.created, self.model = (f"chatcmpl-{uuid.uuid4().hex[:16]}",
                                             int(time.time()), str(generator.name))

    @property
    def reports(self) -> list[Report]:
        return [self.stream.report] if self.stream.report is not None else []

    async def next(self) -> Event | None:
        event: Event | None = await self.events.next()
        return event

    def chunk(self, delta: dict[str, Any], finish: str | None,
              details: list[dict[str, Any]]) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if details:
            chunk["guardrail"] = {"events": details}
        return chunk


def _detail(event: Event) -> dict[str, Any]:
    return {"choice": 0, **event_to_dict(event)}


async def generator_sse(guard: Guard, generator: Any, body: Mapping[str, Any],
                        messages: list[dict[str, Any]], metadata: Mapping[str, Any],
                        on_report: ReportHook | None = None) -> AsyncGenerator[bytes, None]:
    """SSE bytes of a guarded local answer: text as the session releases it, guard events in
    the ``guardrail`` field, a ``content_filter`` chunk on halt, then ``[DONE]``."""
    answer = _Answer(guard, generator, body, messages, metadata)
    details: list[dict[str, Any]] = []
    try:
        try:
            yield sse_data(answer.chunk({"role": "assistant", "content": ""}, None, []))
            halted = False
            while (event := await answer.next()) is not None:
                if isinstance(event, Release):
                    yield sse_data(answer.chunk({"content": event.text}, None, details))
                    details = []
                elif isinstance(event, Halt):
                    halted = True
                    # No forward pass follows a halt; let the session finish (clean report).
                    while await answer.next() is not None:
                        pass
                    yield sse_data(answer.chunk({"content": event.notice}, "content_filter",
                                                [*details, _detail(event)]))
                    break
                else:
                    details.append(_detail(event))
            if not halted:
                yield sse_data(answer.chunk({}, "stop", details))
        except Exception as exc:  # noqa: BLE001 - a failed generation ends the stream cleanly
            log.error("local generation failed: %s: %s", type(exc).__name__, exc)
            yield sse_data({"error": {"message": f"local generation failed: "
                                                 f"{type(exc).__name__}: {exc}",
                                      "type": "server_error", "code": "generation_error",
                                      "param": None}})
        yield DONE
    finally:
        with anyio.CancelScope(shield=True):
            await answer.events.close()  # the session ends with a report (aborted if early)
        if on_report is not None:
            on_report(answer.reports)


async def generator_completion(guard: Guard, generator: Any, body: Mapping[str, Any],
                               messages: list[dict[str, Any]], metadata: Mapping[str, Any]
                               ) -> tuple[dict[str, Any], list[Report]]:
    """A whole guarded answer: released text (plus the halt message and ``content_filter`` on
    halt), with a ``guardrail`` field listing the events."""
    answer = _Answer(guard, generator, body, messages, metadata)
    shown: list[str] = []
    details: list[dict[str, Any]] = []
    finish = "stop"
    try:
        while (event := await answer.next()) is not None:
            if isinstance(event, Release):
                shown.append(event.text)
                continue
            details.append(_detail(event))
            if isinstance(event, Halt):
                shown.append(event.notice)
                finish = "content_filter"
                while await answer.next() is not None:  # the session finishes; no more forwards
                    pass
                break
    finally:
        with anyio.CancelScope(shield=True):
            await answer.events.close()
    completion: dict[str, Any] = {
        "id": answer.id, "object": "chat.completion", "created": answer.created,
        "model": answer.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(shown)},
                     "logprobs": None, "finish_reason": finish}]}
    if details:
        completion["guardrail"] = {"events": details}
    return completion, answer.reports
