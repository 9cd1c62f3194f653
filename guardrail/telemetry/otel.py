"""OpenTelemetry spans of one Guard's streams, from its session hooks (needs ``opentelemetry-api``;
an SDK or distro decides where spans go).

    from guardrail.telemetry.otel import OtelTracing
    OtelTracing().attach(guard)            # the global tracer provider
    OtelTracing(tracer_provider=provider).attach(guard)

One span per stream, named after the GenAI semantic conventions (``chat {model}``, with
``gen_ai.operation.name``, ``gen_ai.request.model``, ``gen_ai.response.finish_reasons``), a child
span per observer read, and span events for flags, halts, routes and monitor errors with monitor
ids and scores. No text is recorded: only ids, scores and offsets. Names are in
docs/operations.md.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from ..errors import GuardrailError
from ..events import Error, Flag, Halt, Route
from ._base import GuardListener

if TYPE_CHECKING:
    from ..events import Event
    from ..session import GuardSession, Report

__all__ = ["OPERATION", "READ_SPAN", "OtelTracing"]

OPERATION = "chat"
READ_SPAN = "guardrail.observer.read"
TRACER_NAME = "guardrail"


def _otel() -> Any:
    try:
        from opentelemetry import trace
    except ImportError:
        raise GuardrailError("traces need opentelemetry-api (and an SDK to export them): "
                             "pip install 'guardrail[otel]'") from None
    return trace


class OtelTracing(GuardListener):
    """Spans for one guard's streams through ``tracer_provider`` (default: the global one)."""

    def __init__(self, tracer_provider: Any = None) -> None:
        super().__init__()
        self._trace = _otel()
        self.tracer = self._trace.get_tracer(TRACER_NAME, tracer_provider=tracer_provider)
        self._lock = threading.Lock()
        self._spans: dict[str, Any] = {}  # session id -> its open stream span

    def _span(self, session: GuardSession | None) -> Any:
        if session is None:
            return None
        with self._lock:
            return self._spans.get(session.id)

    def started(self, session: GuardSession) -> None:
        model = session.metadata.get("model")
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": OPERATION,
            "guardrail.session.id": session.id,
            "guardrail.monitors": [spec.id for spec, _ in session.guard.monitors],
            "guardrail.dry_run": session.dry_run,
        }
        if isinstance(model, str) and model:
            attributes["gen_ai.request.model"] = model
        adapter = session.metadata.get("adapter")
        if isinstance(adapter, str):
            attributes["guardrail.adapter"] = adapter
        name = f"{OPERATION} {model}" if isinstance(model, str) and model else OPERATION
        span = self.tracer.start_span(name, attributes=attributes)
        with self._lock:
            self._spans[session.id] = span

    def event(self, event: Event, session: GuardSession) -> None:
        span = self._span(session)
        if span is None:
            return
        if isinstance(event, Flag):
            span.add_event("guardrail.flag", {
                "guardrail.monitor.id": event.monitor, "guardrail.score": event.score,
                "guardrail.action": event.action, "guardrail.rule": event.rule,
                "guardrail.token.start": event.tokens[0], "guardrail.token.end": event.tokens[1],
                "guardrail.char.start": event.span[0], "guardrail.char.end": event.span[1],
                **({"guardrail.label": event.label} if event.label else {})})
        elif isinstance(event, Halt):
            span.add_event("guardrail.halt", {
                "guardrail.monitor.id": event.monitor, "guardrail.reason": event.reason,
                "guardrail.token.index": event.at, "guardrail.char.index": event.at_char,
                "guardrail.tokens.retracted": event.retracted_tokens,
                **({"guardrail.score": event.score} if event.score is not None else {})})
        elif isinstance(event, Route):
            span.add_event("guardrail.route", {
                "guardrail.monitor.id": event.monitor, "guardrail.score": event.score,
                "guardrail.token.index": event.at, "guardrail.char.index": event.at_char,
                "guardrail.route.model": str(event.target.get("model", ""))})
        elif isinstance(event, Error):
            span.add_event("guardrail.error", {
                "guardrail.monitor.id": event.monitor, "error.type": event.error_type,
                "guardrail.on_error": event.outcome})

    def observer_read(self, session: GuardSession | None, tokens: int, start_ns: int,
                      end_ns: int) -> None:
        parent = self._span(session)
        if parent is None:
            return
        context = self._trace.set_span_in_context(parent)
        # a session reads its unread tokens before it records them: the read starts at .tokens
        first = session.tokens if session is not None else -1
        read = self.tracer.start_span(READ_SPAN, context=context, start_time=start_ns,
                                      attributes={"guardrail.observer.tokens": tokens,
                                                  "guardrail.token.start": first})
        read.end(end_time=end_ns)

    def ended(self, session: GuardSession, report: Report) -> None:
        with self._lock:
            span = self._spans.pop(session.id, None)
        if span is None:
            return
        finish = "content_filter" if report.halted else "stop"
        span.set_attributes({
            "gen_ai.response.finish_reasons": [finish],
            "guardrail.tokens.read": report.tokens,
            "guardrail.tokens.released": report.released_tokens,
            "guardrail.halted": report.halted,
            "guardrail.flags": len(report.flags),
            "guardrail.leaked_tokens": report.leaked_tokens,
            "guardrail.observer.seconds": report.observer_seconds,
            **{f"guardrail.monitor.{k}.seconds": v for k, v in report.monitor_seconds.items()},
        })
        if report.halt is not None:
            span.set_attribute("guardrail.halt.monitor", report.halt.monitor)
        if report.aborted:
            span.set_attribute("guardrail.aborted", report.aborted)
            if report.aborted.startswith(("upstream error", "proxy error")):
                span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, report.aborted))
        span.end()
