"""Publishing from any Python code, straight to the broker."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any

from conveyor import envelope, errors, names, ports, telemetry, transports


class Publisher:
    """Publishes CloudEvents to a broker and returns once the broker has them.

    Use it as an async context manager::

        async with Publisher("nats://127.0.0.1:4222", source="orders") as publisher:
            await publisher.publish("orders.placed", {"order_id": "o-1"}, key="o-1")

    A direct publish is not atomic with your database writes; to publish as
    part of a transaction, use ``event_store.Outbox``.

    Args:
        url: broker URL (``kafka://``, ``amqp://``, ``nats://``, ``memory://``).
        source: CloudEvents ``source``: the publishing service's name.

    Raises:
        ConfigurationError: the URL is not supported or its client is not installed.
    """

    def __init__(self, url: str, *, source: str = "conveyor") -> None:
        self._transport: ports.Transport = transports.create(url)
        self._source = source
        self._system = telemetry.messaging_system(self._transport)
        self._counters: dict[str, Any] = {}

    async def __aenter__(self) -> Publisher:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect to the broker.

        Raises:
            TransientTransportError: the broker is unreachable.
        """
        await self._transport.connect()

    async def close(self) -> None:
        """Close the connection."""
        await self._transport.close()

    async def publish(
        self,
        topic: str,
        data: Any,
        *,
        key: str | None = None,
        type: str | None = None,  # noqa: A002 - the CloudEvents attribute name
        subject: str | None = None,
        headers: Mapping[str, str] | None = None,
        extensions: Mapping[str, str] | None = None,
    ) -> envelope.Envelope:
        """Publish one event and wait for the broker's confirmation.

        Args:
            topic: destination topic.
            data: a pydantic model, a JSON-compatible value or bytes.
            key: ordering key; events with the same key are handled in order.
            type: CloudEvents type (default: the topic).
            subject: CloudEvents subject.
            headers: extra transport headers.
            extensions: CloudEvents extension attributes (lower-case names).

        Returns:
            The envelope sent (its ``id`` identifies the event).

        Raises:
            ConfigurationError: invalid topic, unserialisable data or an invalid extension.
            TransportError: the broker did not confirm the message.
        """
        event = envelope.create(
            type or topic, data, source=self._source, key=key, subject=subject, headers=headers, extensions=extensions
        )
        await self.send(topic, event)
        return event

    async def publish_many(
        self,
        topic: str,
        items: Iterable[Any],
        *,
        key: Callable[[Any], str | None] | None = None,
        type: str | None = None,  # noqa: A002 - the CloudEvents attribute name
        extensions: Mapping[str, str] | None = None,
    ) -> list[envelope.Envelope]:
        """Publish many events to one topic, pipelined, and wait until the broker answered for each.

        Much faster than awaiting :meth:`publish` one by one: the broker
        confirms them while later ones are on the wire. Events with the same
        key keep their order.

        Args:
            topic: destination topic.
            items: the events' data (pydantic models, JSON-compatible values or bytes).
            key: returns an item's ordering key (default: none).
            type: CloudEvents type of every event (default: the topic).
            extensions: CloudEvents extension attributes of every event.

        Returns:
            The envelopes sent, in order.

        Raises:
            ConfigurationError: invalid topic, unserialisable data or an invalid extension (nothing sent).
            PublishManyError: some events were refused; ``.sent`` and ``.failed`` say which.
            TransportError: not connected (nothing sent).
        """
        names.check("topic", topic)
        events = [
            envelope.create(
                type or topic, item, source=self._source, key=key(item) if key else None, extensions=extensions
            )
            for item in items
        ]
        prefix = self._transport.binary_prefix
        with telemetry.send_span(topic, None, self._system) as context:  # one span for the batch
            if context[0] is not None:
                for event in events:
                    event.traceparent, event.tracestate = context
            results = await self._transport.publish_many([(topic, envelope.to_binary(e, prefix)) for e in events])
        failed = [(event, error) for event, error in zip(events, results, strict=True) if error is not None]
        self._published(topic).inc(len(events) - len(failed))
        if failed:
            raise errors.PublishManyError([e for e, r in zip(events, results, strict=True) if r is None], failed)
        return events

    async def send(self, topic: str, event: envelope.Envelope) -> None:
        """Publish a ready-made envelope and wait for the broker's confirmation.

        Raises:
            ConfigurationError: invalid topic.
            TransportError: the broker did not confirm the message.
        """
        names.check("topic", topic)
        if telemetry.tracing():
            with telemetry.producer_span(topic, event, self._system):
                await self._transport.publish(topic, envelope.to_binary(event, self._transport.binary_prefix))
        else:
            await self._transport.publish(topic, envelope.to_binary(event, self._transport.binary_prefix))
        self._published(topic).inc()

    def _published(self, topic: str) -> Any:
        """The ``conveyor_published`` child of a topic (cached: ``labels()`` costs more than the increment)."""
        child = self._counters.get(topic)
        if child is None:
            child = self._counters[topic] = telemetry.PUBLISHED.labels(topic)
        return child
