"""A loopback OpenAI-compatible server that replays scripted responses, for adapter tests.

It is a real HTTP server on ``127.0.0.1`` (an ephemeral port, a background thread), so the code
under test talks to it through real clients (``openai``, ``langchain-openai``, ``httpx``) and the
server can tell what the client did with the connection: how many chunks went out, and whether and
when the client hung up before the end. That is how tests prove that a halt stopped the upstream.

Serves ``POST /v1/chat/completions`` (SSE with ``data: [DONE]`` when ``stream`` is true, one JSON
body otherwise; logprobs when the request asks for them; tool-call deltas; a usage chunk with
``stream_options.include_usage``; ``n`` choices that all replay the script),
``POST /v1/completions`` (the legacy text API: the script's text continues the ``prompt``;
streamed or whole) and ``GET /v1/models``.

Usage::

    from guardrail.testing.upstream import Script, UpstreamServer

    with UpstreamServer() as server:
        server.enqueue(Script(chunks=["Hello", " world", "!"], delay=0.02))
        client = openai.OpenAI(base_url=server.base_url, api_key="test")
        ...
        record = server.requests[-1]
        record.wait()                  # until the server is done with the request
        record.chunks_written, record.disconnected, record.headers["authorization"]

As a pytest fixture: add ``pytest_plugins = ["guardrail.testing.upstream"]`` to a conftest and
take ``upstream_server`` (a fresh server per test).

The server is stdlib only (``http.server``): a thread per connection, HTTP/1.1 with chunked
transfer encoding. It notices a disconnect while it waits between chunks (the socket turns
readable with EOF) and when a write fails, so ``disconnected_at`` is accurate to a few ms.
"""

from __future__ import annotations

import json
import re
import select
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["RequestRecord", "Script", "ToolCall", "UpstreamServer", "split_words"]


def split_words(text: str) -> list[str]:
    """Split text the way many servers stream it: each word with the whitespace before it."""
    return [m.group(0) for m in re.finditer(r"\s*\S+|\s+$", text)]


@dataclass(frozen=True)
class ToolCall:
    """A tool call the scripted model makes; ``arguments`` streams in ``pieces`` deltas."""

    name: str
    arguments: str = "{}"
    id: str | None = None
    pieces: int = 3


@dataclass
class Script:
    """One scripted response.

    Give ``chunks`` (the exact content deltas) or ``text`` (split with ``split_words``).
    ``delay`` is the pause before each chunk, in seconds; ``first_delay`` a pause before the
    response starts (the status line), as an upstream's time to its first token. ``logprobs``
    gives one logprob per chunk (default: -0.1 each) and is sent only when the request asks for
    logprobs. ``status`` other than 200 answers with an OpenAI-shaped error body instead.
    ``refusal``: the text goes out as the model's ``refusal`` field instead of ``content``.
    """

    text: str | None = None
    chunks: Sequence[str] | None = None
    delay: float = 0.0
    first_delay: float = 0.0
    logprobs: Sequence[float] | None = None
    tool_calls: Sequence[ToolCall] = ()
    finish_reason: str | None = None
    model: str | None = None
    status: int = 200
    error_message: str = "scripted upstream error"
    refusal: bool = False

    def content_chunks(self) -> list[str]:
        if self.chunks is not None:
            return list(self.chunks)
        return split_words(self.text or "")

    @property
    def content(self) -> str:
        return "".join(self.content_chunks())


@dataclass
class RequestRecord:
    """What the server saw and did for one request (updated live by the server thread)."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    started_at: float
    stream: bool = False
    chunks_planned: int = 0
    chunks_written: int = 0
    chunk_times: list[float] = field(default_factory=list)
    completed: bool = False
    disconnected: bool = False
    disconnected_at: float | None = None
    finished_at: float | None = None
    _done: threading.Event = field(default_factory=threading.Event, repr=False)

    def wait(self, timeout: float = 5.0) -> bool:
        """Block until the server has finished this request (completed or saw a disconnect)."""
        return self._done.wait(timeout)

    @property
    def disconnect_delay(self) -> float | None:
        """Seconds from the last chunk written to the disconnect the server noticed."""
        if self.disconnected_at is None:
            return None
        last = self.chunk_times[-1] if self.chunk_times else self.started_at
        return self.disconnected_at - last


Responder = Callable[[Mapping[str, Any]], Script]


class _ClientGone(Exception):
    pass


class UpstreamServer:
    """The loopback server. Scripts are used in ``enqueue`` order; when the queue is empty the
    ``responder`` (default: echo a fixed sentence) makes one from the request body."""

    def __init__(self, *, model: str = "scripted-model",
                 responder: Responder | None = None) -> None:
        self.model = model
        self.responder: Responder = responder or (lambda body: Script(text="Hello from upstream."))
        self.requests: list[RequestRecord] = []
        self._scripts: deque[Script] = deque()
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> UpstreamServer:
        handler = type("_BoundHandler", (_Handler,), {"upstream": self})
        self._httpd = _QuietServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        # stop() waits for the serve loop's next poll: a short one keeps each test's teardown
        # from idling
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="upstream-server",
                                        kwargs={"poll_interval": 0.005}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> UpstreamServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("UpstreamServer is not running; call start() or use `with`")
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        """The OpenAI-style base URL, ending in ``/v1``."""
        return f"http://127.0.0.1:{self.port}/v1"

    # -- scripting -------------------------------------------------------------------------

    def enqueue(self, *scripts: Script) -> None:
        with self._lock:
            self._scripts.extend(scripts)

    def _next_script(self, body: Mapping[str, Any]) -> Script:
        with self._lock:
            if self._scripts:
                return self._scripts.popleft()
        return self.responder(body)

    def _record(self, record: RequestRecord) -> None:
        with self._lock:
            self.requests.append(record)

    def completions(self) -> list[RequestRecord]:
        """Records of chat-completion requests, oldest first."""
        return [r for r in self.requests if r.path.endswith("/chat/completions")]


# -- the HTTP side -------------------------------------------------------------------------


class _QuietServer(ThreadingHTTPServer):
    # load tests open dozens of streams at once; the default backlog of 5 refuses some
    request_queue_size = 128

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # a client dropping an idle keep-alive connection is normal
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    upstream: UpstreamServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        pass

    def _record(self, body: Any) -> RequestRecord:
        record = RequestRecord(
            method=self.command,
            path=self.path,
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
            started_at=time.monotonic(),
        )
        self.upstream._record(record)
        return record

    def _send_json(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        record = self._record(None)
        try:
            if self.path.rstrip("/") == "/v1/models":
                self._send_json(200, {"object": "list", "data": [{
                    "id": self.upstream.model, "object": "model", "created": 0,
                    "owned_by": "guardrail-testing"}]})
            else:
                self._send_json(404, _error(f"no route {self.path}", "not_found"))
            record.completed = True
        finally:
            record.finished_at = time.monotonic()
            record._done.set()

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError:
            body = None
        record = self._record(body)
        try:
            route = self.path.rstrip("/")
            if route not in ("/v1/chat/completions", "/v1/completions"):
                self._send_json(404, _error(f"no route {self.path}", "not_found"))
                record.completed = True
                return
            if not isinstance(body, dict):
                self._send_json(400, _error("request body is not a JSON object", "invalid_json"))
                record.completed = True
                return
            script = self.upstream._next_script(body)
            if script.first_delay:
                self._pause(script.first_delay, record)
            if script.status != 200:
                self._send_json(script.status, _error(script.error_message, "scripted"))
                record.completed = True
                return
            builder = _TextCompletion if route == "/v1/completions" else _Completion
            completion = builder(script, body, self.upstream.model)
            if body.get("stream"):
                record.stream = True
                self._stream(completion, script.delay, record)
            else:
                time.sleep(script.delay)
                self._send_json(200, completion.whole())
                record.completed = True
        except _ClientGone:
            record.disconnected = True
            record.disconnected_at = record.disconnected_at or time.monotonic()
            self.close_connection = True
        finally:
            record.finished_at = time.monotonic()
            record._done.set()

    def _stream(self, completion: _Completion, delay: float, record: RequestRecord) -> None:
        chunks = list(completion.chunks())
        record.chunks_planned = len(chunks)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for chunk in chunks:
            self._pause(delay, record)
            self._write(b"data: " + json.dumps(chunk).encode() + b"\n\n", record)
            record.chunks_written += 1
            record.chunk_times.append(time.monotonic())
        self._write(b"data: [DONE]\n\n", record)
        self._write_raw(b"0\r\n\r\n", record)
        record.completed = True

    def _pause(self, delay: float, record: RequestRecord) -> None:
        """Sleep ``delay`` seconds, but wake at once if the client hangs up."""
        deadline = time.monotonic() + delay
        while True:
            remaining = deadline - time.monotonic()
            if self._peer_closed(max(0.0, remaining)):
                record.disconnected_at = time.monotonic()
                raise _ClientGone
            if remaining <= 0:
                return

    def _peer_closed(self, timeout: float) -> bool:
        sock = self.connection
        try:
            readable, _, _ = select.select([sock], [], [], timeout)
            if not readable:
                return False
            data = sock.recv(1, socket.MSG_PEEK)
        except (OSError, ValueError):
            return True
        if data:  # the client sent something (not a hang-up): do not spin on it
            time.sleep(timeout)
            return False
        return True

    def _write(self, payload: bytes, record: RequestRecord) -> None:
        self._write_raw(f"{len(payload):x}\r\n".encode() + payload + b"\r\n", record)

    def _write_raw(self, data: bytes, record: RequestRecord) -> None:
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError) as exc:
            record.disconnected_at = time.monotonic()
            raise _ClientGone from exc


def _error(message: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "code": code}}


class _Completion:
    """Builds the OpenAI JSON shapes for one scripted response."""

    def __init__(self, script: Script, body: Mapping[str, Any], default_model: str) -> None:
        self.script = script
        self.body = body
        self.id = f"chatcmpl-{int(time.time() * 1000)}"
        self.created = int(time.time())
        self.model = script.model or str(body.get("model") or default_model)
        self.pieces = script.content_chunks()
        self.want_logprobs = bool(body.get("logprobs"))
        self.top_n = int(body.get("top_logprobs") or 0)
        self.n = max(1, int(body.get("n") or 1))  # every choice replays the same script

    @property
    def finish_reason(self) -> str:
        if self.script.finish_reason:
            return self.script.finish_reason
        return "tool_calls" if self.script.tool_calls else "stop"

    def _logprob_entry(self, i: int, token: str) -> dict[str, Any]:
        values = self.script.logprobs
        value = float(values[i]) if values is not None and i < len(values) else -0.1
        top = [{"token": token, "logprob": value, "bytes": list(token.encode())}]
        top += [{"token": f"<alt{k}>", "logprob": value - k, "bytes": None}
                for k in range(1, self.top_n)]
        return {"token": token, "logprob": value, "bytes": list(token.encode()),
                "top_logprobs": top[: self.top_n]}

    def _usage(self) -> dict[str, int]:
        completion = len(self.pieces) + len(self.script.tool_calls)
        return {"prompt_tokens": 5, "completion_tokens": completion,
                "total_tokens": 5 + completion}

    def _chunk(self, delta: dict[str, Any], finish: str | None = None,
               logprobs: Any = None, index: int = 0) -> dict[str, Any]:
        return {
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model, "system_fingerprint": "fp_scripted",
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                         "finish_reason": finish}],
        }

    def chunks(self) -> Iterator[dict[str, Any]]:
        """Content chunks of the choices interleave, one chunk per choice, as OpenAI sends them."""
        choices = range(self.n)
        for c in choices:
            yield self._chunk({"role": "assistant", "content": ""}, index=c)
        for i, piece in enumerate(self.pieces):
            field = "refusal" if self.script.refusal else "content"
            logprobs = {"content": None, "refusal": None,
                        field: [self._logprob_entry(i, piece)]} if self.want_logprobs else None
            for c in choices:
                yield self._chunk({field: piece}, logprobs=logprobs, index=c)
        for c in choices:
            for n, call in enumerate(self.script.tool_calls):
                args = call.arguments
                step = max(1, -(-len(args) // max(1, call.pieces)))
                yield self._chunk({"tool_calls": [{
                    "index": n, "id": call.id or f"call_{n}", "type": "function",
                    "function": {"name": call.name, "arguments": ""}}]}, index=c)
                for start in range(0, len(args), step):
                    yield self._chunk({"tool_calls": [{
                        "index": n, "function": {"arguments": args[start:start + step]}}]},
                        index=c)
        for c in choices:
            yield self._chunk({}, finish=self.finish_reason, index=c)
        options = self.body.get("stream_options") or {}
        if isinstance(options, dict) and options.get("include_usage"):
            yield {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                   "model": self.model, "choices": [], "usage": self._usage()}

    def whole(self) -> dict[str, Any]:
        field = "refusal" if self.script.refusal else "content"
        message: dict[str, Any] = {"role": "assistant", "content": None,
                                   field: self.script.content or None}
        if self.script.tool_calls:
            message["tool_calls"] = [
                {"id": c.id or f"call_{n}", "type": "function",
                 "function": {"name": c.name, "arguments": c.arguments}}
                for n, c in enumerate(self.script.tool_calls)
            ]
        logprobs = None
        if self.want_logprobs:
            logprobs = {"content": None, "refusal": None,
                        field: [self._logprob_entry(i, p) for i, p in enumerate(self.pieces)]}
        return {
            "id": self.id, "object": "chat.completion", "created": self.created,
            "model": self.model, "system_fingerprint": "fp_scripted",
            "choices": [{"index": c, "message": message, "logprobs": logprobs,
                         "finish_reason": self.finish_reason} for c in range(self.n)],
            "usage": self._usage(),
        }


class _TextCompletion(_Completion):
    """The legacy ``/v1/completions`` shapes: the script's text as ``choices[0].text``."""

    def _text_chunk(self, text: str, finish: str | None = None) -> dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

    def chunks(self) -> Iterator[dict[str, Any]]:
        for piece in self.pieces:
            yield self._text_chunk(piece)
        yield self._text_chunk("", self.finish_reason)

    def whole(self) -> dict[str, Any]:
        return {**self._text_chunk("".join(self.pieces), self.finish_reason),
                "usage": self._usage()}


# -- pytest fixture (only when pytest is importable) ---------------------------------------

try:
    import pytest
except ImportError:  # pragma: no cover - pytest is a test-time dependency
    pass
else:

    @pytest.fixture
    def upstream_server() -> Iterator[UpstreamServer]:
        """A fresh loopback OpenAI-compatible server for one test."""
        with UpstreamServer() as server:
            yield server
