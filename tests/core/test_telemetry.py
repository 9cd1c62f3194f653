"""guardrail.telemetry in process: Prometheus metrics and OpenTelemetry spans of a guard's
streams, fed by the session hooks and the observer/monitor timers, checked against the reports."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, cast

import pytest

from guardrail import Features, Guard, Monitor, Needs, Report, Score
from guardrail.observer import ObservedBatch
from guardrail.plugins import PluginHost
from guardrail.stream import TokenSpan, WordTokenizer
from guardrail.testing import plugin_monitors, split_text

prometheus_parser = pytest.importorskip("prometheus_client.parser")

BENIGN = "what a fine day it is for a walk in the park with friends"
HARMFUL = "a fine plan, but then the dangerous part begins and goes on and on"


class FakeObserver:
    """'Hidden state' of a token = its length in chars; counts forwards and their tokens."""

    name = "fake"
    num_layers = 2
    hidden_size = 1

    def __init__(self) -> None:
        self.tokenizer = WordTokenizer()
        self.forwards = 0
        self.tokens = 0

    def start(self, messages: Sequence[Any], needs: Needs) -> dict[str, int]:
        return {"seen": 0}

    def extend(self, state: dict[str, int], tokens: Sequence[TokenSpan],
               needs: Needs) -> ObservedBatch:
        self.forwards += 1
        self.tokens += len(tokens)
        rows = [[float(t.end - t.start)] for t in tokens]
        return ObservedBatch(hidden={layer: rows for layer in needs.layers})

    def truncate(self, state: dict[str, int], n_tokens: int) -> None:
        state["seen"] = n_tokens


class LongWordMonitor(Monitor):
    """Scores 1.0 on a token of 9 or more chars (" dangerous"), read from the observer."""

    def needs(self) -> Needs:
        return Needs(layers=frozenset({0}))

    def update(self, state: Any, features: Features) -> list[Score]:
        rows = features.hidden[0]
        return [Score(i, 1.0 if row[0] >= 9 else 0.0)
                for i, row in zip(features.indices, rows, strict=True)]


@pytest.fixture
def host() -> Iterator[PluginHost]:
    with plugin_monitors(long_word=lambda: LongWordMonitor()) as h:
        yield h


def _guard(host: PluginHost, observer: FakeObserver) -> Guard:
    policy = {"release": {"hold_back_tokens": 2}, "monitors": [
        {"id": "long", "use": "long-word", "action": "halt", "threshold": 0.5},
        {"id": "fine", "use": "keywords", "options": {"words": ["fine"]}, "action": "flag"},
    ]}
    return Guard.from_policy(policy, host=host, observer=observer)


def _run(guard: Guard, text: str, model: str = "m1") -> Report:
    session = guard.session(prompt="tell me", metadata={"model": model})
    for piece in split_text(text, [3, 7, 2, 11, 5]):
        session.feed(piece)
    return session.finish()


def _scrape(metrics: Any) -> dict[str, Any]:
    text = metrics.exposition().decode()
    return {f.name: f for f in prometheus_parser.text_string_to_metric_families(text)}


def _value(families: dict[str, Any], sample: str, **labels: str) -> float:
    family = families[sample.removesuffix("_total").removesuffix("_count").removesuffix("_sum")]
    found = [s.value for s in family.samples if s.name == sample and s.labels == labels]
    assert len(found) == 1, (sample, labels, family.samples)
    return float(found[0])


def test_prometheus_counts_what_the_reports_say(host: PluginHost) -> None:
    from guardrail.telemetry.prometheus import PrometheusMetrics

    observer = FakeObserver()
    guard = _guard(host, observer)
    metrics = PrometheusMetrics().attach(guard)

    live = guard.session(prompt="tell me", metadata={"model": "m1"})
    live.feed("what a fine day it is ")
    during = _scrape(metrics)
    assert _value(during, "guardrail_streams_started_total") == 1
    assert _value(during, "guardrail_streams_active") == 1
    assert _value(during, "guardrail_tokens_read_total") == live.tokens > 0
    first = live.finish()

    halted = _run(guard, HARMFUL)
    benign = _run(guard, BENIGN)
    assert halted.halt is not None and halted.halt.monitor == "long" and not benign.halted
    reports = [first, halted, benign]
    after = _scrape(metrics)
    assert _value(after, "guardrail_streams_started_total") == 3
    assert _value(after, "guardrail_streams_active") == 0
    assert _value(after, "guardrail_streams_ended_total", outcome="completed") == 2
    assert _value(after, "guardrail_streams_ended_total", outcome="halted") == 1
    assert _value(after, "guardrail_tokens_read_total") == sum(r.tokens for r in reports)
    assert _value(after, "guardrail_tokens_released_total") == sum(
        r.released_tokens for r in reports)
    assert _value(after, "guardrail_halts_total", monitor="long", cause="verdict") == 1
    flags = sum(len(r.flags) for r in reports)
    assert flags == 3 and _value(after, "guardrail_flags_total", monitor="fine",
                                 action="flag") == flags
    # Every observer read is timed, and the batches add up to the tokens it read.
    assert _value(after, "guardrail_observer_seconds_count") == observer.forwards > 3
    assert _value(after, "guardrail_observer_batch_tokens_sum") == observer.tokens
    assert _value(after, "guardrail_read_tokens_sum") == sum(r.tokens for r in reports)
    # Monitors score each batch of final tokens; the observer reads several batches at once
    # when a decision is due (docs/concepts.md), so there are no more reads than updates.
    updates = _value(after, "guardrail_monitor_seconds_count", monitor="long")
    assert updates == _value(after, "guardrail_monitor_seconds_count", monitor="fine")
    assert updates >= observer.forwards
    assert halted.halt.at >= 0
    assert _value(after, "guardrail_tokens_past_verdict_count") == 1
    assert _value(after, "guardrail_tokens_past_verdict_sum") == halted.tokens - halted.halt.at - 1
    assert _value(after, "guardrail_leaked_tokens_total") == halted.leaked_tokens


def test_each_guard_has_its_own_registry_and_detach_stops_counting(host: PluginHost) -> None:
    from guardrail.telemetry.prometheus import PrometheusMetrics

    one, two = _guard(host, FakeObserver()), _guard(host, FakeObserver())  # one plugin host
    first, second = PrometheusMetrics().attach(one), PrometheusMetrics().attach(two)
    _run(one, BENIGN)
    assert _value(_scrape(first), "guardrail_streams_started_total") == 1
    assert _value(_scrape(second), "guardrail_streams_started_total") == 0
    first.detach()
    report = _run(one, HARMFUL)
    assert report.halted  # the guard still works without its listener
    assert _value(_scrape(first), "guardrail_streams_started_total") == 1


def test_monitor_defaults_still_come_from_the_wrapped_monitor(host: PluginHost) -> None:
    """The timers wrap each monitor; a calibrated instance threshold must survive that."""
    from guardrail.telemetry.prometheus import PrometheusMetrics

    guard = _guard(host, FakeObserver())
    spec, monitor = guard.monitors[1]
    monitor.default_threshold = 0.25  # type: ignore[misc]
    PrometheusMetrics().attach(guard)
    assert guard.threshold_of(spec) == 0.25
    assert _run(guard, HARMFUL).halted


def test_otel_spans_per_stream_with_reads_and_verdict_events(host: PluginHost) -> None:
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from guardrail.telemetry.otel import READ_SPAN, OtelTracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    observer = FakeObserver()
    guard = _guard(host, observer)
    OtelTracing(provider).attach(guard)

    report = _run(guard, HARMFUL, model="scripted-model")
    assert report.halt is not None
    spans = exporter.get_finished_spans()
    (stream,) = [s for s in spans if s.name == "chat scripted-model"]
    attrs = dict(stream.attributes or {})
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.request.model"] == "scripted-model"
    assert attrs["gen_ai.response.finish_reasons"] == ("content_filter",)
    assert attrs["guardrail.session.id"] == report.session_id
    assert attrs["guardrail.tokens.read"] == report.tokens
    assert attrs["guardrail.halt.monitor"] == "long"
    events = {e.name: dict(e.attributes or {}) for e in stream.events}
    assert events["guardrail.halt"]["guardrail.monitor.id"] == "long"
    assert events["guardrail.halt"]["guardrail.token.index"] == report.halt.at
    assert events["guardrail.halt"]["guardrail.score"] == report.halt.score
    assert events["guardrail.flag"]["guardrail.monitor.id"] == "fine"
    assert events["guardrail.flag"]["guardrail.score"] == report.flags[0].score
    reads = [s for s in spans if s.name == READ_SPAN]
    assert len(reads) == observer.forwards
    assert all(r.parent is not None and r.parent.span_id == stream.context.span_id
               for r in reads)
    # the reads cover the stream from its first token, back to back; the last may read past the
    # halt (tokens gathered after the halting batch are read, then dropped)
    spans_at = sorted((int(str((r.attributes or {})["guardrail.token.start"])),
                       int(str((r.attributes or {})["guardrail.observer.tokens"]))) for r in reads)
    assert [start for start, _ in spans_at] == [sum(n for _, n in spans_at[:i])
                                                for i in range(len(spans_at))]
    assert sum(n for _, n in spans_at) >= report.tokens
    # ids, scores and offsets only: none of the response's words are on the span
    values = " ".join(str(v) for e in stream.events for v in (e.attributes or {}).values())
    values += " ".join(str(v) for v in attrs.values())
    assert "dangerous" not in values and "plan" not in values


class LengthIds(WordTokenizer):
    """Token id = its length in chars: the batched observer reads ids, not text."""

    def tokenize(self, text: str) -> list[TokenSpan]:
        return [TokenSpan(t.start, t.end, t.end - t.start) for t in super().tokenize(text)]


class IdObserver(FakeObserver):
    def __init__(self) -> None:
        super().__init__()
        self.tokenizer = LengthIds()

    def extend(self, state: dict[str, int], tokens: Sequence[TokenSpan],
               needs: Needs) -> ObservedBatch:
        self.forwards += 1
        self.tokens += len(tokens)
        rows = [[float(t.id or 0)] for t in tokens]
        return ObservedBatch(hidden={layer: rows for layer in needs.layers})


async def test_reads_of_a_batched_observer_are_timed_in_async_streams(host: PluginHost) -> None:
    """Async drivers submit reads to the Guard's batched observer instead of calling extend;
    those reads are the ones to time."""
    from guardrail.observer.batch import BatchedObserver
    from guardrail.telemetry.prometheus import PrometheusMetrics

    observer = IdObserver()
    guard = _guard(host, cast(FakeObserver, BatchedObserver(observer)))
    metrics = PrometheusMetrics().attach(guard)
    reports = []
    for text in (BENIGN, HARMFUL):
        session = guard.session(prompt="tell me", metadata={"model": "m1"})
        for piece in split_text(text, [3, 7, 2, 11, 5]):
            await session.afeed(piece)
        reports.append(await session.afinish())
    assert reports[1].halted and not reports[0].halted
    after = _scrape(metrics)
    assert observer.forwards > 2
    assert _value(after, "guardrail_observer_seconds_count") == observer.forwards
    assert _value(after, "guardrail_observer_batch_tokens_sum") == observer.tokens
