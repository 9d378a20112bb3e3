"""The relay's publish is a PRODUCER span that continues the trace the outbox row was written in."""

from __future__ import annotations

from conveyor import envelope
from conveyor.runtime.relay import Relay
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from relay_helpers import TOPIC, Broker

from event_store import Database, Outbox, SqlOutboxStore


async def test_relay_publish_is_a_producer_span_between_writer_and_consumer(
    db: Database, broker: Broker, span_exporter: InMemorySpanExporter
) -> None:
    span_exporter.clear()
    with trace.get_tracer("test").start_as_current_span("writer") as writer:
        async with db.transaction() as session:
            await Outbox("t").add(session, TOPIC, {"n": 1})
    relay = Relay(SqlOutboxStore(db, listen=False), broker.transport)
    await relay.run_once()
    (received,) = await broker.collector.wait(1)
    send = next(s for s in span_exporter.get_finished_spans() if s.name == f"send {TOPIC}")
    published = envelope.decode(received.message).traceparent or ""
    assert (send.kind, send.parent.span_id, published.split("-")[2]) == (
        trace.SpanKind.PRODUCER,
        writer.get_span_context().span_id,
        format(send.context.span_id, "016x"),
    )
