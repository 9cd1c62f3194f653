"""Hardening of the proxy and the OpenAI wrapper (issue 26): nothing withheld by the guard leaks
through a side channel (logprobs, credentials in URLs and error bodies), the proxy is no open
relay, and one slow or broken monitor does not freeze other clients.

Everything runs over loopback: the proxy under uvicorn, the project's fake upstream, and real
clients (openai, httpx)."""

from __future__ import annotations

import base64
import json
import logging
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from guardrail_server import RunningServer, create_app, running
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam

from guardrail import Guard
from guardrail.testing.upstream import Script, UpstreamServer

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "call me"}]

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
    assert "555" not in text and "9876" not in text
    # bytes are sent as lists of ints: the number's bytes never appear either
    assert json.dumps(list(b"9876"))[1:-1] not in text.replace(" ", "")


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


def test_start_up_banner_hides_url_credentials(upstream_server: UpstreamServer,
                                               tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(KEYWORD_POLICY)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
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
