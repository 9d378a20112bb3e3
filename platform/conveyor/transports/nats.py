"""The NATS JetStream transport, on nats-py.

Wire names, for services that publish without Conveyor:

* topic ``orders.placed`` is the subject ``conveyor.orders.placed`` in the
  JetStream stream ``CONVEYOR`` (subjects ``conveyor.>``, file storage, created
  if missing); dead letters are the topic ``orders.placed.dlq``;
* a subscription is a durable pull consumer named by :func:`~conveyor.transports.nats_wire.durable_name`,
  filtered on its topic's subject, explicit ack, delivering the stream's
  history to a new durable;
* messages are CloudEvents in binary mode (``ce-`` headers plus
  ``content-type``) or structured mode; ``Nats-Msg-Id`` carries the message id
  (deduplicated by the stream) and ``conveyor-key`` the ordering key.

Consuming does not use nats-py's ``fetch``: a pull subscription dies with a
server restart and a lingering fetch holds back a partial batch until it
expires. Each consumer owns an inbox and keeps short pull requests (batches of
up to 100, expiring after a second) outstanding for exactly the free prefetch
credit, so unsettled deliveries never exceed ``Subscription.prefetch``; each
expiry answer (408) doubles as a heartbeat. A reconnect, or no answer for a few
seconds, drops the outstanding requests, re-checks the durable (recreating it
if it is gone) and pulls again. ``attempt`` is the broker's ``num_delivered``;
``nack(delay)`` is ``-NAK`` with a delay, so a waiting retry holds back nothing.

Deliveries given back at stop or close are naked with a delay of
:data:`~conveyor.transports.nats_consume.GIVE_BACK_DELAY`, not at once:
nats-server 2.9 resets a message's delivery count (and rewinds the consumer)
when it redelivers while only pull requests without interest are waiting,
which is exactly the state a stopped consumer leaves behind until its requests
expire (measured with 2.9.10). The pull loop and the deliveries live in
:mod:`conveyor.transports.nats_consume`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext, api

from conveyor import deadlines, errors, names, ports
from conveyor.envelope import NATS_PREFIX, WireMessage
from conveyor.transports import nats_backlog, nats_consume, nats_publish, nats_wire

log = logging.getLogger("conveyor.transports.nats")


class NatsTransport:
    """Transport over NATS JetStream.

    Args:
        url: ``nats://host:port[,host:port...]`` (``user:pass@`` allowed).
        stream: the JetStream stream holding every topic.
        subject_prefix: topics are subjects ``<prefix>.<topic>``.
        duplicate_window: seconds the stream remembers ``Nats-Msg-Id`` values.
        inactive_threshold: seconds after which the server deletes an unused
            durable; ``None`` (the default) keeps durables forever. Tests set it.
        connect_timeout: seconds :meth:`connect` tries before giving up.
        request_timeout: seconds to wait for a PubAck or an API answer.
    """

    features = ports.TransportFeatures(
        ordered_per_key=True, history_for_new_groups=True, attempts_survive_restart=True, durable=True
    )
    binary_prefix = NATS_PREFIX

    def __init__(
        self,
        url: str = "nats://127.0.0.1:4222",
        *,
        stream: str = "CONVEYOR",
        subject_prefix: str = "conveyor",
        duplicate_window: float = 120.0,
        inactive_threshold: float | None = None,
        connect_timeout: float = 10.0,
        request_timeout: float = 5.0,
    ) -> None:
        self.url = url
        self.stream = stream
        self.subject_prefix = subject_prefix
        self.request_timeout = request_timeout
        self._ack_deadlines = deadlines.Deadlines(request_timeout)
        self._servers = [f"nats://{host}" for host in url.partition("://")[2].strip("/").split(",") if host]
        self._duplicate_window = duplicate_window
        self._inactive_threshold = inactive_threshold
        self._connect_timeout = connect_timeout
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._acks: nats_publish.PubAcks | None = None
        self._consumers: list[nats_consume.NatsConsumer] = []
        self._declared: dict[str, ports.Subscription] = {}
        self._topics: set[str] = set()
        self._closing = False
        self._last_error: Exception | None = None

    @property
    def connected(self) -> bool:
        """True while the connection to a server is up."""
        return self._nc is not None and self._nc.is_connected

    def client(self) -> Client:
        """The nats-py client.

        Raises:
            TransportError: not connected, or closed.
        """
        if self._nc is None:
            raise errors.TransportError(f"NATS transport {self.url} is not connected; call connect() first")
        return self._nc

    def _pub_acks(self) -> nats_publish.PubAcks:
        if self._acks is None:
            raise errors.TransportError(f"NATS transport {self.url} is not connected; call connect() first")
        return self._acks

    def _jetstream(self) -> JetStreamContext:
        if self._js is None:
            raise errors.TransportError(f"NATS transport {self.url} is not connected; call connect() first")
        return self._js

    def subject(self, topic: str) -> str:
        """The subject of a topic.

        Raises:
            ConfigurationError: the topic is not a valid identifier.
        """
        if topic not in self._topics:
            names.check("topic", topic)
            self._topics.add(topic)
        return f"{self.subject_prefix}.{topic}"

    def pull_subject(self, subscription_name: str) -> str:
        """The JetStream API subject that pull requests for a subscription's durable go to.

        Raises:
            ConfigurationError: the subscription name is not a valid identifier.
        """
        return f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{nats_wire.durable_name(subscription_name)}"

    async def connect(self) -> None:
        """Connect (reconnecting forever afterwards) and make sure the stream exists.

        Raises:
            TransientTransportError: no server answered within ``connect_timeout``.
            TransportError: the stream exists without the ``<prefix>.>`` subjects.
        """
        if self._nc is not None:
            return
        self._closing = False
        self._last_error = None
        nc = nats_wire.WireClient()
        try:
            async with asyncio.timeout(self._connect_timeout):
                await nc.connect(
                    servers=self._servers, name="conveyor", connect_timeout=2, max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5, error_cb=self._on_error,  # type: ignore[arg-type]
                    disconnected_cb=self._on_disconnected, reconnected_cb=self._on_reconnected,
                )  # fmt: skip
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            self._closing = True
            await nc.close()
            reason = repr(self._last_error or exc)
            raise errors.TransientTransportError(f"cannot connect to NATS at {self.url}: {reason}") from exc
        self._nc = nc
        self._js = nc.jetstream(timeout=self.request_timeout)
        self._acks = nats_publish.PubAcks(nc)
        try:
            await self._ensure_stream()
        except errors.TransportError:
            await self.close()
            raise

    async def close(self) -> None:
        """Stop consumers, nak what they left unsettled, flush and disconnect; idempotent."""
        nc = self._nc
        if nc is None:
            return
        consumers, self._consumers = self._consumers, []
        for consumer in consumers:
            await consumer.stop()
        for consumer in consumers:  # naks need the connection: close it only then
            await consumer.give_back_unsettled()
        self._nc = self._js = self._acks = None
        self._closing = True
        with contextlib.suppress(nats.errors.Error, OSError, TimeoutError):
            await nc.flush(timeout=self.request_timeout)  # type: ignore[arg-type]
        await nc.close()

    async def declare(self, topics: Sequence[str], subscriptions: Sequence[ports.Subscription]) -> None:
        """Validate topics and create or reconcile each subscription's durable consumer.

        Raises:
            ConfigurationError: a topic or subscription name is invalid.
            TransportError: the server refused to create or update a durable.
        """
        for topic in topics:
            self.subject(topic)
        for subscription in subscriptions:
            await self.reconcile(subscription)

    async def publish(self, topic: str, message: WireMessage) -> None:
        """Publish and wait for the stream's PubAck.

        Raises:
            TransientTransportError: no PubAck in time, no stream, or no connection.
            TransportError: closed, or the server refused the message.
        """
        acks = self._pub_acks()
        subject = self.subject(topic)
        # Concurrent publishes pipeline on one reply subscription; one timer (not one
        # per publish) bounds the wait for every PubAck.
        deadline = self._ack_deadlines.start()
        token = None
        try:
            token, future = await acks.send(subject, message.body, nats_wire.outgoing_headers(message))
            await future
        except asyncio.CancelledError as exc:
            if self._ack_deadlines.finish(deadline):
                raise errors.TransientTransportError(
                    f"NATS publish to {topic!r} failed: no PubAck within {self.request_timeout}s"
                ) from exc
            raise
        except nats_consume.DRIVER_ERRORS as exc:
            raise nats_consume.transport_error(f"publish to {topic!r}", exc) from exc
        finally:
            self._ack_deadlines.finish(deadline)
            if token is not None:
                acks.forget(token)

    async def publish_many(self, messages: Sequence[tuple[str, WireMessage]]) -> list[Exception | None]:
        """Publish all on the one connection in call order, pipelined; wait for every PubAck.

        A PubAck that does not come within ``request_timeout`` is a
        :class:`~conveyor.errors.TransientTransportError` for its message.

        Raises:
            ConfigurationError: a topic is not a valid identifier (nothing was sent).
            TransportError: not connected (nothing was sent).
        """
        acks = self._pub_acks()
        subjects = [self.subject(topic) for topic, _ in messages]
        results: list[Exception | None] = [None] * len(messages)
        waiting: dict[asyncio.Future[None], int] = {}
        tokens: list[str] = []
        try:
            for index, ((topic, message), subject) in enumerate(zip(messages, subjects, strict=True)):
                try:
                    token, future = await acks.send(subject, message.body, nats_wire.outgoing_headers(message))
                except nats_consume.DRIVER_ERRORS as exc:
                    results[index] = nats_consume.transport_error(f"publish to {topic!r}", exc)
                else:
                    waiting[future] = index
                    tokens.append(token)
            if waiting:
                await asyncio.wait(waiting, timeout=self.request_timeout)
        finally:
            for token in tokens:  # a PubAck still missing is given up (its future cancelled)
                acks.forget(token)
        for future, index in waiting.items():
            topic = messages[index][0]
            if future.cancelled():
                results[index] = errors.TransientTransportError(
                    f"NATS publish to {topic!r} failed: no PubAck within {self.request_timeout}s"
                )
            elif (refusal := future.exception()) is not None:
                results[index] = nats_consume.transport_error(f"publish to {topic!r}", refusal)
        return results

    async def subscribe(
        self, subscription: ports.Subscription, callback: ports.DeliveryCallback
    ) -> nats_consume.NatsConsumer:
        """Start a pull loop on the subscription's durable (declared first if needed).

        Raises:
            TransportError: not connected, or the durable cannot be reconciled.
        """
        self.client()
        if self._declared.get(subscription.name) != subscription:
            await self.reconcile(subscription)
        consumer = nats_consume.NatsConsumer(self, subscription, callback)
        await consumer.start()
        self._consumers.append(consumer)
        return consumer

    async def check(self) -> None:
        """Round trip to JetStream: read the stream's info.

        Raises:
            TransportError: not connected, or the server did not answer.
        """
        js = self._jetstream()
        with nats_consume.translated("stream info"):
            await js.stream_info(self.stream)

    async def backlog(self, subscription: ports.Subscription) -> ports.Backlog:
        """The durable's undelivered and unacked messages (see :mod:`~conveyor.transports.nats_backlog`).

        Raises:
            TransportError: not connected, the durable does not exist, or the server did not answer.
        """
        durable, subject = nats_wire.durable_name(subscription.name), self.subject(subscription.topic)
        return await nats_backlog.consumer_backlog(self._jetstream(), self.stream, durable, subject)

    # -- topology ---------------------------------------------------------------

    async def _ensure_stream(self) -> None:
        js = self._jetstream()
        wildcard = f"{self.subject_prefix}.>"
        config = api.StreamConfig(
            name=self.stream, subjects=[wildcard], storage=api.StorageType.FILE,
            retention=api.RetentionPolicy.LIMITS, duplicate_window=self._duplicate_window,
        )  # fmt: skip
        with nats_consume.translated(f"stream {self.stream} setup"):
            try:
                info = await js.stream_info(self.stream)
            except nats.js.errors.NotFoundError:
                try:
                    await js.add_stream(config)
                    return
                except nats.js.errors.BadRequestError:  # created concurrently
                    info = await js.stream_info(self.stream)
        if wildcard not in (info.config.subjects or []):
            raise errors.TransportError(
                f"JetStream stream {self.stream} exists without the subjects {wildcard!r} "
                f"(it has {info.config.subjects}); fix the stream or configure another name"
            )

    def _consumer_config(self, subscription: ports.Subscription) -> api.ConsumerConfig:
        durable = nats_wire.durable_name(subscription.name)
        return api.ConsumerConfig(
            name=durable, durable_name=durable, description=f"conveyor subscription {subscription.name}",
            filter_subject=self.subject(subscription.topic), deliver_policy=api.DeliverPolicy.ALL,
            ack_policy=api.AckPolicy.EXPLICIT, ack_wait=subscription.ack_wait,
            max_deliver=-1 if subscription.max_deliveries is None else subscription.max_deliveries,
            inactive_threshold=self._inactive_threshold,
        )  # fmt: skip

    async def reconcile(self, subscription: ports.Subscription) -> None:
        """Create the durable, or bring an existing one to the subscription's config.

        A durable whose filter moved to another topic is updated in place when
        the server allows it (it keeps its stream position: older messages of
        the new topic are not delivered), else deleted and recreated (it starts
        over on its new topic, like any new subscription). One that is not an
        explicit-ack pull consumer is recreated; changed ``ack_wait``,
        ``max_deliver`` or ``inactive_threshold`` are updated in place.

        Raises:
            TransportError: the server refused.
        """
        js = self._jetstream()
        wanted = self._consumer_config(subscription)
        assert wanted.durable_name is not None
        with nats_consume.translated(f"durable {wanted.durable_name} setup"):
            try:
                current = (await js.consumer_info(self.stream, wanted.durable_name)).config
            except nats.js.errors.NotFoundError:
                await js.add_consumer(self.stream, wanted)
            else:
                await self._bring_up_to_date(current, wanted)
        self._declared[subscription.name] = subscription

    async def _bring_up_to_date(self, current: api.ConsumerConfig, wanted: api.ConsumerConfig) -> None:
        js = self._jetstream()
        assert wanted.durable_name is not None
        incompatible = current.ack_policy != api.AckPolicy.EXPLICIT or current.deliver_subject
        fields = ("filter_subject", "ack_wait", "max_deliver", "inactive_threshold")
        if not incompatible and all(getattr(current, f) == getattr(wanted, f) for f in fields):
            return
        log.warning("reconciling JetStream durable %s to %s", wanted.durable_name, wanted.filter_subject)
        if not incompatible:
            try:
                updated = await js.add_consumer(self.stream, wanted)  # create-or-update
                if updated.config.filter_subject == wanted.filter_subject:
                    return
            except nats.js.errors.BadRequestError:
                if current.filter_subject == wanted.filter_subject:
                    raise  # keep the position rather than replay the topic
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_consumer(self.stream, wanted.durable_name)
        await js.add_consumer(self.stream, wanted)

    # -- connection events ------------------------------------------------------

    async def _on_error(self, exc: Exception) -> None:
        self._last_error = exc
        log.debug("NATS connection error: %r", exc)

    async def _on_disconnected(self) -> None:
        if self._closing:
            return
        log.warning("disconnected from NATS at %s; reconnecting", self.url)
        for consumer in self._consumers:
            consumer.connection_changed(connected=False)

    async def _on_reconnected(self) -> None:
        log.warning("reconnected to NATS at %s", self.url)
        for consumer in self._consumers:
            consumer.connection_changed(connected=True)
