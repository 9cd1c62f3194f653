"""guardrail-server's /dashboard: live streams, recent verdicts with only released text around
them (a halt's withheld tail and redacted spans never show), per-monitor rates, client keys;
and the OpenTelemetry spans of proxied streams."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import httpx
import pytest
from guardrail_server import RunningServer

from guardrail import Guard, Report
from guardrail.testing.upstream import Script, UpstreamServer

# "4111" is redacted, "build" flagged, "bomb" halts: nothing from "bomb" on may reach the page.
SECRETIVE = ("My card is 4111 and today I will build a nice shed in the garden, then I will "
             "tell you how to make a bomb tonight with secret ingredients")
BENIGN = "The quick brown fox jumps over the lazy dog and then takes a well earned nap."
BODY = {"model": "scripted-model", "stream": True,
        "messages": [{"role": "user", "content": "tell me something"}]}
CARD = {"id": "card", "use": "keywords", "options": {"words": ["4111"]}, "action": "redact"}

Serve = Callable[..., AbstractContextManager[RunningServer]]


def _stream(proxy: RunningServer) -> str:
    content = ""
    with httpx.stream("POST", f"{proxy.base_url}/chat/completions", json=BODY,
                      timeout=10) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line.removeprefix("data: ")).get("choices", []):
                    content += choice["delta"].get("content") or ""
    return content


def _snapshot(proxy: RunningServer, **headers: str) -> dict[str, Any]:
    response = httpx.get(f"{proxy.url}/dashboard.json", headers=headers, timeout=5)
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


def test_dashboard_shows_live_streams_verdicts_and_rates(
        serve: Serve, upstream_server: UpstreamServer, make_guard: Callable[..., Guard],
        reports: list[Report]) -> None:
    upstream_server.enqueue(Script(text=SECRETIVE, delay=0.005), Script(text=BENIGN, delay=0.05))
    with serve(make_guard(2, extra=[CARD])) as proxy:
        shown = _stream(proxy)
        with httpx.stream("POST", f"{proxy.base_url}/chat/completions", json=BODY,
                          timeout=10) as response:
            lines = response.iter_lines()
            while "quick" not in next(lines):
                pass
            during = _snapshot(proxy)
            for _ in lines:
                pass
        after = _snapshot(proxy)
        page = httpx.get(f"{proxy.url}/dashboard")

    (live,) = during["streams"]
    assert live["model"] == "scripted-model" and live["tokens"] >= 1
    assert during["totals"]["active"] == 1 and during["totals"]["started"] == 2
    assert BENIGN.startswith(live["tail"])  # released text only

    halted = reports[0]
    assert halted.halt is not None and "4111" not in shown and "[REDACTED]" in shown
    text = json.dumps(after)
    for secret in ("4111", "bomb", "tonight", "ingredients"):
        assert secret not in text  # redacted or withheld: never on the page
    kinds = {item["kind"]: item for item in after["recent"]}
    assert kinds["halt"]["monitor"] == "weapons" and kinds["halt"]["score"] == 1.0
    assert halted.released_text.endswith(kinds["halt"]["before"])  # what the reader got
    assert kinds["halt"]["hidden"] == "withheld from the reader" and kinds["halt"]["text"] == ""
    flag = next(i for i in after["recent"] if i["monitor"] == "verbs")
    assert flag["text"] == "build" and flag["before"].endswith("today I will ")
    redacted = next(i for i in after["recent"] if i["monitor"] == "card")
    assert redacted["text"].strip() == "[REDACTED]"  # the released chunk, masked
    assert after["totals"] == {"started": 2, "ended": 2, "active": 0, "halted": 1,
                               "aborted": 0, "tokens": sum(r.tokens for r in reports)}
    rates = {m["id"]: m for m in after["monitors"]}
    assert rates["weapons"]["halts"] == 1 and rates["weapons"]["halt_rate"] == 0.5
    assert rates["verbs"]["flags"] == 1 and rates["verbs"]["flag_rate"] == 0.5
    assert rates["card"]["flags"] == 1 and rates["card"]["flags_per_min"] > 0

    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "dashboard.json" in page.text
    assert "<script src" not in page.text and "://" not in page.text  # no CDN, self-contained


def test_client_keys_guard_the_dashboard(serve: Serve, make_guard: Callable[..., Guard]) -> None:
    with serve(make_guard(2), client_keys=["op-key-1"]) as proxy:
        for path in ("/dashboard", "/dashboard.json"):
            denied = httpx.get(f"{proxy.url}{path}")
            assert denied.status_code == 401
            assert denied.headers["www-authenticate"].startswith("Basic")  # the browser asks
        basic = base64.b64encode(b"anyone:op-key-1").decode()
        assert httpx.get(f"{proxy.url}/dashboard",
                         headers={"Authorization": f"Basic {basic}"}).status_code == 200
        _snapshot(proxy, Authorization="Bearer op-key-1")
        wrong = base64.b64encode(b"op-key-1:nope").decode()
        assert httpx.get(f"{proxy.url}/dashboard.json",
                         headers={"Authorization": f"Basic {wrong}"}).status_code == 401


def test_proxied_streams_are_traced(serve: Serve, upstream_server: UpstreamServer,
                                    make_guard: Callable[..., Guard],
                                    reports: list[Report]) -> None:
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    upstream_server.enqueue(Script(text=SECRETIVE, delay=0.005), Script(text=BENIGN))
    with serve(make_guard(2), traces=provider) as proxy:
        _stream(proxy)
        _stream(proxy)
    spans = [s for s in exporter.get_finished_spans() if s.name == "chat scripted-model"]
    assert len(spans) == 2
    by_session = {dict(s.attributes or {})["guardrail.session.id"]: s for s in spans}
    halted, benign = reports
    assert halted.halt is not None
    span = by_session[halted.session_id]
    attrs = dict(span.attributes or {})
    assert attrs["gen_ai.request.model"] == "scripted-model"
    assert attrs["gen_ai.response.finish_reasons"] == ("content_filter",)
    assert attrs["guardrail.adapter"] == "server"
    (halt,) = [dict(e.attributes or {}) for e in span.events if e.name == "guardrail.halt"]
    assert halt["guardrail.monitor.id"] == "weapons" and halt["guardrail.token.index"] == \
        halted.halt.at
    flags = [dict(e.attributes or {}) for e in span.events if e.name == "guardrail.flag"]
    assert [f["guardrail.monitor.id"] for f in flags] == [f.monitor for f in halted.flags]
    quiet = dict(by_session[benign.session_id].attributes or {})
    assert quiet["gen_ai.response.finish_reasons"] == ("stop",)
    assert quiet["guardrail.tokens.read"] == benign.tokens
