"""The RabbitMQ transport, on aio-pika (``amqp://user:pass@host:port/vhost``, ``amqps://``).

Wire names, documented so that other services can publish without Conveyor:

* a topic is a routing key on the durable topic exchange ``conveyor`` (the
  ``exchange`` argument);
* a subscription is the durable quorum queue ``conveyor-limited.<name>``, bound
  to its topic, with ``x-delivery-limit`` = ``max_deliveries`` as a backstop
  against redelivery loops; a message past the limit is dead-lettered (through
  the fanout exchange ``conveyor-over-limit.<name>``) into the keeper of
  ``<topic>.dlq``, never dropped. One without a delivery limit
  (``max_deliveries=None``: the keepers of dead letters, ``<topic>.dlq``) is the
  durable classic queue ``conveyor-kept.<name>``. Earlier versions used the
  quorum queue ``conveyor.<name>`` for both, without a dead-letter target: a
  declare moves what it holds into the current queue and deletes it
  (see :mod:`conveyor.transports.rabbit_queues`);
* CloudEvents binary mode (AMQP binding on 0-9-1): attributes in the headers
  table with the prefix ``cloudEvents_``, ``datacontenttype`` in the
  ``content_type`` property, the ordering key in the header ``conveyor-key``.

Unroutable messages: every publish is mandatory, with publisher confirms. A
message no queue is bound to (no subscription of its topic declared yet) is
returned by the broker, and :meth:`RabbitTransport.publish` raises a
:class:`~conveyor.errors.TransportError`, not a transient one: the outbox relay
spends an attempt, backs off and finally parks the row (``conveyor outbox list
--parked``) instead of marking sent a message the broker dropped. (The other
option, an alternate exchange into a retained queue, would need new arguments on
the ``conveyor`` exchange, which an existing broker refuses.) Dead letters go to
``<topic>.dlq``, which always has a keeper subscription. aiormq matches a
return to its publish by message id, so publishes sharing an id go one at a time.

Retries: RabbitMQ has no per-message delay without plugins, so ``nack(delay)``
publishes a copy (header ``conveyor-attempt`` = attempt + 1), mandatory and
confirmed, to a *delay tier*: fanout exchange and quorum queue
``conveyor-delay-quorum.<ms>ms`` with ``x-message-ttl`` and dead-lettering to
the default exchange, with the routing key set to the subscription's own queue:
on expiry the copy lands in that queue only. Then the original is acked. Delays
round up to the next tier (50 ms doubling, up to about 55 minutes); a longer
delay hops through the largest tier until the time in header ``conveyor-due``.
The attempt of a delivery is that header plus the quorum queue's
``x-delivery-count`` (returns after a consumer died). Tiers are quorum queues
that dead-letter at-least-once (see :mod:`conveyor.transports.rabbit_wire`).

Topology is reconciled by :meth:`RabbitTransport.declare`; each subscription's
bound topic is recorded in the classic queue ``conveyor-binding.<name>``.

Reconnects are our own loop: aio-pika's robust connection has a history of
consumers that do not come back after a broker restart. On connection loss the
transport reconnects with backoff and every consumer opens a new channel and
consumes again; deliveries of the lost channel are redelivered by the broker.

The message mapping and delay tiers live in :mod:`conveyor.transports.rabbit_wire`,
the consumers in :mod:`conveyor.transports.rabbit_consume`, queue names and
arguments, binding records and the move of old keepers in
:mod:`conveyor.transports.rabbit_queues`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence

import aio_pika
import aiormq
import aiormq.abc
from aio_pika.abc import AbstractChannel, AbstractConnection
from pamqp.commands import Basic

from conveyor import errors, names, ports, transports
from conveyor.envelope import AMQP_PREFIX, WireMessage
from conveyor.transports import rabbit_backlog, rabbit_consume, rabbit_frames, rabbit_queues, rabbit_wire

log = logging.getLogger("conveyor.transports.rabbit")


class RabbitTransport:
    """Transport over RabbitMQ (AMQP 0-9-1) with aio-pika.

    Args:
        url: ``amqp://user:pass@host:port/vhost`` or ``amqps://...``.
        exchange: the durable topic exchange; also the prefix of queue names.
        delay_tiers: delays (seconds, ascending) that ``nack`` rounds up to.
        timeout: seconds to wait for a connection, a confirm or a declare.
        reconnect_max: longest pause between reconnection attempts, in seconds.
    """

    features = ports.TransportFeatures(
        ordered_per_key=True,  # per consumer: a queue delivers in order; replicas share a key round-robin
        history_for_new_groups=False,
        attempts_survive_restart=True,
        durable=True,
        refuses_unroutable=True,  # mandatory publishes: a message no queue takes is returned, not dropped
    )
    binary_prefix = AMQP_PREFIX

    def __init__(
        self,
        url: str,
        *,
        exchange: str = "conveyor",
        delay_tiers: Sequence[float] = rabbit_wire.DEFAULT_TIERS,
        timeout: float = 10.0,
        reconnect_max: float = 5.0,
    ) -> None:
        self.url = url
        self.exchange = names.check("exchange", exchange)
        self.tiers = tuple(sorted(delay_tiers))
        self.timeout = timeout
        self.backoff_min, self.backoff_max = 0.1, reconnect_max
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._publisher: aiormq.abc.AbstractChannel | None = None
        self._ready = asyncio.Event()
        self._lost = asyncio.Event()
        self._lock = asyncio.Lock()
        self._closed = True
        self._supervisor: asyncio.Task[None] | None = None
        self._consumers: list[rabbit_consume.RabbitConsumer] = []
        self._tiers_declared: set[int] = set()
        self._kept: set[str] = set()  # subscriptions last declared without a delivery limit
        self._publishing: dict[str, asyncio.Event] = {}  # message id -> its publish is done

    def queue_name(self, subscription: str | ports.Subscription) -> str:
        """The queue of a subscription: ``<exchange>-limited.<name>``, or ``<exchange>-kept.<name>`` without a limit.

        Given only a name, the queue this transport last declared for it.
        """
        if isinstance(subscription, ports.Subscription):
            name, kept = subscription.name, subscription.max_deliveries is None
        else:
            name, kept = subscription, subscription in self._kept
        return rabbit_queues.queue_name(self.exchange, name, kept=kept)

    # -- connection ----------------------------------------------------------------

    async def connect(self) -> None:
        """Connect, declare the exchange and start the reconnect supervisor.

        Raises:
            TransientTransportError: the broker is unreachable.
            TransportError: it refused the credentials or vhost.
        """
        if not self._closed:
            return
        await self._open()
        self._closed = False
        self._supervisor = asyncio.create_task(self._maintain(), name="rabbit-reconnect")

    async def _open(self) -> None:
        try:
            connection = await aio_pika.connect(
                self.url,
                timeout=self.timeout,
                client_properties={"connection_name": "conveyor"},
                connection_class=rabbit_frames.Connection,
            )
        except (TimeoutError, *rabbit_wire.DRIVER_ERRORS) as exc:
            raise rabbit_wire.transport_error(f"connection to {self._safe_url()}", exc) from exc
        connection.close_callbacks.add(self._on_connection_closed)
        self._connection = connection
        self._tiers_declared.clear()
        try:
            await self._open_publisher(connection)
        except errors.TransportError:
            self._connection = None
            with contextlib.suppress(*rabbit_wire.DRIVER_ERRORS, asyncio.TimeoutError):
                await connection.close()
            raise
        self._ready.set()

    async def _open_publisher(self, connection: AbstractConnection) -> aiormq.abc.AbstractChannel:
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            await channel.declare_exchange(self.exchange, aio_pika.ExchangeType.TOPIC, durable=True)
            self._channel, self._publisher = channel, await channel.get_underlay_channel()
        except rabbit_wire.DRIVER_ERRORS as exc:
            raise rabbit_wire.transport_error(f"declaring exchange {self.exchange!r}", exc) from exc
        return self._publisher

    def _on_connection_closed(self, sender: object, exc: BaseException | None = None) -> None:
        if sender is self._connection:
            self._ready.clear()
            if not self._closed:
                self._lost.set()

    async def _maintain(self) -> None:
        while True:
            await self._lost.wait()
            self._lost.clear()
            log.warning("connection to RabbitMQ %s lost; reconnecting", self._safe_url())
            backoff = self.backoff_min
            while not self._ready.is_set():
                try:
                    await self._open()
                except errors.TransportError as exc:
                    log.warning("reconnecting to RabbitMQ failed (%s); retrying in %.1fs", exc, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, self.backoff_max)
            log.info("reconnected to RabbitMQ %s", self._safe_url())

    async def wait_connected(self) -> AbstractConnection:
        """The live connection, waiting up to ``timeout`` while reconnecting.

        Raises:
            TransportError: the transport is closed.
            TransientTransportError: still not reconnected after ``timeout``.
        """
        if self._closed:
            raise errors.TransportError("RabbitMQ transport is closed; call connect() first")
        if not self._ready.is_set():
            try:
                await asyncio.wait_for(self._ready.wait(), self.timeout)
            except TimeoutError as exc:
                raise errors.TransientTransportError(f"RabbitMQ {self._safe_url()} is unreachable") from exc
        assert self._connection is not None
        return self._connection

    async def _channel_for_publish(self) -> aiormq.abc.AbstractChannel:
        publisher = self._publisher
        if publisher is not None and not publisher.is_closed and self._ready.is_set() and not self._closed:
            return publisher
        connection = await self.wait_connected()
        async with self._lock:  # one reopen for many publishers
            if self._publisher is None or self._publisher.is_closed:
                return await self._open_publisher(connection)
            return self._publisher

    async def close(self) -> None:
        """Stop consumers and close the connection: unacked deliveries are requeued; idempotent."""
        self._closed = True
        self._ready.clear()
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
            self._supervisor = None
        for consumer in self._consumers:
            await consumer.halt()
        self._consumers.clear()
        connection, self._connection, self._publisher = self._connection, None, None
        if connection is not None:
            with contextlib.suppress(*rabbit_wire.DRIVER_ERRORS, asyncio.TimeoutError):
                await asyncio.wait_for(connection.close(), self.timeout)

    def _safe_url(self) -> str:
        scheme, _, rest = self.url.partition("://")
        return f"{scheme}://{rest.rpartition('@')[2]}"

    # -- publishing ------------------------------------------------------------------

    async def publish(self, topic: str, message: WireMessage) -> None:
        """Publish persistently to the exchange with routing key ``topic``; return once confirmed.

        The publish is mandatory: a message no declared subscription is bound to
        is returned by the broker and refused here, never silently dropped.

        Raises:
            TransientTransportError: the broker is unreachable or nacked the message.
            TransportError: the transport is closed, or the broker refused or
                returned the message (no queue is bound to ``topic``).
        """
        properties = rabbit_wire.outgoing_properties(message)
        try:
            await self._publish_mandatory(message.body, self.exchange, topic, properties)
        except aiormq.exceptions.PublishError as exc:
            refused = rabbit_wire.transport_error(f"publish to {topic!r}", exc)
            raise errors.TransportError(
                f"{refused}; declare a subscription of the topic first (start its worker, "
                "or run `conveyor worker --declare-only`)"
            ) from exc
        except rabbit_wire.DRIVER_ERRORS as exc:
            raise rabbit_wire.transport_error(f"publish to {topic!r}", exc) from exc

    async def publish_many(self, messages: Sequence[tuple[str, WireMessage]]) -> list[Exception | None]:
        """Publish all, pipelined on the confirming channel; wait for every confirm.

        The channel writes frames in call order, so order per topic holds.

        Raises:
            TransportError: the transport is closed (nothing was sent).
        """
        if self._closed:
            raise errors.TransportError(f"RabbitMQ transport {self._safe_url()} is closed")
        results = await asyncio.gather(*(self.publish(t, m) for t, m in messages), return_exceptions=True)
        return [transports.publish_result(r) for r in results]

    async def send_delayed(self, queue: str, body: bytes, properties: Basic.Properties, delay: float) -> None:
        """Publish to the delay tier for ``delay``; on expiry it dead-letters into ``queue``.

        Raises:
            TransportError: the tier could not be declared, or the copy was
                returned (the tier queue is gone) or not confirmed.
        """
        name = await self._declare_tier(rabbit_wire.tier_ms(self.tiers, delay))
        try:
            await self._publish_mandatory(body, name, queue, properties)
        except rabbit_wire.DRIVER_ERRORS as exc:
            self._tiers_declared.clear()  # the tier may have been deleted: declare it again
            raise rabbit_wire.transport_error(f"delaying a message for {queue!r}", exc) from exc

    async def _publish_mandatory(self, body: bytes, exchange: str, key: str, properties: Basic.Properties) -> None:
        """Publish with ``mandatory`` on the confirming channel; return once confirmed.

        aiormq matches a basic.return to its publish by message id, so two
        publishes in flight with one id could get each other's verdict (a
        returned message reported as confirmed): those go one after the other.

        Raises:
            aiormq.exceptions.PublishError: the broker returned the message (unroutable).
            Exception: one of :data:`rabbit_wire.DRIVER_ERRORS`, or a
                :class:`~conveyor.errors.TransportError` if the transport is closed.
        """
        message_id = properties.message_id or None  # aiormq gives a message without one a random id
        while message_id is not None and (pending := self._publishing.get(message_id)) is not None:
            await pending.wait()
        done = asyncio.Event()
        if message_id is not None:
            self._publishing[message_id] = done
        try:
            channel = await self._channel_for_publish()
            await channel.basic_publish(
                body, exchange=exchange, routing_key=key, properties=properties, mandatory=True, timeout=self.timeout
            )
        finally:
            if message_id is not None:
                del self._publishing[message_id]
            done.set()

    async def _declare_tier(self, ms: int) -> str:
        name = rabbit_wire.tier_name(self.exchange, ms)
        if ms in self._tiers_declared:
            return name
        async with self._topology() as channel:
            exchange = await channel.declare_exchange(name, aio_pika.ExchangeType.FANOUT, durable=True)
            queue = await channel.declare_queue(name, durable=True, arguments=rabbit_wire.tier_arguments(ms))
            await queue.bind(exchange)
        self._tiers_declared.add(ms)
        return name

    # -- topology --------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _topology(self) -> AsyncIterator[AbstractChannel]:
        """A short-lived channel for declarations (a refused declare closes its channel)."""
        connection = await self.wait_connected()
        channel: AbstractChannel | None = None
        try:
            channel = await connection.channel(publisher_confirms=True)
            yield channel
        except rabbit_wire.DRIVER_ERRORS as exc:
            raise rabbit_wire.transport_error("declaring topology", exc) from exc
        finally:
            if channel is not None and not channel.is_closed:
                with contextlib.suppress(*rabbit_wire.DRIVER_ERRORS):
                    await channel.close()

    async def declare(self, topics: Sequence[str], subscriptions: Sequence[ports.Subscription]) -> None:
        """Declare the exchange and each subscription's queue, and reconcile its binding.

        Each subscription also takes over what its queue of earlier versions
        (``<exchange>.<name>``) holds (see :mod:`~conveyor.transports.rabbit_queues`).

        Raises:
            ConfigurationError: a topic or subscription name is invalid.
            TransportError: RabbitMQ refused the topology (for instance a queue
                whose arguments changed); the message says what differs and what to do.
        """
        for topic in topics:
            names.check("topic", topic)
        for subscription in subscriptions:
            names.check("subscription name", subscription.name)
            names.check("topic", subscription.topic)
        async with self._topology() as channel:
            await channel.declare_exchange(self.exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        for subscription in subscriptions:
            try:
                async with self._topology() as channel:
                    await rabbit_queues.declare(channel, self.exchange, subscription, self.timeout)
            except errors.TransportError as exc:
                if isinstance(exc.__cause__, aiormq.exceptions.ChannelPreconditionFailed):
                    queue = self.queue_name(subscription)
                    raise errors.TransportError(
                        rabbit_queues.explain(self.exchange, subscription, queue, exc.__cause__)
                    ) from exc.__cause__
                raise
            if subscription.max_deliveries is None:
                self._kept.add(subscription.name)
            else:
                self._kept.discard(subscription.name)
            connection = await self.wait_connected()
            await rabbit_queues.move_old_queue(connection, self.exchange, subscription, self.timeout)

    # -- consuming and health --------------------------------------------------------

    async def subscribe(
        self, subscription: ports.Subscription, callback: ports.DeliveryCallback
    ) -> rabbit_consume.RabbitConsumer:
        """Declare the subscription, then consume its queue with ``prefetch`` unacked at most.

        Raises:
            TransportError: the transport is closed or the queue cannot be consumed.
        """
        await self.declare([subscription.topic], [subscription])
        consumer = rabbit_consume.RabbitConsumer(self, subscription, callback)
        await consumer.start()
        self._consumers.append(consumer)
        return consumer

    async def check(self) -> None:
        """Verify the connection is open and the broker answers (passive exchange declare).

        Raises:
            TransportError: not connected, or the broker did not answer in time.
        """
        if self._closed or not self._ready.is_set():
            raise errors.TransportError(f"not connected to RabbitMQ {self._safe_url()}")
        channel = await self._channel_for_publish()
        try:
            await channel.exchange_declare(exchange=self.exchange, passive=True, timeout=self.timeout)
        except rabbit_wire.DRIVER_ERRORS as exc:
            raise rabbit_wire.transport_error(f"check of exchange {self.exchange!r}", exc) from exc

    async def backlog(self, subscription: ports.Subscription) -> ports.Backlog:
        """Ready messages in the subscription's queue (see :mod:`~conveyor.transports.rabbit_backlog`).

        Raises:
            TransportError: not connected, or the queue is not declared.
        """
        connection = await self.wait_connected()
        return await rabbit_backlog.queue_backlog(connection, self.queue_name(subscription), self.timeout)
