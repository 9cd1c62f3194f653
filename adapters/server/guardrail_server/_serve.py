"""Running the app: ``serve_cli`` (``guardrail serve``) and ``running`` (a server in a thread).

Binds 127.0.0.1 unless told otherwise, and refuses any other address without client keys unless
``--allow-unauthenticated`` says so (an open proxy lends its upstream key to anyone). uvicorn's
access log is off: it would add nothing a reverse proxy doesn't, and request lines are all it
could leak (headers are never logged).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import uvicorn
from starlette.applications import Starlette

from guardrail import Guard, GuardrailError, Policy
from guardrail.cli import policy_from_args

from ._access import CLIENT_KEYS_ENV, DEFAULT_MAX_BODY_BYTES, is_loopback, keys_from_env
from ._app import create_app
from ._local import LocalModel
from ._upstream import public_url

__all__ = ["API_KEY_ENV", "CLIENT_KEYS_ENV", "RunningServer", "load_local_model", "running",
           "serve_cli"]

# The proxy's own upstream key, used when a caller sends no Authorization header.
API_KEY_ENV = "GUARDRAIL_UPSTREAM_API_KEY"


@dataclass
class RunningServer:
    """A proxy serving in a background thread."""

    host: str
    port: int
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI-style base URL (``.../v1``) to give a client."""
        return f"{self.url}/v1"


# How often a stopping ``running`` server checks for open connections: uvicorn's own shutdown
# pauses 0.1 s and then checks every 0.1 s, which tests starting hundreds of servers idle through.
_STOP_POLL = 0.005


class _ThreadServer(uvicorn.Server):
    """uvicorn's server as ``running`` drives it from another thread: ``stop()`` ends its main
    loop at once (not at its next 0.1 s tick), and the shutdown is uvicorn's in short steps:
    stop listening, close idle connections, let open requests finish for
    ``timeout_graceful_shutdown`` seconds, cancel what is left, end the app's lifespan."""

    _loop: asyncio.AbstractEventLoop | None = None
    _stopping: asyncio.Event | None = None

    def stop(self) -> None:
        """Ask the server to shut down; safe from any thread."""
        self.should_exit = True
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already closed
                loop.call_soon_threadsafe(stopping.set)

    async def main_loop(self) -> None:
        self._stopping = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        if self.should_exit:  # stop() came before there was a loop to wake
            return
        ticks = asyncio.ensure_future(super().main_loop())
        stopping = asyncio.ensure_future(self._stopping.wait())
        await asyncio.wait({ticks, stopping}, return_when=asyncio.FIRST_COMPLETED)
        ticks.cancel()
        stopping.cancel()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        state = self.server_state
        for connection in list(state.connections):
            connection.shutdown()
        deadline = time.monotonic() + (self.config.timeout_graceful_shutdown or math.inf)
        while (state.connections or state.tasks) and not self.force_exit \
                and time.monotonic() < deadline:
            await asyncio.sleep(_STOP_POLL)
        for task in list(state.tasks):
            task.cancel()
        if not state.connections:  # else wait_closed would wait for them
            for server in self.servers:
                await server.wait_closed()
        if not self.force_exit:
            await self.lifespan.shutdown()


@contextmanager
def running(app: Starlette, *, host: str = "127.0.0.1", port: int | None = None,
            start_timeout: float = 10.0) -> Iterator[RunningServer]:
    """Serve ``app`` with uvicorn in a daemon thread (a free port by default) until the block
    ends; yields a ``RunningServer`` with ``base_url``."""
    # Bind here and hand uvicorn the socket: a port picked free and bound later could be taken
    # by another process in between.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port or 0))
    except OSError as exc:
        sock.close()
        raise GuardrailError(f"guardrail-server cannot listen on {host}:{port}: {exc}") from exc
    port = int(sock.getsockname()[1])
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            lifespan="on", timeout_graceful_shutdown=2)
    server = _ThreadServer(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                              name=f"guardrail-server:{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise GuardrailError(f"guardrail-server did not start on {host}:{port}")
        time.sleep(0.01)
    try:
        yield RunningServer(host, port, server, thread)
    finally:
        server.stop()
        thread.join(timeout=5)
        sock.close()


def load_local_model(name: str) -> LocalModel:
    """A local model by name (``smollm2-135m``) or path, through guardrail-transformers."""
    try:
        import guardrail_transformers
    except ImportError:
        raise GuardrailError("--local needs the guardrail-transformers adapter: "
                             "pip install guardrail-transformers") from None
    model: Any = guardrail_transformers.LocalGenerator.load(name)
    return model


def _shared_observer(policy: Policy, local: LocalModel | None) -> Any:
    """The local generator's own observer when the policy observes that same model: the weights
    load once, and monitors read the generator's states."""
    observer = getattr(local, "observer", None)
    wanted = policy.observer.model if policy.observer is not None else None
    if observer is None or wanted not in (None, getattr(local, "name", None)):
        return None
    return observer


def tracer_provider() -> Any:
    """The tracer provider for ``--traces``: the global one when something configured it
    (``opentelemetry-instrument``), else an SDK provider exporting over OTLP (with
    opentelemetry-exporter-otlp installed; ``OTEL_EXPORTER_OTLP_*`` configure it) or to stderr."""
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError:
        raise GuardrailError("--traces needs OpenTelemetry: "
                             "pip install 'guardrail-server[otel]'") from None
    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return trace.get_tracer_provider()
    exporter: Any
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        exporter = OTLPSpanExporter()
    except ImportError:
        exporter = ConsoleSpanExporter(out=sys.stderr)
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def _operator_paths(app: Starlette) -> str:
    ops = app.state.operations
    shown = [path for path, on in (("/metrics", ops.metrics is not None),
                                   ("/dashboard", ops.live is not None),
                                   ("traces", ops.tracing is not None)) if on]
    return ", ".join(shown) or "none"


def serve_cli(args: argparse.Namespace) -> int:
    """``guardrail serve``: args ``policy``, ``monitor``, ``upstream``, ``local``, ``host``,
    ``port``, ``api_key`` (a list), ``max_body_bytes``, ``allow_unauthenticated``. Returns the
    exit status."""
    if bool(args.upstream) == bool(args.local):
        print("guardrail serve: give exactly one of --upstream URL or --local MODEL",
              file=sys.stderr)
        return 2
    keys = [*(getattr(args, "api_key", None) or ()),
            *keys_from_env(os.environ.get(CLIENT_KEYS_ENV))]
    if not keys and not is_loopback(args.host) and not getattr(args, "allow_unauthenticated",
                                                                 False):
        print(f"guardrail serve: refusing to listen on {args.host} without client keys: anyone "
              "who reaches it could use the upstream (and its key). Set --api-key KEY or "
              f"{CLIENT_KEYS_ENV}=KEY1,KEY2, or pass --allow-unauthenticated if something in "
              "front of the proxy checks callers", file=sys.stderr)
        return 2
    max_body = getattr(args, "max_body_bytes", None)
    max_body = DEFAULT_MAX_BODY_BYTES if max_body is None else max_body
    if max_body < 1:
        print("guardrail serve: --max-body-bytes must be at least 1", file=sys.stderr)
        return 2
    if getattr(args, "ray", False):
        try:  # Ray is imported only when it is asked for
            from .ray import serve_ray_cli
        except ImportError as exc:
            if (exc.name or "").partition(".")[0] != "ray":
                raise
            print("guardrail serve --ray needs Ray Serve: pip install 'guardrail-server[ray]'",
                  file=sys.stderr)
            return 2
        return int(serve_ray_cli(args, keys, max_body))
    try:
        policy = policy_from_args(args)
        local = load_local_model(args.local) if args.local else None
        guard = Guard(policy, observer=_shared_observer(policy, local))
        app = create_app(guard, upstream=args.upstream, local=local,
                         api_key=os.environ.get(API_KEY_ENV), client_keys=keys,
                         max_body_bytes=max_body,
                         metrics=False if getattr(args, "no_metrics", False) else None,
                         dashboard=not getattr(args, "no_dashboard", False),
                         traces=tracer_provider() if getattr(args, "traces", False) else False)
    except GuardrailError as exc:
        print(f"guardrail serve: {exc}", file=sys.stderr)
        return 2
    target = public_url(args.upstream) if args.upstream else f"local model {args.local}"
    print(f"guardrail serve: http://{args.host}:{args.port}/v1 -> {target} "
          f"(monitors: {', '.join(s.id for s, _ in guard.monitors) or 'none'}; client keys: "
          f"{len(keys) or 'none'}; operators: {_operator_paths(app)})", file=sys.stderr)
    if getattr(args, "traces", False):
        # uvicorn re-raises SIGTERM after its graceful shutdown; by default that kills the
        # process before exit handlers run, and the tracer provider's last batch is lost.
        signal.signal(signal.SIGTERM, _exit_on_signal)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


def _exit_on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)
