"""guardrail-server when things break: an upstream that drops the connection, sends malformed SSE
or an HTTP error, is unreachable; a monitor that fails. The client always gets a clear error (an
SSE error event then [DONE] mid-stream, JSON otherwise), never a hang, and the session ends with
a report whose audit trail is kept."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from guardrail_server import RunningServer, create_app, running
from openai.types.chat import ChatCompletionMessageParam

from guardrail import Guard, Report
from guardrail.testing import FailingMonitor, plugin_monitors
from guardrail.testing.upstream import Script, UpstreamServer

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
WORDS = ["We", " build", " things", " slowly", " and", " carefully", " every", " day"]


class FaultyUpstream:
    """A loopback SSE server that sends a few good chunks, then misbehaves: ``drop`` (the socket
    closes mid-body), ``malformed`` (a data field that is not JSON, then it waits), ``no_done``
    (the body ends cleanly without ``data: [DONE]``)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.peer_closed = threading.Event()
        self.faulted_at = 0.0
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                upstream.serve(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.005},
                         daemon=True).start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def serve(self, handler: BaseHTTPRequestHandler) -> None:
        def write(payload: bytes) -> None:
            handler.wfile.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
            handler.wfile.flush()

        def chunk(delta: dict[str, Any]) -> bytes:
            data = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "m",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
            return b"data: " + json.dumps(data).encode() + b"\n\n"

        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        write(chunk({"role": "assistant", "content": ""}))
        for word in WORDS:
            write(chunk({"content": word}))
        self.faulted_at = time.monotonic()
        if self.mode == "drop":
            handler.connection.shutdown(socket.SHUT_RDWR)
            handler.close_connection = True
        elif self.mode == "malformed":
            write(b"data: {this is not json\n\n")
            handler.connection.settimeout(5)
            try:  # wait for the proxy to hang up (EOF) instead of finishing the stream
                while handler.connection.recv(1):
                    pass
                self.peer_closed.set()
            except OSError:
                pass
            handler.close_connection = True
        elif self.mode == "no_done":
            handler.wfile.write(b"0\r\n\r\n")
            handler.wfile.flush()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def faulty() -> Iterator[Callable[[str], FaultyUpstream]]:
    servers: list[FaultyUpstream] = []

    def make(mode: str) -> FaultyUpstream:
        servers.append(FaultyUpstream(mode))
        return servers[-1]

    yield make
    for server in servers:
        server.stop()


def _audited(guard: Guard, path: Path) -> Guard:
    data = guard.policy.model_dump(mode="json", exclude={"source"})
    return Guard.from_policy({**data, "audit": {"path": str(path)}}, host=guard.host)


def _client(proxy: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.base_url, api_key="k", max_retries=0, timeout=10)


def _read_sse(proxy: RunningServer) -> list[str]:
    with httpx.stream("POST", f"{proxy.base_url}/chat/completions", timeout=10,
                      json={"model": "m", "messages": MESSAGES, "stream": True}) as response:
        assert response.status_code == 200
        return [line for line in response.iter_lines() if line]


# -- faults mid-stream -----------------------------------------------------------------------


def test_dropped_connection_gives_error_event_report_and_audit(
        faulty: Callable[[str], FaultyUpstream], make_guard: Callable[..., Guard],
        tmp_path: Path) -> None:
    upstream, audit = faulty("drop"), tmp_path / "audit.jsonl"
    reports: list[Report] = []
    app = create_app(_audited(make_guard(2), audit), upstream=upstream.base_url,
                     on_report=reports.extend)
    with running(app) as proxy:
        events = _read_sse(proxy)
        seen = []
        with pytest.raises(openai.APIError, match="dropped the connection mid-stream"):
            for chunk in _client(proxy).chat.completions.create(model="m", messages=MESSAGES,
                                                                stream=True):
                seen.append(chunk.choices[0].delta.content or "")
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["code"] == "upstream_disconnected" and "mid-stream" in error["message"]
    released = "".join(seen)
    assert released and "".join(WORDS).startswith(released)  # text before the fault got out
    assert [r.aborted for r in reports] == ["upstream error: upstream_disconnected"] * 2
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    kinds = [line["kind"] for line in lines]
    assert kinds.count("flag") == 2  # "build" was flagged before the drop, in both requests
    ends = [line for line in lines if line["kind"] == "session_end"]
    assert [e["aborted"] for e in ends] == ["upstream error: upstream_disconnected"] * 2


async def test_malformed_sse_gives_clear_error_and_closes_upstream(
        faulty: Callable[[str], FaultyUpstream], make_guard: Callable[..., Guard]) -> None:
    upstream = faulty("malformed")
    with running(create_app(make_guard(2), upstream=upstream.base_url)) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="k", max_retries=0,
                                    timeout=10)
        with pytest.raises(openai.APIError, match="malformed SSE"):
            stream = await client.chat.completions.create(model="m", messages=MESSAGES,
                                                          stream=True)
            async for _ in stream:
                pass
        await client.close()
        assert upstream.peer_closed.wait(2)  # the proxy hung up on the broken upstream


def test_stream_ending_without_done_is_an_error(faulty: Callable[[str], FaultyUpstream],
                                                make_guard: Callable[..., Guard]) -> None:
    upstream = faulty("no_done")
    with running(create_app(make_guard(2), upstream=upstream.base_url)) as proxy:
        events = _read_sse(proxy)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == \
        "upstream_incomplete"


# -- faults before the stream ----------------------------------------------------------------


@pytest.mark.parametrize("status,expected,error", [
    (500, 502, openai.InternalServerError),
    (429, 429, openai.RateLimitError),
    (400, 400, openai.BadRequestError),
])
@pytest.mark.parametrize("stream", [True, False])
def test_upstream_http_error_becomes_json_error(upstream_server: UpstreamServer,
                                                make_guard: Callable[..., Guard], status: int,
                                                expected: int, error: type[openai.APIStatusError],
                                                stream: bool) -> None:
    upstream_server.enqueue(Script(status=status, error_message="model is overloaded"))
    app = create_app(make_guard(2), upstream=upstream_server.base_url)
    with running(app) as proxy, pytest.raises(error) as caught:
        _client(proxy).chat.completions.create(model="m", messages=MESSAGES, stream=stream)
    assert caught.value.status_code == expected
    assert f"HTTP {status}: model is overloaded" in caught.value.message
    body: Any = caught.value.body
    assert body["code"] == f"upstream_http_{status}"


def test_unreachable_upstream_is_a_clear_502(make_guard: Callable[..., Guard]) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    with running(create_app(make_guard(2), upstream=dead)) as proxy:
        response = httpx.post(f"{proxy.base_url}/chat/completions", timeout=10,
                              json={"model": "m", "messages": MESSAGES, "stream": True})
        models = httpx.get(f"{proxy.base_url}/models", timeout=10)
    assert response.status_code == 502 and models.status_code == 502
    assert "unreachable" in response.json()["error"]["message"]


# -- a monitor fails -------------------------------------------------------------------------


@pytest.mark.parametrize("on_error", ["fail_open", "fail_closed"])
def test_failing_monitor_follows_on_error(upstream_server: UpstreamServer,
                                          make_guard: Callable[..., Guard], on_error: str
                                          ) -> None:
    text = "".join(WORDS)
    upstream_server.enqueue(Script(chunks=WORDS))
    reports: list[Report] = []
    spec = {"id": "fragile", "use": "failing", "action": "flag", "on_error": on_error,
            "message": "guard unavailable"}
    with plugin_monitors(failing=lambda: FailingMonitor(after=3)) as host:
        guard = make_guard(2, extra=[spec], host=host)
    app = create_app(guard, upstream=upstream_server.base_url, on_report=reports.extend)
    with running(app) as proxy:
        chunks = list(_client(proxy).chat.completions.create(model="m", messages=MESSAGES,
                                                             stream=True))
    events = [e for c in chunks for e in (getattr(c, "guardrail", None) or {}).get("events", [])]
    errors = [e for e in events if e["kind"] == "error"]
    assert [(e["monitor"], e["outcome"]) for e in errors] == [("fragile", on_error)]
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    if on_error == "fail_open":
        assert content == text and chunks[-1].choices[0].finish_reason == "stop"
    else:
        assert chunks[-1].choices[0].finish_reason == "content_filter"
        assert content.endswith("guard unavailable")
        shown = content.removesuffix("guard unavailable").removesuffix("\n\n")
        assert text.startswith(shown) and content == shown + ("\n\n" if shown else "") + \
            "guard unavailable"
    assert len(reports) == 1 and reports[0].errors
