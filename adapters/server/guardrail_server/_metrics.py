"""The proxy's Prometheus metrics: the guard's own (``guardrail.telemetry.prometheus``) plus what
only the proxy sees, upstream failures by error code, in one registry per app.

Upstream errors are counted where the proxy answers them: before a stream opens (the client gets
the error status) and mid-stream (the session ends with ``aborted="upstream error: CODE"``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from guardrail import Report
from guardrail.telemetry.prometheus import PrometheusMetrics

__all__ = ["UPSTREAM_ABORT", "ServerMetrics", "metrics_available"]

UPSTREAM_ABORT = "upstream error: "  # _stream.guarded_sse's abort reason for an upstream failure


def metrics_available() -> bool:
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return False
    return True


class ServerMetrics(PrometheusMetrics):
    """``PrometheusMetrics`` plus ``guardrail_upstream_errors_total{code}``."""

    def __init__(self, registry: Any = None) -> None:
        super().__init__(registry)
        self.upstream_errors = self._prom.Counter(
            "guardrail_upstream_errors", "Upstream failures by error code (the 'code' the "
            "client gets: upstream_timeout, upstream_http_429, ...)", ["code"],
            registry=self.registry)

    def upstream_error(self, code: str) -> None:
        self.upstream_errors.labels(code).inc()

    def reports(self, reports: Iterable[Report]) -> None:
        """One request's reports: an upstream failure mid-stream counts once per request."""
        for report in reports:
            if report.aborted and report.aborted.startswith(UPSTREAM_ABORT):
                self.upstream_error(report.aborted[len(UPSTREAM_ABORT):])
                return
