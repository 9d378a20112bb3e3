"""Metrics (Prometheus) and traces (OpenTelemetry) of the runtime."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import Counter, Gauge, Histogram

from conveyor import envelope

MESSAGES = Counter(
    "conveyor_messages",
    "Messages handled, by handler and outcome (succeeded, retried, dead_lettered, duplicate).",
    ["handler", "outcome"],
)
HANDLER_SECONDS = Histogram(
    "conveyor_handler_seconds",
    "Time spent in one handler attempt, in seconds.",
    ["handler"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
# Gauges say how ``conveyor worker --processes N`` combines the children's values
# (prometheus_client multiprocess mode; ignored by a single process): ``livesum``
# for per-process amounts, ``livemax`` for figures every replica reads from the
# broker alike. ``live*``: a dead child's stale value is dropped. (A gauge read
# through ``set_function`` is not written to the multiprocess files: the aggregate
# shows it as 0; only the child's own ``/metrics`` has its value.)
IN_FLIGHT = Gauge(
    "conveyor_in_flight",
    "Messages accepted by a handler and not yet settled (summed over live worker processes).",
    ["handler"],
    multiprocess_mode="livesum",
)
PUBLISHED = Counter("conveyor_published", "Messages published, by topic.", ["topic"])
BACKLOG = Gauge(
    "conveyor_backlog",
    "Messages waiting for a handler's subscription, as the broker reports it (the autoscaling signal).",
    ["handler"],
    multiprocess_mode="livemax",  # the subscription's figure: every replica reports the same
)
OLDEST_AGE = Gauge(
    "conveyor_oldest_age_seconds",
    "Age of the oldest unsettled message of a handler's subscription, where the broker knows it.",
    ["handler"],
    multiprocess_mode="livemax",  # the subscription's figure: every replica reports the same
)
DEAD_LETTERS = Gauge(
    "conveyor_dead_letters",
    "Dead letters kept for a topic (its keeper's backlog, as the broker reports it; read every 30 s).",
    ["topic"],
    multiprocess_mode="livemax",  # the keeper's figure: every replica reports the same
)
CAPACITY = Gauge(
    "conveyor_capacity",
    "Messages a handler runs at once in this process (its concurrency); summed over live worker processes.",
    ["handler"],
    multiprocess_mode="livesum",
)
OLDEST_IN_HAND = Gauge(
    "conveyor_oldest_in_hand_seconds",
    "Seconds a handler has had its oldest unsettled message in hand: a hung attempt or an outage it waits out.",
    ["handler"],
    multiprocess_mode="livemax",
)
SCHEDULER_TICK_AGE = Gauge(
    "conveyor_scheduler_last_tick_age_seconds",
    "Seconds since the scheduler last completed a tick (claimed every due fire); grows while it cannot.",
    multiprocess_mode="livemax",
)
OUTAGE_WAITS = Counter(
    "conveyor_outage_waits",
    "Times a handler held a message because the database or broker was unavailable (no attempt spent).",
    ["handler", "dependency"],
)


# -- tracing -----------------------------------------------------------------
# Spans follow the OpenTelemetry messaging semantic conventions: a PRODUCER span
# "send <topic>" whose context travels in the CloudEvents ``traceparent``
# extension, and a CONSUMER span "process <topic>" that continues that trace.
# With no SDK configured the API's no-op tracer makes this nearly free.

_tracer = trace.get_tracer("conveyor")
_propagator = TraceContextTextMapPropagator()
_SYSTEMS = {
    "MemoryTransport": "memory",
    "KafkaTransport": "kafka",
    "RabbitTransport": "rabbitmq",
    "NatsTransport": "nats",
}


def messaging_system(transport: object) -> str:
    """The ``messaging.system`` value for a transport."""
    return _SYSTEMS.get(type(transport).__name__, type(transport).__name__.lower())


_PROVIDER_FROM_ENV = bool(os.environ.get("OTEL_PYTHON_TRACER_PROVIDER"))


def tracing() -> bool:
    """True once an OpenTelemetry SDK tracer provider is installed (else spans are skipped: no cost).

    Called for every message: until a provider is set (and none is named in the
    environment) it answers from the API's global without the environment
    lookup ``get_tracer_provider`` makes on every call.
    """
    if getattr(trace, "_TRACER_PROVIDER", True) is None and not _PROVIDER_FROM_ENV:
        return False
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider | trace.NoOpTracerProvider)


def current_trace() -> tuple[str | None, str | None]:
    """``(traceparent, tracestate)`` of the current span, or ``(None, None)``."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get("traceparent"), carrier.get("tracestate")


@contextlib.contextmanager
def producer_span(topic: str, message: envelope.Envelope, system: str) -> Iterator[None]:
    """A PRODUCER span around a publish; stamps its context into ``message``."""
    with send_span(topic, message.id, system) as context:
        if context[0] is not None:
            message.traceparent, message.tracestate = context
        yield


@contextlib.contextmanager
def send_span(
    topic: str,
    message_id: str | None,
    system: str,
    parent: tuple[str | None, str | None] = (None, None),
) -> Iterator[tuple[str | None, str | None]]:
    """A PRODUCER span around a publish of a message already encoded; yields its trace context.

    Args:
        topic: the destination.
        message_id: the message's id.
        system: ``messaging.system`` (``kafka``, ``rabbitmq``, ...).
        parent: ``(traceparent, tracestate)`` to continue (an outbox row's
            stored context); the current span when not given.

    Yields:
        ``(traceparent, tracestate)`` of the span, to stamp on the message;
        ``(None, None)`` when no tracing SDK is installed.
    """
    if not tracing():
        yield None, None
        return
    context = None
    if parent[0]:
        carrier = {"traceparent": parent[0]}
        if parent[1]:
            carrier["tracestate"] = parent[1]
        context = _propagator.extract(carrier)
    attributes = {"messaging.system": system, "messaging.operation.type": "send", "messaging.destination.name": topic}
    if message_id is not None:
        attributes["messaging.message.id"] = message_id
    with _tracer.start_as_current_span(
        f"send {topic}", context=context, kind=trace.SpanKind.PRODUCER, attributes=attributes
    ):
        yield current_trace()


@contextlib.contextmanager
def consumer_span(topic: str, handler: str, message: envelope.Envelope, system: str) -> Iterator[trace.Span]:
    """A CONSUMER span for handling ``message``, continuing the producer's trace."""
    if not tracing():
        yield trace.INVALID_SPAN
        return
    parent = None
    if message.traceparent:
        carrier = {"traceparent": message.traceparent}
        if message.tracestate:
            carrier["tracestate"] = message.tracestate
        parent = _propagator.extract(carrier)
    attributes: dict[str, str | int] = {
        "messaging.system": system,
        "messaging.operation.type": "process",
        "messaging.destination.name": topic,
        "messaging.consumer.group.name": handler,
        "messaging.message.id": message.id,
        "conveyor.attempt": message.attempt,
    }
    if message.correlationid:
        attributes["messaging.message.conversation_id"] = message.correlationid
    with _tracer.start_as_current_span(
        f"process {topic}",
        context=parent,
        kind=trace.SpanKind.CONSUMER,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        yield span
