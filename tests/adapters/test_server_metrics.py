"""guardrail-server's /metrics: scraped with prometheus_client's parser over loopback while
streams run and halt, checked against what the clients saw and the sessions reported; upstream
errors by code; the client keys guard it; each app has its own registry."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from guardrail_server import RunningServer

from guardrail import Guard, Report
from guardrail.testing.upstream import Script, UpstreamServer

prometheus_parser = pytest.importorskip("prometheus_client.parser")

HARMFUL = ("Here is how to build a bomb at home with things you can buy in any shop near you "
           "and then some more words to keep the stream going for quite a while longer")
BENIGN = "The quick brown fox jumps over the lazy dog and then takes a well earned nap."
BODY = {"model": "scripted-model", "stream": True,
        "messages": [{"role": "user", "content": "tell me something"}]}

Serve = Callable[..., AbstractContextManager[RunningServer]]


def scrape(proxy: RunningServer, **headers: str) -> dict[str, Any]:
    response = httpx.get(f"{proxy.url}/metrics", headers=headers, timeout=5)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in prometheus_parser.text_string_to_metric_families(response.text)}


def value(families: dict[str, Any], sample: str, **labels: str) -> float:
    name = sample
    for suffix in ("_total", "_count", "_sum"):
        name = name.removesuffix(suffix)
    found = [s.value for s in families[name].samples if s.name == sample and s.labels == labels]
    assert len(found) == 1, (sample, labels)
    return float(found[0])


def stream_text(proxy: RunningServer, body: dict[str, Any] = BODY) -> tuple[str, list[Any]]:
    """The content a client saw and the stream's guardrail events."""
    content, events = "", []
    with httpx.stream("POST", f"{proxy.base_url}/chat/completions", json=body,
                      headers={"Authorization": "Bearer k"}, timeout=10) as response:
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line.removeprefix("data: "))
            for choice in chunk.get("choices", []):
                content += choice["delta"].get("content") or ""
            events += chunk.get("guardrail", {}).get("events", [])
    return content, events


def test_metrics_while_streams_run_and_halt(serve: Serve, upstream_server: UpstreamServer,
                                            make_guard: Callable[..., Guard],
                                            reports: list[Report]) -> None:
    upstream_server.enqueue(Script(text=BENIGN, delay=0.05))
    with serve(make_guard(2)) as proxy:
        # A slow stream is open while /metrics is scraped.
        with httpx.stream("POST", f"{proxy.base_url}/chat/completions", json=BODY,
                          headers={"Authorization": "Bearer k"}, timeout=10) as response:
            lines = response.iter_lines()
            while "The" not in next(lines):  # the first content chunk reached the client
                pass
            during = scrape(proxy)
            assert value(during, "guardrail_streams_started_total") == 1
            assert value(during, "guardrail_streams_active") == 1
            assert value(during, "guardrail_tokens_read_total") >= 1
            for _ in lines:
                pass
        upstream_server.enqueue(Script(text=HARMFUL, delay=0.005))
        shown, events = stream_text(proxy)
        after = scrape(proxy)
    halt = [e for e in events if e["kind"] == "halt"]
    assert len(halt) == 1 and "bomb" not in shown
    assert len(reports) == 2 and [r.halted for r in reports] == [False, True]
    assert value(after, "guardrail_streams_started_total") == 2
    assert value(after, "guardrail_streams_active") == 0
    assert value(after, "guardrail_streams_ended_total", outcome="completed") == 1
    assert value(after, "guardrail_streams_ended_total", outcome="halted") == 1
    assert value(after, "guardrail_halts_total", monitor="weapons", cause="verdict") == 1
    assert value(after, "guardrail_halts_total", monitor="verbs", cause="verdict") == 0
    flags = [e for e in events if e["kind"] == "flag"]
    assert flags and value(after, "guardrail_flags_total", monitor="verbs",
                           action="flag") == len(flags)
    assert value(after, "guardrail_tokens_read_total") == sum(r.tokens for r in reports)
    assert value(after, "guardrail_tokens_released_total") == sum(
        r.released_tokens for r in reports)
    assert value(after, "guardrail_read_tokens_sum") == sum(r.tokens for r in reports)
    assert value(after, "guardrail_monitor_seconds_count", monitor="weapons") >= 2
    halted = reports[1]
    assert halted.halt is not None
    assert value(after, "guardrail_tokens_past_verdict_count") == 1
    assert value(after, "guardrail_tokens_past_verdict_sum") == (
        halted.tokens - halted.halt.at - 1)
    assert value(after, "guardrail_leaked_tokens_total") == 0


def test_upstream_errors_are_counted_by_code(serve: Serve, upstream_server: UpstreamServer,
                                             make_guard: Callable[..., Guard]) -> None:
    upstream_server.enqueue(Script(status=429), Script(status=429), Script(status=503))
    with serve(make_guard(2)) as proxy:
        for _ in range(3):
            response = httpx.post(f"{proxy.base_url}/chat/completions", json=BODY, timeout=10)
            assert response.status_code >= 400
        families = scrape(proxy)
    assert value(families, "guardrail_upstream_errors_total", code="upstream_http_429") == 2
    assert value(families, "guardrail_upstream_errors_total", code="upstream_http_503") == 1
    assert value(families, "guardrail_streams_started_total") == 0


def test_an_upstream_that_drops_mid_stream_is_counted(serve: Serve,
                                                      make_guard: Callable[..., Guard]) -> None:
    with _dropping_upstream() as url, serve(make_guard(2), upstream=url) as proxy:
        stream_text(proxy)
        families = scrape(proxy)
    assert value(families, "guardrail_upstream_errors_total",
                 code="upstream_disconnected") == 1
    assert value(families, "guardrail_streams_ended_total", outcome="aborted") == 1


def test_client_keys_guard_metrics(serve: Serve, make_guard: Callable[..., Guard]) -> None:
    with serve(make_guard(2), client_keys=["op-key-1"]) as proxy:
        assert httpx.get(f"{proxy.url}/metrics").status_code == 401
        wrong = httpx.get(f"{proxy.url}/metrics", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "op-key-1" not in wrong.text
        scrape(proxy, Authorization="Bearer op-key-1")
        basic = base64.b64encode(b"prometheus:op-key-1").decode()
        scrape(proxy, Authorization=f"Basic {basic}")
        assert httpx.get(f"{proxy.url}/health").status_code == 200


def test_each_app_has_its_own_registry(serve: Serve, upstream_server: UpstreamServer,
                                       make_guard: Callable[..., Guard]) -> None:
    upstream_server.enqueue(Script(text=BENIGN))
    with serve(make_guard(2)) as one, serve(make_guard(2)) as two:
        stream_text(one)
        assert value(scrape(one), "guardrail_streams_started_total") == 1
        assert value(scrape(two), "guardrail_streams_started_total") == 0


def test_metrics_can_be_turned_off(serve: Serve, make_guard: Callable[..., Guard]) -> None:
    with serve(make_guard(2), metrics=False) as proxy:
        response = httpx.get(f"{proxy.url}/metrics")
    assert response.status_code == 404 and "prometheus-client" in response.text


@contextmanager
def _dropping_upstream() -> Iterator[str]:
    """An SSE upstream that sends two content chunks, then closes the socket mid-body."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def serve_one() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                         b"transfer-encoding: chunked\r\n\r\n")
            for word in ("We", " build"):
                chunk = {"id": "x", "object": "chat.completion.chunk", "created": 1,
                         "model": "m", "choices": [{"index": 0, "delta": {"content": word},
                                                    "finish_reason": None}]}
                data = f"data: {json.dumps(chunk)}\n\n".encode()
                conn.sendall(f"{len(data):x}\r\n".encode() + data + b"\r\n")

    thread = threading.Thread(target=serve_one, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}/v1"
    finally:
        server.close()
        thread.join(timeout=5)


@pytest.mark.slow
def test_cli_serves_metrics_and_writes_traces(upstream_server: UpstreamServer,
                                              tmp_path: Path, free_port: int) -> None:
    """``guardrail serve --traces --no-dashboard``: /metrics on, /dashboard off, and spans on
    stderr (no OTLP exporter here) by the time the server exits."""
    pytest.importorskip("opentelemetry.sdk")
    policy = tmp_path / "policy.yaml"
    policy.write_text("release: {hold_back_tokens: 2}\nmonitors:\n"
                      "  - {id: weapons, use: keywords, options: {words: [bomb]}, "
                      "action: halt}\n")
    port = free_port
    env = {k: v for k, v in os.environ.items() if not k.startswith("GUARDRAIL_API_KEYS")}
    upstream_server.enqueue(Script(text=HARMFUL))
    process = subprocess.Popen(
        [sys.executable, "-m", "guardrail.cli", "serve", "--policy", str(policy), "--upstream",
         upstream_server.base_url, "--port", str(port), "--traces", "--no-dashboard"],
        stderr=subprocess.PIPE, text=True, env=env)
    proxy = RunningServer("127.0.0.1", port, None, None)  # type: ignore[arg-type]
    try:
        assert process.stderr is not None
        banner = process.stderr.readline()
        assert "operators: /metrics, traces" in banner
        for _ in range(100):  # the banner comes just before uvicorn binds
            try:
                httpx.get(f"{proxy.url}/health", timeout=5)
                break
            except httpx.ConnectError:
                time.sleep(0.1)
        shown, events = stream_text(proxy)
        families = scrape(proxy)
        dashboard = httpx.get(f"{proxy.url}/dashboard", timeout=5)
    finally:
        process.terminate()
        _, err = process.communicate(timeout=20)
    assert any(e["kind"] == "halt" for e in events) and "bomb" not in shown
    assert value(families, "guardrail_halts_total", monitor="weapons", cause="verdict") == 1
    assert dashboard.status_code == 404
    assert '"name": "chat scripted-model"' in err and '"guardrail.halt"' in err
