"""Hardening of the proxy and the OpenAI wrapper (issue 26): nothing withheld by the guard leaks
through a side channel (logprobs, credentials in URLs and error bodies), the proxy is no open
relay, and one slow or broken monitor does not freeze other clients.

Everything runs over loopback: the proxy under uvicorn, the project's fake upstream, and real
clients (openai, httpx)."""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from guardrail_server import CLIENT_KEYS_ENV, RunningServer, create_app, running, serve_cli
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam

from guardrail import Features, Guard, Monitor, Score
from guardrail.cli import build_parser
from guardrail.testing import plugin_monitors
from guardrail.testing.upstream import Script, UpstreamServer, split_words

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "call me"}]
BENIGN_TEXT = "The quick brown fox jumps over the lazy dog."

Serve = Callable[..., AbstractContextManager[RunningServer]]


@pytest.fixture
def serve(upstream_server: UpstreamServer) -> Serve:
    """``with serve(guard, **create_app_kwargs) as proxy``: the proxy before the fake upstream."""

    @contextmanager
    def start(guard: Guard, **kwargs: Any) -> Iterator[RunningServer]:
        with running(create_app(guard, upstream=upstream_server.base_url, **kwargs)) as proxy:
            yield proxy

    return start


def _sse(proxy: RunningServer, body: dict[str, Any],
         headers: dict[str, str] | None = None) -> tuple[str, list[dict[str, Any]]]:
    """The raw SSE body of a streamed request and its JSON events (``[DONE]`` left out)."""
    with httpx.stream("POST", f"{proxy.base_url}/chat/completions", timeout=20,
                      json={"model": "m", "messages": MESSAGES, "stream": True, **body},
                      headers=headers or {}) as response:
        raw = response.read().decode()
    events = [json.loads(line[len("data: "):]) for line in raw.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    return raw, events


# -- High 1: logprobs follow the released text ----------------------------------------------

PHONE_CHUNKS = ["Call", " me", " at", " 555-", "9876", " tomorrow", " after", " lunch",
                " please", "."]
REDACT = {"id": "pii", "use": "regex", "options": {"patterns": [r"\d{3}-\d{4}"]},
          "action": "redact"}
# Tokens shown verbatim; " 555-" and "9876" touch the redacted number.
CLEAN_TOKENS = [t for t in PHONE_CHUNKS if t not in (" 555-", "9876")]


def _lp_tokens(entries: Any) -> list[str]:
    return [e["token"] for e in entries or []]


def _assert_no_number(text: str) -> None:
    # ids and timestamps come from the clock and may contain the digits by chance
    text = re.sub(r'"(id|created)":\s*("[^"]*"|\d+)', "", text)
    assert "555" not in text and "9876" not in text
    # bytes are sent as lists of ints: the number's bytes never appear either
    packed = text.replace(" ", "")
    assert ",".join(map(str, b"9876")) not in packed and ",".join(map(str, b"555")) not in packed


@pytest.mark.parametrize("hold_back", [0, 3, 20])
def test_proxy_stream_logprobs_skip_redacted_tokens(upstream_server: UpstreamServer,
                                                    serve: Serve,
                                                    make_guard: Callable[..., Guard],
                                                    hold_back: int) -> None:
    upstream_server.enqueue(Script(chunks=PHONE_CHUNKS))
    with serve(make_guard(hold_back, extra=[REDACT])) as proxy:
        raw, events = _sse(proxy, {"logprobs": True, "top_logprobs": 3})
    content = "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
    assert content == "Call me at [REDACTED] tomorrow after lunch please."
    _assert_no_number(raw)
    tokens = [t for e in events for c in e["choices"] for t in
              _lp_tokens((c.get("logprobs") or {}).get("content"))]
    assert tokens == CLEAN_TOKENS


def test_proxy_whole_logprobs_skip_redacted_tokens(upstream_server: UpstreamServer,
                                                   serve: Serve,
                                                   make_guard: Callable[..., Guard]) -> None:
    upstream_server.enqueue(Script(chunks=PHONE_CHUNKS))
    with serve(make_guard(3, extra=[REDACT])) as proxy:
        response = httpx.post(f"{proxy.base_url}/chat/completions", timeout=20, json={
            "model": "m", "messages": MESSAGES, "logprobs": True, "top_logprobs": 3})
    choice = response.json()["choices"][0]
    assert choice["message"]["content"] == "Call me at [REDACTED] tomorrow after lunch please."
    _assert_no_number(response.text)
    assert _lp_tokens(choice["logprobs"]["content"]) == CLEAN_TOKENS


def test_proxy_halt_sends_no_logprobs_past_the_released_text(
        upstream_server: UpstreamServer, serve: Serve, make_guard: Callable[..., Guard]) -> None:
    words = ["Here", " is", " how", " to", " make", " a", " bomb", " at", " home", " with",
             " things", " from", " a", " shop"]
    upstream_server.enqueue(Script(chunks=words))
    with serve(make_guard(2)) as proxy:
        raw, events = _sse(proxy, {"logprobs": True, "top_logprobs": 2})
    assert "bomb" not in raw and " home" not in raw
    tokens = [t for e in events for c in e["choices"] for t in
              _lp_tokens((c.get("logprobs") or {}).get("content"))]
    halt = [d for e in events for d in (e.get("guardrail") or {}).get("events", [])
            if d["kind"] == "halt"]
    assert halt and "".join(tokens) == halt[0]["released_text"]


def _wrapped(upstream_server: UpstreamServer, guard: Guard) -> Any:
    return guard.wrap(openai.OpenAI(base_url=upstream_server.base_url, api_key="k",
                                    max_retries=0))


def test_wrapper_stream_logprobs_skip_redacted_tokens(upstream_server: UpstreamServer,
                                                      make_guard: Callable[..., Guard]) -> None:
    upstream_server.enqueue(Script(chunks=PHONE_CHUNKS))
    client = _wrapped(upstream_server, make_guard(3, extra=[REDACT]))
    chunks: list[ChatCompletionChunk] = list(client.chat.completions.create(
        model="m", messages=MESSAGES, stream=True, logprobs=True, top_logprobs=3))
    dumped = json.dumps([c.model_dump(mode="json") for c in chunks])
    _assert_no_number(dumped)
    tokens = [e.token for c in chunks if c.choices and c.choices[0].logprobs
              for e in c.choices[0].logprobs.content or []]
    assert tokens == CLEAN_TOKENS


def test_wrapper_whole_logprobs_skip_redacted_tokens(upstream_server: UpstreamServer,
                                                     make_guard: Callable[..., Guard]) -> None:
    upstream_server.enqueue(Script(chunks=PHONE_CHUNKS))
    client = _wrapped(upstream_server, make_guard(3, extra=[REDACT]))
    completion = client.chat.completions.create(model="m", messages=MESSAGES, logprobs=True,
                                                top_logprobs=3)
    _assert_no_number(completion.model_dump_json())
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None
    assert [e.token for e in logprobs.content or []] == CLEAN_TOKENS


# -- Medium 6: credentials in the upstream URL ----------------------------------------------

URL_USER, URL_PASSWORD = "alice", "pw-5e1f0c2b9d"
URL_BASIC = base64.b64encode(f"{URL_USER}:{URL_PASSWORD}".encode()).decode()
KEYWORD_POLICY = """\
release: {hold_back_tokens: 2}
monitors:
  - {id: weapons, use: keywords, options: {words: [bomb]}, action: halt}
"""


def _with_credentials(url: str) -> str:
    return url.replace("http://", f"http://{URL_USER}:{URL_PASSWORD}@")


def test_upstream_url_credentials_never_reach_client_or_logs(
        upstream_server: UpstreamServer, make_guard: Callable[..., Guard],
        caplog: pytest.LogCaptureFixture) -> None:
    echoed = (f"bad credentials: Authorization: Basic {URL_BASIC} "
              f"(user {URL_USER}:{URL_PASSWORD})")
    upstream_server.enqueue(Script(status=401, error_message=echoed),
                            Script(status=500, error_message=echoed))
    caplog.set_level(logging.DEBUG)
    app = create_app(make_guard(2), upstream=_with_credentials(upstream_server.base_url))
    with running(app) as proxy:
        health = httpx.get(f"{proxy.url}/health", timeout=5).text
        streamed, _ = _sse(proxy, {})
        whole = httpx.post(f"{proxy.base_url}/chat/completions", timeout=10,
                           json={"model": "m", "messages": MESSAGES})
    assert "Authorization: Basic [REDACTED]" in streamed  # the error did reach the client
    assert whole.status_code == 502 and "[REDACTED]" in whole.text
    # The credentials still work upstream, as Basic auth (as httpx sends URL user-info).
    assert upstream_server.requests[-1].headers["authorization"] == f"Basic {URL_BASIC}"
    seen = health + streamed + whole.text + caplog.text
    assert URL_PASSWORD not in seen and URL_BASIC not in seen


@pytest.mark.slow
def test_start_up_banner_hides_url_credentials(upstream_server: UpstreamServer,
                                               tmp_path: Path, free_port: int) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(KEYWORD_POLICY)
    port = free_port
    process = subprocess.Popen(
        [sys.executable, "-m", "guardrail.cli", "serve", "--policy", str(policy),
         "--upstream", _with_credentials(upstream_server.base_url), "--port", str(port)],
        stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr is not None
        banner = process.stderr.readline()
    finally:
        process.terminate()
        process.wait(10)
    assert f"127.0.0.1:{upstream_server.port}/v1" in banner
    assert URL_PASSWORD not in banner and URL_USER not in banner


# -- Medium 9: not an open relay ------------------------------------------------------------

CLIENT_KEYS = ["client-key-one-7d1e", "client-key-two-93ab"]
UPSTREAM_KEY = "sk-upstream-key-0c4f"


def _post(proxy: RunningServer, key: str | None, **body: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{proxy.base_url}/chat/completions", timeout=10, headers=headers,
                      json={"model": "m", "messages": MESSAGES, **body})


def test_client_keys_are_required_and_stay_in_the_proxy(upstream_server: UpstreamServer,
                                                        serve: Serve,
                                                        make_guard: Callable[..., Guard]
                                                        ) -> None:
    with serve(make_guard(2), client_keys=CLIENT_KEYS, api_key=UPSTREAM_KEY) as proxy:
        refused = [_post(proxy, None), _post(proxy, "client-key-one-7d1"),
                   _post(proxy, CLIENT_KEYS[0] + "x"),
                   httpx.get(f"{proxy.base_url}/models", timeout=5)]
        answered = _post(proxy, CLIENT_KEYS[1])
        streamed, _ = _sse(proxy, {}, headers={"Authorization": f"Bearer {CLIENT_KEYS[0]}"})
        models = httpx.get(f"{proxy.base_url}/models", timeout=5,
                           headers={"Authorization": f"Bearer {CLIENT_KEYS[0]}"})
    for response in refused:
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert answered.status_code == 200 and answered.json()["choices"][0]["message"]["content"]
    assert streamed.rstrip().endswith("data: [DONE]") and '"error"' not in streamed
    assert models.status_code == 200
    # Only allowed requests reached the upstream, each with the proxy's upstream key.
    seen = [r.headers.get("authorization") for r in upstream_server.requests]
    assert seen == [f"Bearer {UPSTREAM_KEY}"] * 3


def test_body_over_the_limit_is_refused_before_it_is_read(upstream_server: UpstreamServer,
                                                          serve: Serve,
                                                          make_guard: Callable[..., Guard]
                                                          ) -> None:
    padding = "x" * 64 * 1024

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        body = json.dumps({"model": "m", "messages": MESSAGES, "pad": padding}).encode()
        for i in range(0, len(body), 1024):
            yield body[i:i + 1024]

    with serve(make_guard(2), max_body_bytes=16 * 1024) as proxy:
        declared = _post(proxy, None, pad=padding)
        streamed = httpx.post(f"{proxy.base_url}/chat/completions", content=chunked(),
                              timeout=10)
        small = _post(proxy, None)
    for response in (declared, streamed):
        assert response.status_code == 413
        error = response.json()["error"]
        assert error["code"] == "request_too_large" and "16384 bytes" in error["message"]
    assert small.status_code == 200
    assert len(upstream_server.completions()) == 1


def _serve_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


def test_cli_refuses_a_public_host_without_client_keys(upstream_server: UpstreamServer,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    monkeypatch.delenv(CLIENT_KEYS_ENV, raising=False)
    args = _serve_args("--upstream", upstream_server.base_url, "--host", "0.0.0.0")
    assert serve_cli(args) == 2
    error = capsys.readouterr().err
    assert "refusing to listen on 0.0.0.0" in error and "--api-key" in error
    assert "--allow-unauthenticated" in error
    assert _serve_args("--upstream", "u").max_body_bytes == 4 * 1024 * 1024
    assert serve_cli(_serve_args("--upstream", "u", "--max-body-bytes", "0")) == 2
    assert "--max-body-bytes must be at least 1" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_reads_client_keys_from_the_environment(upstream_server: UpstreamServer,
                                                    tmp_path: Path, free_port: int) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(KEYWORD_POLICY)
    port = free_port
    env = {**os.environ, CLIENT_KEYS_ENV: ",".join(CLIENT_KEYS)}
    process = subprocess.Popen(
        [sys.executable, "-m", "guardrail.cli", "serve", "--policy", str(policy),
         "--upstream", upstream_server.base_url, "--port", str(port)],
        stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    body = {"model": "m", "messages": MESSAGES}
    try:
        assert process.stderr is not None
        assert "client keys: 2" in process.stderr.readline()
        for _ in range(100):  # the banner comes just before uvicorn binds
            try:
                refused = httpx.post(url, json=body, timeout=5)
                break
            except httpx.ConnectError:
                time.sleep(0.1)
        allowed = httpx.post(url, json=body, timeout=10,
                             headers={"Authorization": f"Bearer {CLIENT_KEYS[1]}"})
    finally:
        process.terminate()
        process.wait(10)
    assert refused.status_code == 401 and allowed.status_code == 200


# -- Medium 5: a slow monitor stalls only its own stream ------------------------------------


class BlockingMonitor(Monitor):
    """Blocks inside ``update`` once the text says "slowly", until the test releases it (like a
    monitor that sleeps for seconds, or waits on a remote judge); scores 0 otherwise."""

    def __init__(self, entered: threading.Semaphore, release: threading.Event) -> None:
        self.entered, self.release = entered, release

    def update(self, state: Any, features: Features) -> Sequence[Score]:
        if "slowly" in features.text and not self.release.is_set():
            self.entered.release()
            self.release.wait(30)
        return [Score(i, 0.0) for i in features.indices]


SLOW_TEXT = "We go slowly over the old bridge today."
QUICK_TEXT = "A quick answer for another client."
SLOW_STREAMS = 7  # more than asyncio's default pool has threads on a small machine


def test_slow_monitors_leave_health_and_other_streams_alone(upstream_server: UpstreamServer,
                                                            serve: Serve,
                                                            make_guard: Callable[..., Guard]
                                                            ) -> None:
    entered, release = threading.Semaphore(0), threading.Event()
    spec = {"id": "slow", "use": "blocking", "action": "flag"}
    with plugin_monitors(blocking=lambda: BlockingMonitor(entered, release)) as host:
        guard = make_guard(2, extra=[spec], host=host)
    upstream_server.responder = lambda body: Script(
        text=SLOW_TEXT if body["messages"][-1]["content"] == "slow" else QUICK_TEXT)
    slow_body = {"messages": [{"role": "user", "content": "slow"}]}
    with serve(guard) as proxy:
        slow: list[str] = []
        workers = [threading.Thread(target=lambda: slow.append(_sse(proxy, slow_body)[0]))
                   for _ in range(SLOW_STREAMS)]
        for worker in workers:
            worker.start()
        try:
            # Every slow stream is inside its monitor now.
            assert all(entered.acquire(timeout=10) for _ in range(SLOW_STREAMS))
            health = httpx.get(f"{proxy.url}/health", timeout=10)
            _, events = _sse(proxy, {})  # another client's whole stream
            still_open = not slow
        finally:
            release.set()
            for worker in workers:
                worker.join(20)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    other = "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
    assert other == QUICK_TEXT
    assert still_open  # both answered while every slow stream was still blocked
    assert len(slow) == SLOW_STREAMS
    for raw in slow:
        assert raw.rstrip().endswith("data: [DONE]")
        shown = "".join(c["delta"].get("content") or "" for line in raw.splitlines()
                        if line.startswith("data: {") for c in json.loads(line[6:])["choices"])
        assert shown == SLOW_TEXT


# -- Low: a monitor raising SystemExit ends its stream, not the server ----------------------


class ExitingMonitor(Monitor):
    """Raises ``SystemExit`` on the word "exit" (a plugin calling ``sys.exit``)."""

    def update(self, state: Any, features: Features) -> Sequence[Score]:
        if "exit" in features.text:
            raise SystemExit("plugin called sys.exit")
        return [Score(i, 0.0) for i in features.indices]


@pytest.mark.parametrize("offload", [True, False])
def test_monitor_system_exit_ends_stream_with_error_and_done(upstream_server: UpstreamServer,
                                                             serve: Serve,
                                                             make_guard: Callable[..., Guard],
                                                             offload: bool) -> None:
    spec = {"id": "exiting", "use": "exiting", "action": "flag"}
    with plugin_monitors(exiting=lambda: ExitingMonitor()) as host:
        guard = make_guard(2, extra=[spec], host=host)
    upstream_server.enqueue(Script(text="Please exit the building by the north door now."),
                            Script(text="Please exit quietly."), Script(text=BENIGN_TEXT))
    with serve(guard, offload=offload) as proxy:
        raw, events = _sse(proxy, {})
        whole = _post(proxy, None)
        after, _ = _sse(proxy, {})  # the server still serves
    assert raw.rstrip().endswith("data: [DONE]")
    error = events[-1]["error"]
    assert "SystemExit" in error["message"] and error["code"] == "internal_error"
    assert whole.status_code == 500 and "SystemExit" in whole.json()["error"]["message"]
    assert BENIGN_TEXT.split()[0] in after and after.rstrip().endswith("data: [DONE]")
    record = upstream_server.completions()[0]
    assert record.wait(5)


# -- Low: an upstream that ignores n, rate-limits, or sends reasoning text ------------------

HARMFUL_WORDS = ["Here", " is", " how", " to", " build", " a", " bomb", " at", " home"] + [
    f" word{i}" for i in range(40)]
REASONING = ["Let", " me", " think", " about", " the", " bomb", " first."]
# Deltas whose logprob tokens do not spell them (byte-level tokens as some servers send them).
BYTE_TOKEN_DELTAS = [("Call me", ["Call", "bytes:\\x20me"]),
                     (" at 555-", ["bytes:\\x20at", " 555-"]),
                     ("9876 now", ["9876", "bytes:\\x20now"]),
                     (" please", ["bytes:\\x20please"]),
                     (" and thanks.", ["bytes:\\x20and", " thanks."])]


class OddUpstream:
    """A loopback upstream with one behaviour: ``one_choice`` (streams a single choice whatever
    ``n`` says, and records how many chunks it wrote before the peer left), ``rate_limited``
    (429 with ``Retry-After``) or ``reasoning`` (``reasoning_content`` before the content)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.written = 0
        self.planned = 0
        self.peer_left = threading.Event()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                upstream.serve(self, body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.005},
                         daemon=True).start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def serve(self, handler: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        if self.mode == "rate_limited":
            payload = json.dumps({"error": {"message": "slow down", "type": "rate_limit"}})
            handler.send_response(429)
            handler.send_header("Retry-After", "7")
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(payload)))
            handler.end_headers()
            handler.wfile.write(payload.encode())
            return
        if self.mode == "reasoning" and not body.get("stream"):
            payload = json.dumps({
                "id": "c1", "object": "chat.completion", "created": 0, "model": "m",
                "choices": [{"index": 0, "finish_reason": "stop", "message": {
                    "role": "assistant", "content": BENIGN_TEXT,
                    "reasoning_content": "".join(REASONING)}}]})
            handler.send_response(200)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(payload)))
            handler.end_headers()
            handler.wfile.write(payload.encode())
            return
        deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
        logprobs: list[Any] = [None]
        if self.mode == "reasoning":
            deltas += [{"reasoning_content": r} for r in REASONING]
            deltas += [{"content": w} for w in split_words(BENIGN_TEXT)]
        elif self.mode == "byte_tokens":
            deltas += [{"content": text} for text, _ in BYTE_TOKEN_DELTAS]
            logprobs += [{"content": [{"token": t, "logprob": -0.5, "bytes": list(t.encode()),
                                       "top_logprobs": []} for t in tokens]}
                         for _, tokens in BYTE_TOKEN_DELTAS]
        else:
            deltas += [{"content": w} for w in HARMFUL_WORDS]
        self.planned = len(deltas)
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        chunks = [{"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "m",
                   "choices": [{"index": 0, "delta": d, "finish_reason": None,
                                "logprobs": lp}]}
                  for d, lp in zip(deltas, logprobs + [None] * len(deltas), strict=False)]
        try:
            for chunk in chunks:
                data = b"data: " + json.dumps(chunk).encode() + b"\n\n"
                handler.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                handler.wfile.flush()
                self.written += 1
                time.sleep(0.02)
            done = b"data: [DONE]\n\n"
            handler.wfile.write(f"{len(done):x}\r\n".encode() + done + b"\r\n0\r\n\r\n")
            handler.wfile.flush()
        except OSError:
            self.peer_left.set()


@pytest.fixture
def odd_upstream() -> Iterator[Callable[[str], OddUpstream]]:
    made: list[OddUpstream] = []

    def make(mode: str) -> OddUpstream:
        made.append(OddUpstream(mode))
        return made[-1]

    yield make
    for upstream in made:
        upstream.close()


def test_n2_upstream_with_one_choice_is_closed_after_the_halt(
        odd_upstream: Callable[[str], OddUpstream], make_guard: Callable[..., Guard]) -> None:
    upstream = odd_upstream("one_choice")
    with running(create_app(make_guard(2), upstream=upstream.base_url)) as proxy:
        raw, events = _sse(proxy, {"n": 2})
    finishes = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
    assert finishes == ["content_filter"] and raw.rstrip().endswith("data: [DONE]")
    assert upstream.peer_left.wait(5)  # the proxy hung up ...
    assert upstream.written < upstream.planned  # ... long before the answer's end


def test_retry_after_is_forwarded_on_429(odd_upstream: Callable[[str], OddUpstream],
                                         make_guard: Callable[..., Guard]) -> None:
    upstream = odd_upstream("rate_limited")
    with running(create_app(make_guard(2), upstream=upstream.base_url)) as proxy:
        streamed = _post(proxy, None, stream=True)
        whole = _post(proxy, None)
    for response in (streamed, whole):
        assert response.status_code == 429 and response.headers["retry-after"] == "7"
        assert response.json()["error"]["code"] == "upstream_http_429"


def test_reasoning_text_is_not_passed_on_unjudged(odd_upstream: Callable[[str], OddUpstream],
                                                  make_guard: Callable[..., Guard]) -> None:
    upstream = odd_upstream("reasoning")
    with running(create_app(make_guard(2), upstream=upstream.base_url)) as proxy:
        raw, events = _sse(proxy, {})
        whole = _post(proxy, None)
    content = "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
    assert content == BENIGN_TEXT
    assert "think" not in raw and "bomb" not in raw
    assert whole.json()["choices"][0]["message"]["content"] == BENIGN_TEXT
    assert "think" not in whole.text and "reasoning" not in whole.text
    # The wrapper does the same.
    client = make_guard(2).wrap(openai.OpenAI(base_url=upstream.base_url, api_key="k",
                                              max_retries=0))
    chunks = list(client.chat.completions.create(model="m", messages=MESSAGES, stream=True))
    completion = client.chat.completions.create(model="m", messages=MESSAGES)
    dumped = json.dumps([c.model_dump(mode="json") for c in chunks])
    assert "think" not in dumped and "think" not in completion.model_dump_json()


def test_logprobs_that_do_not_spell_their_delta_go_with_the_whole_delta(
        odd_upstream: Callable[[str], OddUpstream], make_guard: Callable[..., Guard]) -> None:
    upstream = odd_upstream("byte_tokens")
    with running(create_app(make_guard(1, extra=[REDACT]), upstream=upstream.base_url)) as proxy:
        raw, events = _sse(proxy, {"logprobs": True})
    content = "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
    assert content == "Call me at [REDACTED] now please and thanks."
    _assert_no_number(raw)
    tokens = [t for e in events for c in e["choices"] for t in
              _lp_tokens((c.get("logprobs") or {}).get("content"))]
    # The two deltas that touch the number lose every entry; the others keep theirs.
    kept = [t for text, ts in BYTE_TOKEN_DELTAS for t in ts if "555" not in text + "".join(ts)
            and "9876" not in text]
    assert tokens == kept
