"""Publishing from any Python code, straight to the broker."""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType
from typing import Any

from conveyor import envelope, names, ports, telemetry, transports


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

    async def send(self, topic: str, event: envelope.Envelope) -> None:
        """Publish a ready-made envelope and wait for the broker's confirmation.

        Raises:
            ConfigurationError: invalid topic.
            TransportError: the broker did not confirm the message.
        """
        names.check("topic", topic)
        with telemetry.producer_span(topic, event, self._system):
            await self._transport.publish(topic, envelope.to_binary(event, self._transport.binary_prefix))
        telemetry.PUBLISHED.labels(topic).inc()
