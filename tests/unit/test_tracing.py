"""Tracing across hops: producer span -> consumer span -> producer span -> the next consumer, one trace."""

import pytest
from conveyor import Context, Publisher, Registry, Reject, on
from conveyor.runtime.worker import Worker
from conveyor.testing import unique, wait_for
from conveyor.transports.memory import MemoryTransport
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

_exporter: InMemorySpanExporter


@pytest.fixture(autouse=True)
def _sdk(span_exporter: InMemorySpanExporter) -> None:
    global _exporter
    _exporter = span_exporter
    _exporter.clear()


async def test_consumer_spans_continue_the_producers_trace() -> None:
    _exporter.clear()
    url = f"memory://{unique('trace')}"
    first, second = unique("tr"), unique("tr")
    done: list[str] = []

    @on(first, name=unique("h"))
    async def forward(payload: dict, ctx: Context) -> None:
        ctx.publish(second, payload)

    @on(second, name=unique("h"))
    async def finish(payload: dict) -> None:
        done.append("ok")

    transport = MemoryTransport(url)
    await transport.connect()
    worker = Worker(Registry.of(forward, finish).handlers, transport, source="t")
    await worker.start()
    async with Publisher(url, source="t") as publisher:
        await publisher.publish(first, {"n": 1})
    await wait_for(lambda: done == ["ok"], 5)
    await worker.stop(1)
    await transport.close()

    spans = {span.name: span for span in _exporter.get_finished_spans()}
    send, hop1, hop2 = spans[f"send {first}"], spans[f"process {first}"], spans[f"process {second}"]
    assert send.kind == trace.SpanKind.PRODUCER and hop1.kind == trace.SpanKind.CONSUMER
    assert send.context.trace_id == hop1.context.trace_id == hop2.context.trace_id
    assert hop1.parent.span_id == send.context.span_id
    forward_send = spans[f"send {second}"]  # the handler's publish: a producer span between the hops
    assert (forward_send.parent.span_id, hop2.parent.span_id) == (hop1.context.span_id, forward_send.context.span_id)
    assert hop1.attributes["messaging.destination.name"] == first
    assert hop1.attributes["messaging.system"] == "memory"


async def test_failed_attempt_marks_the_span_as_error() -> None:
    _exporter.clear()
    url = f"memory://{unique('trace')}"
    topic = unique("tr")
    attempts: list[int] = []

    @on(topic, name=unique("h"), max_attempts=1)
    async def fails(payload: dict, ctx: Context) -> None:
        attempts.append(ctx.message.attempt)
        raise ValueError("nope")

    transport = MemoryTransport(url)
    await transport.connect()
    worker = Worker(Registry.of(fails).handlers, transport, source="t")
    await worker.start()
    async with Publisher(url) as publisher:
        await publisher.publish(topic, {"n": 1})
    await wait_for(lambda: any(s.name == f"process {topic}" for s in _exporter.get_finished_spans()), 5)
    await worker.stop(1)
    await transport.close()
    (span,) = [s for s in _exporter.get_finished_spans() if s.name == f"process {topic}"]
    assert span.status.status_code == trace.StatusCode.ERROR
    assert "ValueError: nope" in (span.status.description or "")


async def test_a_dead_letter_is_a_producer_span_of_the_failed_attempt() -> None:
    _exporter.clear()
    url = f"memory://{unique('trace')}"
    topic = unique("tr")

    @on(topic, name=unique("h"))
    async def refuses(payload: dict) -> None:
        raise Reject("no")

    transport = MemoryTransport(url)
    await transport.connect()
    worker = Worker(Registry.of(refuses).handlers, transport, source="t")
    await worker.start()
    async with Publisher(url) as publisher:
        await publisher.publish(topic, {"n": 1})
    await wait_for(lambda: any(s.name == f"send {topic}.dlq" for s in _exporter.get_finished_spans()), 5)
    await worker.stop(1)
    await transport.close()
    spans = {span.name: span for span in _exporter.get_finished_spans()}
    assert spans[f"send {topic}.dlq"].parent.span_id == spans[f"process {topic}"].context.span_id
