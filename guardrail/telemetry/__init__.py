"""Telemetry for operators: hook plugins that watch one Guard's streams.

    from guardrail.telemetry.prometheus import PrometheusMetrics   # needs prometheus-client
    from guardrail.telemetry.otel import OtelTracing               # needs opentelemetry-api

Each is a ``GuardListener``: ``attach(guard)`` registers it on the guard's plugin host
(``guardrail_session_start`` / ``guardrail_on_event`` / ``guardrail_session_end``) and times the
guard's observer reads and monitor updates. This package imports neither library until one of
those classes is built, so the core keeps its three dependencies.
"""

from __future__ import annotations

from ._base import GuardListener

__all__ = ["GuardListener"]
