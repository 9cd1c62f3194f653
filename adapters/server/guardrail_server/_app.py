"""``create_app``: the Starlette app of the proxy.

    POST /v1/chat/completions   guarded, streamed (SSE) or not
    GET  /v1/models             the upstream's list (proxied), or the local model
    GET  /health                liveness, mode and monitor ids
    GET  /metrics               Prometheus metrics (with prometheus-client installed)
    GET  /dashboard             the operators' live view (polls /dashboard.json)

Per request the app holds nothing but the request's own ChunkGuard/sessions; the Guard is shared
(it is stateless per stream). The caller's ``Authorization`` header goes to the upstream and
nowhere else: not into logs, session metadata, events, reports or error messages. With client
keys (``client_keys=``) that header is the caller's proxy key instead: checked, never forwarded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import anyio
import httpx
from guardrail_openai import ChunkGuard
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from guardrail import Guard, MessageError, Report, normalize_messages

from ._access import DEFAULT_MAX_BODY_BYTES, BodyTooLarge, ClientKeys, read_body
from ._generation import generator_completion, generator_sse, is_generator
from ._local import LocalModel, local_chunks, local_completion
from ._ops import Operations
from ._sse import SSEResponse
from ._stream import ReportHook, contained, guarded_sse
from ._upstream import Upstream, UpstreamError, scrub
from ._whole import guard_whole

__all__ = ["create_app"]

log = logging.getLogger("guardrail.server")

# Guard work runs in its own pool, sized for many streams whose monitors may block (I/O, a
# remote judge): asyncio's default pool has only a few threads per core.
GUARD_THREADS = 64


def _error(status: int, message: str, code: str,
           kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": code,
                                   "param": None}}, status_code=status)


class _Proxy:
    """The request handlers, bound to one guard and one upstream (or local model)."""

    def __init__(self, guard: Guard, upstream: Upstream | None, local: LocalModel | None,
                 offload: bool | None, on_report: ReportHook | None, keys: ClientKeys,
                 max_body_bytes: int, ops: Operations) -> None:
        self.guard = guard
        self.upstream = upstream
        self.local = local
        # A guardrail-transformers generator feeds monitors its own states (no observer pass).
        self.generator = local if local is not None and is_generator(local) else None
        self.offload = True if offload is None else offload  # whole completions: one feed
        # Streams await a batched observer's reads on the event loop; other guards' work (an
        # observer that cannot be awaited, monitors without one) goes to a worker thread.
        observer_awaited = guard.observer is not None and not guard.blocks_event_loop
        self.stream_offload = not observer_awaited if offload is None else offload
        self.executor = ThreadPoolExecutor(GUARD_THREADS, thread_name_prefix="guardrail-guard")
        self.ops = ops
        self.on_report = self._reported if on_report is None else partial(self._reported,
                                                                            then=on_report)
        self.keys = keys
        self.max_body_bytes = max_body_bytes

    def _reported(self, reports: list[Report], then: ReportHook | None = None) -> None:
        self.ops.reports(reports)
        if then is not None:
            then(reports)

    def _caller(self, request: Request) -> tuple[Response | None, str | None]:
        """(a 401 for a caller without a valid client key, else None; the Authorization value
        to send upstream: the caller's own, unless it was a proxy client key)."""
        auth = request.headers.get("authorization")
        if not self.keys:
            return None, auth
        if not self.keys.allows(auth):
            return _error(401, "missing or invalid API key for this guardrail proxy: send "
                          "'Authorization: Bearer KEY' with one of its client keys",
                          "invalid_api_key"), None
        return None, None

    async def health(self, request: Request) -> Response:
        return JSONResponse({
            "status": "ok",
            "mode": "upstream" if self.upstream is not None else "local",
            "upstream": self.upstream.public_url if self.upstream is not None else None,
            "local": self.local.name if self.local is not None else None,
            "monitors": [spec.id for spec, _ in self.guard.monitors],
        })

    async def models(self, request: Request) -> Response:
        denied, auth = self._caller(request)
        if denied is not None:
            return denied
        if self.local is not None:
            return JSONResponse({"object": "list", "data": [{
                "id": self.local.name, "object": "model", "created": int(time.time()),
                "owned_by": "guardrail-local"}]})
        assert self.upstream is not None
        try:
            return JSONResponse(await self.upstream.models(auth))
        except UpstreamError as exc:
            self.ops.upstream_error(exc.code)
            log.warning("GET /v1/models failed: %s", exc.message)
            return JSONResponse(exc.payload(), status_code=exc.status, headers=exc.headers)

    async def chat_completions(self, request: Request) -> Response:
        denied, auth = self._caller(request)
        if denied is not None:
            return denied
        try:
            body = json.loads(await read_body(request, self.max_body_bytes))
        except BodyTooLarge as exc:
            return _error(413, str(exc), "request_too_large")
        except ValueError:
            return _error(400, "request body is not valid JSON", "invalid_json")
        if not isinstance(body, dict):
            return _error(400, "request body must be a JSON object", "invalid_body")
        if not isinstance(body.get("messages"), list):
            return _error(400, "'messages' must be a list of chat messages", "invalid_messages")
        try:
            messages = normalize_messages(body["messages"])  # the guard's view; upstream gets body
        except MessageError as exc:
            return _error(400, str(exc), "invalid_messages")
        metadata = {"adapter": "server", "model": body.get("model"),
                    "stream": bool(body.get("stream"))}
        try:
            if body.get("stream"):
                return await self._stream(body, messages, metadata, auth)
            return await self._whole(request, body, messages, metadata, auth)
        except UpstreamError as exc:
            self.ops.upstream_error(exc.code)
            log.warning("chat completion failed: %s", exc.message)
            return JSONResponse(exc.payload(), status_code=exc.status, headers=exc.headers)
        except Exception as exc:  # noqa: BLE001 - the client gets JSON, never a traceback
            secrets = (self.upstream.secrets(auth) if self.upstream is not None
                       else (auth,) if auth else ())
            message = scrub(f"{type(exc).__name__}: {exc}", secrets)
            log.error("chat completion failed inside the proxy: %s", message)
            return _error(500, f"guardrail-server failed: {message}", "internal_error",
                          "server_error")

    async def _stream(self, body: dict[str, Any], messages: list[dict[str, Any]],
                      metadata: Mapping[str, Any], auth: str | None) -> Response:
        if self.generator is not None:
            return SSEResponse(generator_sse(self.guard, self.generator, body, messages,
                                             metadata, self.on_report))
        n = body.get("n")
        # The observer reads the conversation while the upstream works on its first token.
        prepared = self.guard.prepare(messages) if self.upstream is not None else None
        chunk_guard = ChunkGuard(self.guard, messages, choices=n if isinstance(n, int) else 1,
                                 raise_on_halt=False, metadata=metadata, prepared=prepared)
        chunks: AsyncIterator[dict[str, Any]]
        if self.local is not None:
            chunks, close = local_chunks(self.local, body, messages)
        else:
            assert self.upstream is not None
            try:
                response = await self.upstream.open_stream(body, auth)
            except BaseException:
                chunk_guard.close()
                raise
            chunks = self.upstream.chunks(response, auth)
            close = partial(_close, chunks, response)
        stream = guarded_sse(chunks, chunk_guard, close_upstream=close, offload=self.stream_offload,
                             executor=self.executor,
                             on_report=self.on_report)
        return SSEResponse(stream)

    async def _whole(self, request: Request, body: dict[str, Any],
                     messages: list[dict[str, Any]], metadata: Mapping[str, Any],
                     auth: str | None) -> Response:
        if self.generator is not None:
            answer = await _unless_disconnected(request, self._generate(body, messages, metadata))
            return JSONResponse(answer) if answer is not None else Response(status_code=499)
        if self.local is not None:
            work = local_completion(self.local, body, messages)
        else:
            assert self.upstream is not None
            work = self.upstream.complete(body, auth)
        completion = await _unless_disconnected(request, work)
        if completion is None:  # the client left; the upstream request was cancelled
            return Response(status_code=499)
        run = partial(guard_whole, self.guard, completion, messages, metadata)
        guarded, reports = (await asyncio.get_running_loop().run_in_executor(
            self.executor, partial(contained, run)) if self.offload else contained(run))
        if self.on_report is not None:
            self.on_report(reports)
        return JSONResponse(guarded)

    async def _generate(self, body: dict[str, Any], messages: list[dict[str, Any]],
                        metadata: Mapping[str, Any]) -> dict[str, Any]:
        completion, reports = await generator_completion(self.guard, self.generator, body,
                                                         messages, metadata)
        if self.on_report is not None:
            self.on_report(reports)
        return completion


async def _unless_disconnected(request: Request, work: Awaitable[dict[str, Any]]
                                ) -> dict[str, Any] | None:
    """Await ``work`` unless the client hangs up first (then cancel it and return None)."""
    outcome: list[dict[str, Any]] = []
    failure: list[BaseException] = []
    async with anyio.create_task_group() as group:

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            group.cancel_scope.cancel()

        async def do() -> None:
            try:
                outcome.append(await work)
            except Exception as exc:  # noqa: BLE001 - re-raised below, outside the group
                failure.append(exc)
            group.cancel_scope.cancel()

        group.start_soon(watch)
        group.start_soon(do)
    if failure:
        raise failure[0]
    return outcome[0] if outcome else None


async def _close(chunks: AsyncIterator[dict[str, Any]], response: httpx.Response) -> None:
    """Close the upstream request: drops the connection if the body was not read to the end."""
    aclose = getattr(chunks, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except RuntimeError:  # still running: it is being cancelled along with us
            pass
    await response.aclose()


def create_app(guard: Guard, *, upstream: str | None = None, local: LocalModel | None = None,
               api_key: str | None = None, timeout: float = 60.0, offload: bool | None = None,
               on_report: ReportHook | None = None, client_keys: Iterable[str] = (),
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, metrics: bool | None = None,
               dashboard: bool = True, traces: Any = False) -> Starlette:
    """An OpenAI-compatible proxy app that guards chat completions.

    Give ``upstream`` (an OpenAI-compatible base URL ending in ``/v1``) or ``local`` (a local
    model, e.g. ``guardrail_transformers.LocalGenerator``). ``api_key`` is used upstream only
    when the caller sends no ``Authorization`` header. ``timeout``: seconds the upstream may stay
    silent. ``offload``: run the guard in a worker thread, so a slow monitor stalls only its own
    request, never other streams or ``/health``. Default: always, except for streams guarded by
    a batched observer: those await its reads on the event loop (no thread per stream) and take
    the chunks that arrived during a read in one go. ``on_report(reports)`` is
    called once per request with the sessions' reports.
    ``client_keys``: when given, callers must send ``Authorization: Bearer KEY`` with one of them
    (else 401); the key stays here and the upstream gets ``api_key``. ``max_body_bytes``: larger
    request bodies are refused with 413 before they are read.
    ``metrics``: serve ``/metrics`` (None: when prometheus-client is installed); ``dashboard``:
    serve ``/dashboard``; ``traces``: OpenTelemetry spans per stream (True: the global tracer
    provider, or a provider). Each app has its own metrics registry; all three want a client key
    when there are client keys.
    """
    if (upstream is None) == (local is None):
        raise ValueError("create_app: give exactly one of upstream=URL or local=model")
    guard.warn_routes_recorded("the proxy server")
    client = Upstream(upstream, api_key=api_key, timeout=timeout) if upstream else None
    keys = ClientKeys(client_keys)
    ops = Operations(guard, keys, metrics=metrics, dashboard=dashboard, traces=traces)
    proxy = _Proxy(guard, client, local, offload, on_report,
                   keys, max_body_bytes, ops)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        ops.close()
        proxy.executor.shutdown(wait=False)
        if client is not None:
            await client.aclose()

    app = Starlette(routes=[
        Route("/v1/chat/completions", proxy.chat_completions, methods=["POST"]),
        Route("/v1/models", proxy.models, methods=["GET"]),
        Route("/health", proxy.health, methods=["GET"]),
        *ops.routes(),
    ], lifespan=lifespan)
    app.state.guard = guard
    app.state.operations = ops
    return app
