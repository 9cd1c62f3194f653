"""``GuardrailLiteLLM``: our monitors as a LiteLLM proxy guardrail (imports litellm; load it
through ``guardrail_litellm.GuardrailLiteLLM`` so the package imports without LiteLLM).

config.yaml::

    guardrails:
      - guardrail_name: guardrail-stream
        litellm_params:
          guardrail: guardrail_litellm.GuardrailLiteLLM
          mode: post_call
          default_on: true
          policy: /path/to/policy.yaml     # optional; default: the built-in default policy

Streams run through ``async_post_call_streaming_iterator_hook``: every chunk feeds our session
(no re-scan of the accumulated text), held-back text moves to later chunks, and a halt closes the
upstream and raises LiteLLM's ``StreamingCallbackError``, which the proxy sends as its in-stream
``data: {"error": ...}`` frame (or as a plain HTTP 400 when nothing was sent yet); non-streamed
answers get LiteLLM's guardrail ``HTTPException(400)``. With
``on_halt: content_filter`` the stream instead ends like OpenAI's: the halt message in a last chunk
with ``finish_reason="content_filter"``. ``async_post_call_success_hook`` judges non-streamed
answers. Flags (and the halt) go to LiteLLM's guardrail logging
(``standard_logging_guardrail_information``), LiteLLM's place for guardrail results.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Mapping
from pathlib import Path
from typing import Any, Literal

from fastapi import HTTPException
from litellm.integrations.custom_guardrail import CustomGuardrail
from litellm.types.guardrails import GuardrailEventHooks

from guardrail import Guard, GuardrailError, Halt

from ._stream import StreamGuard, guard_text, request_messages

__all__ = ["GuardrailLiteLLM"]

OnHalt = Literal["error", "content_filter"]


class GuardrailLiteLLM(CustomGuardrail):
    """A LiteLLM ``CustomGuardrail`` that runs a guardrail policy over each response stream.

    Extra ``litellm_params`` it reads: ``policy`` (a policy YAML path; default: the built-in
    default policy) and ``on_halt`` (``error``: raise LiteLLM's guardrail error, the default;
    ``content_filter``: end the stream with the halt message and ``finish_reason=content_filter``).
    """

    def __init__(self, *, policy: str | None = None, on_halt: OnHalt = "error",
                 guard: Guard | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("supported_event_hooks", [GuardrailEventHooks.post_call])
        if on_halt not in ("error", "content_filter"):
            raise ValueError(f"on_halt must be 'error' or 'content_filter', got {on_halt!r}")
        super().__init__(**kwargs)
        self.on_halt: OnHalt = on_halt
        if guard is None:
            if policy is not None and not Path(policy).expanduser().is_file():
                raise GuardrailError(f"litellm_params.policy: no policy file at {policy!r}")
            guard = Guard.from_yaml(Path(policy).expanduser()) if policy else Guard.default()
        self.guard = guard

    # -- streaming -------------------------------------------------------------------------

    async def async_post_call_streaming_iterator_hook(
        self, user_api_key_dict: Any, response: Any, request_data: dict[str, Any],
    ) -> AsyncGenerator[Any, None]:
        if not self.should_run_guardrail(request_data, GuardrailEventHooks.post_call):
            async for item in response:
                yield item
            return
        stream = StreamGuard(self.guard, request_messages(request_data),
                             metadata={"litellm_call_id": request_data.get("litellm_call_id")})
        started = time.time()
        last: Any = None
        try:
            async for chunk in response:
                last = chunk
                out = stream.on_chunk(chunk)
                if stream.halt is not None:
                    await _close(response)  # stop the upstream generating before we answer
                    for item in self._halted(stream.halt, last):
                        yield item
                    return
                if out is not None:
                    yield out
            tails = stream.on_end()
            if stream.halt is not None:
                for item in self._halted(stream.halt, last):
                    yield item
                return
            for index, text in tails.items():
                if last is not None:
                    yield _text_chunk(last, index, text, finish_reason=None)
        finally:
            stream.abort("stream closed early")
            self._log(request_data, stream.summary(), stream.halt, started)

    def _halted(self, halt: Halt, template: Any) -> list[Any]:
        if self.on_halt == "error" or template is None:
            raise _stream_violation(halt, self.guardrail_name)
        return [_text_chunk(template, 0, halt.notice, finish_reason="content_filter")]

    # -- non-streaming ---------------------------------------------------------------------

    async def async_post_call_success_hook(
        self, data: dict[str, Any], user_api_key_dict: Any, response: Any,
    ) -> Any:
        if not self.should_run_guardrail(data, GuardrailEventHooks.post_call):
            return response
        started = time.time()
        events: list[dict[str, Any]] = []
        halt: Halt | None = None
        for choice in getattr(response, "choices", None) or ():
            message = getattr(choice, "message", None)
            content = getattr(message, "content", None)
            if message is None or not isinstance(content, str) or not content:
                continue
            report = guard_text(self.guard, content, request_messages(data))
            events += [e for e in report.to_dict()["flags"]]
            if report.halt is not None:
                halt = report.halt
                if self.on_halt == "content_filter":
                    message.content = report.halt.message
                    choice.finish_reason = "content_filter"
                    continue
                break
            message.content = report.released_text
        self._log(data, {"halted": halt is not None, "events": events}, halt, started)
        if halt is not None and self.on_halt == "error":
            raise _violation(halt, self.guardrail_name)
        return response

    # -- logging ---------------------------------------------------------------------------

    def _log(self, request_data: dict[str, Any], summary: Mapping[str, Any], halt: Halt | None,
             started: float) -> None:
        self.add_standard_logging_guardrail_information_to_request_data(
            guardrail_json_response=dict(summary),
            request_data=request_data,
            guardrail_status="guardrail_intervened" if halt is not None else "success",
            start_time=started,
            end_time=time.time(),
            duration=time.time() - started,
            guardrail_provider="guardrail",
            event_type=GuardrailEventHooks.post_call,
        )


def _violation(halt: Halt, name: str | None) -> HTTPException:
    """LiteLLM's guardrail error: status 400 and a detail dict, as its built-in filters raise."""
    return HTTPException(status_code=400, detail={
        "error": halt.message, "guardrail": name, "monitor": halt.monitor,
        "reason": halt.reason, "at_token": halt.at,
    })


def _stream_violation(halt: Halt, name: str | None) -> Exception:
    """LiteLLM's in-stream guardrail error: the proxy turns a ``StreamingCallbackError`` into a
    ``data: {"error": {message, type, param, code}}`` frame (or a plain HTTP error when no chunk
    was sent yet), as its partner guardrails (Aim, Cato) block streams. An ``HTTPException``
    raised after the first chunk would instead abort the response mid-body."""
    from litellm.proxy.proxy_server import StreamingCallbackError

    class GuardrailHalted(StreamingCallbackError):
        message = halt.message
        type = "guardrail_violation"
        param = f"{name}:{halt.monitor}" if name else halt.monitor
        status_code = 400

    return GuardrailHalted(halt.message)


def _text_chunk(template: Any, index: int, text: str, *, finish_reason: str | None) -> Any:
    """A chunk like ``template`` carrying only ``text`` for choice ``index``."""
    from litellm.types.utils import Delta, ModelResponseStream, StreamingChoices

    return ModelResponseStream(
        id=getattr(template, "id", None), model=getattr(template, "model", None),
        created=getattr(template, "created", None),
        choices=[StreamingChoices(index=index, delta=Delta(content=text),
                                  finish_reason=finish_reason)],
    )


async def _close(response: Any) -> None:
    """Close the upstream stream so the provider stops generating (LiteLLM's wrapper closes the
    HTTP response on ``aclose``); a plain async iterator has nothing to close."""
    aclose = getattr(response, "aclose", None)
    if aclose is not None:
        await aclose()
