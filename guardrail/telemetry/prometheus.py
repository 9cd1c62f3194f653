"""Prometheus metrics of one Guard, from its session hooks (needs ``prometheus-client``).

    from guardrail.telemetry.prometheus import PrometheusMetrics
    metrics = PrometheusMetrics().attach(guard)       # its own CollectorRegistry
    text = metrics.exposition()                       # the /metrics body

Metric names and labels are listed in docs/operations.md. Labels are bounded: monitor ids come
from the policy, ``action``/``cause``/``outcome`` from small fixed sets; no text, no session ids.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from ..errors import GuardrailError
from ..events import Error, Flag, Halt, Route
from ._base import GuardListener

if TYPE_CHECKING:
    from ..events import Event
    from ..guard import Guard
    from ..session import GuardSession, Report

__all__ = ["PrometheusMetrics"]

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                   0.5, 1.0, 2.5, 5.0)
TOKEN_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
STREAM_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError:
        raise GuardrailError("metrics need prometheus-client: "
                             "pip install 'guardrail[metrics]'") from None
    return prometheus_client


class PrometheusMetrics(GuardListener):
    """Counters and histograms of one guard's streams in ``registry`` (a fresh
    ``CollectorRegistry`` by default, so two guards or two tests never share series)."""

    def __init__(self, registry: Any = None) -> None:
        super().__init__()
        prom = _prometheus()
        self._prom = prom
        self.registry = registry if registry is not None else prom.CollectorRegistry()
        r = self.registry
        c, g, h = prom.Counter, prom.Gauge, prom.Histogram
        self.streams_started = c("guardrail_streams_started", "Streams (guard sessions) started",
                                 registry=r)
        self.streams_active = g("guardrail_streams_active", "Streams being guarded now",
                                registry=r)
        self.streams_ended = c("guardrail_streams_ended",
                               "Streams ended, by outcome (completed, halted, aborted)",
                               ["outcome"], registry=r)
        self.tokens_read = c("guardrail_tokens_read", "Response tokens the guard read",
                             registry=r)
        self.tokens_released = c("guardrail_tokens_released",
                                 "Response tokens released to readers", registry=r)
        self.flags = c("guardrail_flags", "Flag events by monitor and action",
                       ["monitor", "action"], registry=r)
        self.halts = c("guardrail_halts",
                       "Halts by monitor; cause is verdict or error (fail_closed)",
                       ["monitor", "cause"], registry=r)
        self.routes = c("guardrail_routes", "Route events by monitor", ["monitor"], registry=r)
        self.errors = c("guardrail_monitor_errors",
                        "Monitor or observer failures by monitor and on_error outcome",
                        ["monitor", "outcome"], registry=r)
        self.past_verdict = h("guardrail_tokens_past_verdict",
                              "Per halted stream: tokens the upstream generated and the guard "
                              "read after the token that fired the halt",
                              buckets=TOKEN_BUCKETS, registry=r)
        self.leaked = c("guardrail_leaked_tokens",
                        "Tokens released at or after the token that fired a halt", registry=r)
        self.monitor_seconds = h("guardrail_monitor_seconds",
                                 "Seconds per Monitor.update call (one read)", ["monitor"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.observer_seconds = h("guardrail_observer_seconds",
                                  "Seconds per observer read (one forward over new tokens)",
                                  buckets=LATENCY_BUCKETS, registry=r)
        self.observer_batch = h("guardrail_observer_batch_tokens",
                                "New tokens per observer read", buckets=TOKEN_BUCKETS,
                                registry=r)
        self.read_tokens = h("guardrail_read_tokens",
                             "New tokens per guard read (monitor update), observer or not",
                             buckets=TOKEN_BUCKETS, registry=r)
        self.stream_seconds = h("guardrail_stream_seconds", "Wall seconds per stream",
                                buckets=STREAM_BUCKETS, registry=r)
        self._lock = threading.Lock()
        self._seen: dict[str, int] = {}  # session id -> tokens already counted
        self._first_monitor: str | None = None

    def attach(self, guard: Guard) -> PrometheusMetrics:
        super().attach(guard)
        self._first_monitor = guard.monitors[0][0].id if guard.monitors else None
        for spec, _ in guard.monitors:  # every monitor's series exists from the start at 0
            self.halts.labels(spec.id, "verdict")
            if spec.action in ("flag", "redact"):
                self.flags.labels(spec.id, spec.action)
        return self

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format (``CONTENT_TYPE``)."""
        data: bytes = self._prom.generate_latest(self.registry)
        return data

    @property
    def content_type(self) -> str:
        return str(self._prom.CONTENT_TYPE_LATEST)

    # -- listener ----------------------------------------------------------------------------

    def started(self, session: GuardSession) -> None:
        self.streams_started.inc()
        self.streams_active.inc()
        with self._lock:
            self._seen[session.id] = 0

    def _count_tokens(self, session: GuardSession, now: int) -> None:
        with self._lock:
            last = self._seen.get(session.id, 0)
            self._seen[session.id] = now  # a reroute cuts tokens back: count from there on
        if now > last:
            self.tokens_read.inc(now - last)

    def event(self, event: Event, session: GuardSession) -> None:
        self._count_tokens(session, session.tokens)
        if isinstance(event, Flag):
            self.flags.labels(event.monitor, event.action).inc()
        elif isinstance(event, Halt):
            failed = event.reason.startswith("monitor failed")
            self.halts.labels(event.monitor, "error" if failed else "verdict").inc()
        elif isinstance(event, Route):
            self.routes.labels(event.monitor).inc()
        elif isinstance(event, Error):
            self.errors.labels(event.monitor, event.outcome).inc()

    def ended(self, session: GuardSession, report: Report) -> None:
        self._count_tokens(session, report.tokens)
        with self._lock:
            self._seen.pop(session.id, None)
        self.streams_active.dec()
        outcome = "halted" if report.halted else "aborted" if report.aborted else "completed"
        self.streams_ended.labels(outcome).inc()
        self.tokens_released.inc(report.released_tokens)
        self.stream_seconds.observe(report.wall_seconds)
        if report.halt is not None and report.halt.at >= 0:
            self.past_verdict.observe(max(0, report.tokens - report.halt.at - 1))
            self.leaked.inc(report.leaked_tokens)

    def observer_read(self, session: GuardSession | None, tokens: int, start_ns: int,
                      end_ns: int) -> None:
        self.observer_seconds.observe((end_ns - start_ns) / 1e9)
        self.observer_batch.observe(tokens)

    def monitor_update(self, session: GuardSession | None, monitor: str, tokens: int,
                       seconds: float) -> None:
        self.monitor_seconds.labels(monitor).observe(seconds)
        if monitor == self._first_monitor:  # every monitor sees the same read: count it once
            self.read_tokens.observe(tokens)
