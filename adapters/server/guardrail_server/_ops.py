"""The operators' endpoints: ``/metrics`` (Prometheus), ``/dashboard`` and ``/dashboard.json``,
and traces, all fed by listeners attached to the app's guard.

With client keys these endpoints want one of them, as ``Authorization: Bearer KEY`` (a Prometheus
``authorization`` block) or as the password of HTTP Basic auth (the browser asks for it; any user
name). ``/health`` stays open for load balancers.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from guardrail import Guard, GuardrailError, Report
from guardrail.telemetry import GuardListener

from ._access import ClientKeys
from ._dashboard import DASHBOARD_HTML, LiveView
from ._metrics import ServerMetrics, metrics_available

__all__ = ["Operations"]

NO_STORE = {"Cache-Control": "no-store"}


class Operations:
    """The listeners and routes behind the operators' endpoints of one app."""

    def __init__(self, guard: Guard, keys: ClientKeys, *, metrics: bool | None,
                 dashboard: bool, traces: Any) -> None:
        self.keys = keys
        if metrics and not metrics_available():
            raise GuardrailError("metrics=True needs prometheus-client: "
                                 "pip install 'guardrail-server[metrics]'")
        self.listeners: list[GuardListener] = []
        self.metrics = ServerMetrics() if metrics or (metrics is None and
                                                       metrics_available()) else None
        self.live = LiveView() if dashboard else None
        self.tracing: GuardListener | None = None
        if traces:
            from guardrail.telemetry.otel import OtelTracing

            self.tracing = OtelTracing(None if traces is True else traces)
        for listener in (self.metrics, self.live, self.tracing):
            if listener is not None:
                self.listeners.append(listener.attach(guard))

    def close(self) -> None:
        for listener in self.listeners:
            listener.detach()

    def upstream_error(self, code: str) -> None:
        if self.metrics is not None:
            self.metrics.upstream_error(code)

    def reports(self, reports: Iterable[Report]) -> None:
        if self.metrics is not None:
            self.metrics.reports(reports)

    def routes(self) -> list[Route]:
        return [Route("/metrics", self.prometheus, methods=["GET"]),
                Route("/dashboard", self.dashboard, methods=["GET"]),
                Route("/dashboard.json", self.dashboard_json, methods=["GET"])]

    # -- handlers ----------------------------------------------------------------------------

    def _denied(self, request: Request) -> Response | None:
        if not self.keys:
            return None
        auth = request.headers.get("authorization") or ""
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "basic":
            try:
                _, _, password = base64.b64decode(value.strip()).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                password = ""
            auth = f"Bearer {password}"
        if self.keys.allows(auth):
            return None
        return JSONResponse({"error": {"message": "this guardrail proxy's operator endpoints "
                                       "want one of its client keys (Bearer, or as the Basic "
                                       "auth password)", "type": "invalid_request_error",
                                       "code": "invalid_api_key", "param": None}},
                            status_code=401,
                            headers={"WWW-Authenticate": 'Basic realm="guardrail"'})

    async def prometheus(self, request: Request) -> Response:
        denied = self._denied(request)
        if denied is not None:
            return denied
        if self.metrics is None:
            return Response("metrics are off: install prometheus-client "
                            "(pip install 'guardrail-server[metrics]')\n", status_code=404,
                            media_type="text/plain")
        return Response(self.metrics.exposition(), media_type=self.metrics.content_type,
                        headers=NO_STORE)

    async def dashboard(self, request: Request) -> Response:
        denied = self._denied(request)
        if denied is not None:
            return denied
        if self.live is None:
            return Response("the dashboard is off\n", status_code=404, media_type="text/plain")
        return HTMLResponse(DASHBOARD_HTML, headers={
            **NO_STORE, "Content-Security-Policy": "default-src 'none'; script-src "
            "'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'"})

    async def dashboard_json(self, request: Request) -> Response:
        denied = self._denied(request)
        if denied is not None:
            return denied
        if self.live is None:
            return JSONResponse({"error": "the dashboard is off"}, status_code=404)
        return JSONResponse(self.live.snapshot(), headers=NO_STORE)
