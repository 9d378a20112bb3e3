"""The NATS JetStream transport, on nats-py.

Wire names, for services that publish without Conveyor:

* topic ``orders.placed`` is the subject ``conveyor.orders.placed`` in the
  JetStream stream ``CONVEYOR`` (subjects ``conveyor.>``, file storage, created
  if missing); dead letters are the topic ``orders.placed.dlq``;
* a subscription is a durable pull consumer named by :func:`durable_name`,
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
:data:`GIVE_BACK_DELAY`, not at once: nats-server 2.9 resets a message's
delivery count (and rewinds the consumer) when it redelivers while only pull
requests without interest are waiting, which is exactly the state a stopped
consumer leaves behind until its requests expire (measured with 2.9.10).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import deque
from collections.abc import Iterator, Sequence

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription
from nats.js import JetStreamContext, api

from conveyor import errors, names, ports
from conveyor.envelope import NATS_PREFIX, WireMessage

log = logging.getLogger("conveyor.transports.nats")

KEY_HEADER = "conveyor-key"
MSG_ID_HEADER = "Nats-Msg-Id"
MAX_BATCH = 100
PULL_EXPIRES = 1.0
GIVE_BACK_DELAY = PULL_EXPIRES + 0.5
_SILENCE = PULL_EXPIRES + 2.0
_NS = 1_000_000_000
_TRANSIENT = (
    nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError, nats.errors.NoServersError, nats.errors.StaleConnectionError,
    nats.js.errors.NoStreamResponseError, nats.js.errors.ServiceUnavailableError, OSError, TimeoutError,
)  # fmt: skip


@contextlib.contextmanager
def _translated(action: str) -> Iterator[None]:
    """Turn nats-py exceptions into Conveyor's error tree."""
    try:
        yield
    except _TRANSIENT as exc:
        raise errors.TransientTransportError(f"NATS {action} failed: {exc!r}") from exc
    except nats.errors.Error as exc:
        raise errors.TransportError(f"NATS {action} failed: {exc!r}") from exc


def durable_name(subscription_name: str) -> str:
    """The JetStream durable consumer name of a subscription; deterministic and injective.

    Dots become ``_`` (``billing.charge-order`` -> ``billing_charge-order``). A
    name that already contains ``_`` also gets ``__`` and a digest of the name,
    a suffix no dots-only name can produce, so distinct names never collide.

    Raises:
        ConfigurationError: the name is not a valid identifier.
    """
    names.check("subscription name", subscription_name)
    readable = subscription_name.replace(".", "_")
    if "_" not in subscription_name:
        return readable
    return f"{readable}__{hashlib.sha256(subscription_name.encode()).hexdigest()[:10]}"


def _num_delivered(reply: str) -> int:
    # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<time>.<pending>, or with
    # <domain>.<account hash> after $JS.ACK (12 tokens); parsed here, as nats-py's
    # Msg.metadata costs ~6 us a message.
    tokens = reply.split(".")
    return int(tokens[4] if len(tokens) == 9 else tokens[6])


class NatsDelivery:
    """One JetStream delivery; settling it sends ``+ACK`` or ``-NAK``."""

    __slots__ = ("_consumer", "_msg", "_settled", "attempt", "message", "topic")

    def __init__(self, consumer: NatsConsumer, msg: Msg) -> None:
        headers = msg.headers or {}
        key = headers.pop(KEY_HEADER, None)
        message_id = headers.pop(MSG_ID_HEADER, None)
        self._consumer = consumer
        self._msg = msg
        self._settled = False
        self.topic = consumer.topic
        self.message = WireMessage(msg.data, headers, key, message_id)
        self.attempt = _num_delivered(msg.reply)

    @property
    def settled(self) -> bool:
        """True once acked or nacked."""
        return self._settled

    async def ack(self) -> None:
        """Settle as done.

        Raises:
            TransportError: already settled, or the ack could not be sent.
        """
        self._settle()
        with _translated("ack"):
            await self._msg.ack()

    async def nack(self, delay: float) -> None:
        """Have the server redeliver after ``delay`` seconds (``num_delivered`` + 1).

        Raises:
            TransportError: already settled, or the nak could not be sent.
        """
        self._settle()
        with _translated("nak"):
            await self._msg.nak(delay=max(delay, 0.0))

    async def give_back(self) -> None:
        """Nak if still unsettled (stop/close), redelivering once our pull requests expired."""
        if not self._settled:
            with contextlib.suppress(errors.TransportError):
                await self.nack(GIVE_BACK_DELAY)

    def _settle(self) -> None:
        if self._settled:
            raise errors.TransportError("delivery already acked or nacked")
        self._settled = True
        self._consumer.settled(self)


class NatsConsumer:
    """A pull loop on one durable consumer, bounded by the subscription's prefetch."""

    def __init__(
        self, transport: NatsTransport, subscription: ports.Subscription, callback: ports.DeliveryCallback
    ) -> None:
        self.topic = subscription.topic
        self._transport = transport
        self._subscription = subscription
        self._callback = callback
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{transport.stream}.{durable_name(subscription.name)}"
        self._prefetch = max(subscription.prefetch, 1)
        self._threshold = max(1, min(self._prefetch, MAX_BATCH) // 4)
        self._queue: deque[Msg] = deque()
        self._handed: set[NatsDelivery] = set()
        self._current: NatsDelivery | None = None
        self._requests: deque[list[float]] = deque()  # [expires at, messages still due], oldest first
        self._requested = 0
        self._last_heard = time.monotonic()
        self._healthy = False
        self._needs_check = False
        self._pause_until = 0.0
        self._wakeup = asyncio.Event()
        self._inbox = ""
        self._inbox_sub: NatsSubscription | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def active(self) -> bool:
        """True while the pull loop runs and the server answers it."""
        running = self._task is not None and not self._task.done()
        return running and self._healthy and self._transport.connected

    async def start(self) -> None:
        """Open the inbox and start the pull loop.

        Raises:
            TransportError: the inbox subscription failed.
        """
        nc = self._transport.client()
        self._inbox = nc.new_inbox()
        with _translated("subscribe"):
            self._inbox_sub = await nc.subscribe(self._inbox, cb=self._on_message)
        self._task = asyncio.create_task(self._run(), name=f"nats-consumer:{self._subscription.name}")

    async def stop(self) -> None:
        """Stop pulling; give back what arrived but was not handed out."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._healthy = False
        if self._inbox_sub is not None:
            sub, self._inbox_sub = self._inbox_sub, None
            # drain() lets messages already on the wire reach the queue below;
            # with no interest left, the server drops our pending pull requests.
            with contextlib.suppress(nats.errors.Error, OSError, TimeoutError):
                await sub.drain()  # type: ignore[no-untyped-call]
        self._clear_requests()
        current, self._current = self._current, None
        if current is not None:  # cancelled inside the callback: not accepted
            await current.give_back()
        while self._queue:
            await NatsDelivery(self, self._queue.popleft()).give_back()

    async def give_back_unsettled(self) -> None:
        """Nak every handed-out delivery not yet settled (the transport is closing)."""
        for delivery in list(self._handed):
            await delivery.give_back()

    def settled(self, delivery: NatsDelivery) -> None:
        """Free the delivery's prefetch credit."""
        self._handed.discard(delivery)
        self._wakeup.set()

    def connection_changed(self, connected: bool) -> None:
        """Called by the transport on disconnect and reconnect."""
        self._healthy = False
        self._clear_requests()  # the server forgot them with the old connection
        self._needs_check = connected
        self._wakeup.set()

    # -- inbox ------------------------------------------------------------------

    async def _on_message(self, msg: Msg) -> None:
        self._last_heard = time.monotonic()
        if msg.reply:
            self._healthy = True
            requests = self._requests
            if requests:
                self._requested -= 1
                requests[0][1] -= 1
                if requests[0][1] <= 0:
                    requests.popleft()
            self._queue.append(msg)
        else:
            self._on_status(msg)
        self._wakeup.set()

    def _on_status(self, msg: Msg) -> None:
        headers = msg.headers or {}
        status = headers.get("Status")
        if status in ("404", "408"):  # the oldest request expired
            self._healthy = True
            if self._requests:
                self._requested -= int(self._requests.popleft()[1])
            return
        description = str(headers.get("Description", ""))
        log.debug("pull request for %s failed: %s %s", self._subscription.name, status, description)
        self._clear_requests()
        self._pause_until = time.monotonic() + PULL_EXPIRES  # no hot loop of refused requests
        if status != "409" or "deleted" in description.lower():
            self._needs_check = True

    # -- pull loop ----------------------------------------------------------------

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            try:
                await self._step()
                backoff = 0.1
            except errors.TransportError as exc:
                self._healthy = False
                log.warning("consumer %s cannot pull (%s); retrying", self._subscription.name, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _step(self) -> None:
        self._wakeup.clear()
        if self._needs_check:
            await self._transport.reconcile(self._subscription)
            self._needs_check = False
        if self._queue:
            await self._hand_out(self._queue.popleft())
        await self._pull()
        if self._queue:
            return
        try:
            async with asyncio.timeout(PULL_EXPIRES):
                await self._wakeup.wait()
        except TimeoutError:
            self._check_silence()

    async def _hand_out(self, msg: Msg) -> None:
        delivery = NatsDelivery(self, msg)
        self._handed.add(delivery)
        self._current = delivery
        await self._callback(delivery)
        self._current = None

    async def _pull(self) -> None:
        """Request as many messages as there is free prefetch credit for."""
        nc = self._transport.client()
        if not nc.is_connected:
            return
        now = time.monotonic()
        if now < self._pause_until:
            return
        self._drop_expired(now)
        free = self._prefetch - len(self._queue) - len(self._handed) - self._requested
        if free < self._threshold:
            return
        batch = min(free, MAX_BATCH)
        request = b'{"batch":%d,"expires":%d}' % (batch, int(PULL_EXPIRES * _NS))
        with _translated("pull request"):
            await nc.publish(self._next_subject, request, reply=self._inbox)
            self._requests.append([now + PULL_EXPIRES, batch])
            self._requested += batch
            if not self._healthy:
                await nc.flush(timeout=self._transport.request_timeout)  # type: ignore[arg-type]
                self._last_heard = time.monotonic()
                self._healthy = True

    def _drop_expired(self, now: float) -> None:
        # A request's 408 may be lost with a connection; count it gone a little after it expired.
        while self._requests and self._requests[0][0] + 0.5 < now:
            self._requested -= int(self._requests.popleft()[1])

    def _check_silence(self) -> None:
        if self._requests and time.monotonic() - self._last_heard > _SILENCE:
            # Requests went unanswered well past their expiry: the server lost
            # them (restart) or the durable is gone.
            self._healthy = False
            self._clear_requests()
            self._needs_check = True

    def _clear_requests(self) -> None:
        self._requests.clear()
        self._requested = 0


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
        self._servers = [f"nats://{host}" for host in url.partition("://")[2].strip("/").split(",") if host]
        self._duplicate_window = duplicate_window
        self._inactive_threshold = inactive_threshold
        self._connect_timeout = connect_timeout
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._consumers: list[NatsConsumer] = []
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
        nc = Client()
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
        self._nc = self._js = None
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
        js = self._jetstream()
        headers = dict(message.headers)
        if message.message_id is not None:
            headers[MSG_ID_HEADER] = message.message_id
        if message.key is not None:
            headers[KEY_HEADER] = message.key
        with _translated(f"publish to {topic!r}"):
            await js.publish(self.subject(topic), message.body, headers=headers or None)

    async def subscribe(self, subscription: ports.Subscription, callback: ports.DeliveryCallback) -> NatsConsumer:
        """Start a pull loop on the subscription's durable (declared first if needed).

        Raises:
            TransportError: not connected, or the durable cannot be reconciled.
        """
        self.client()
        if self._declared.get(subscription.name) != subscription:
            await self.reconcile(subscription)
        consumer = NatsConsumer(self, subscription, callback)
        await consumer.start()
        self._consumers.append(consumer)
        return consumer

    async def check(self) -> None:
        """Round trip to JetStream: read the stream's info.

        Raises:
            TransportError: not connected, or the server did not answer.
        """
        js = self._jetstream()
        with _translated("stream info"):
            await js.stream_info(self.stream)

    # -- topology ---------------------------------------------------------------

    async def _ensure_stream(self) -> None:
        js = self._jetstream()
        wildcard = f"{self.subject_prefix}.>"
        config = api.StreamConfig(
            name=self.stream, subjects=[wildcard], storage=api.StorageType.FILE,
            retention=api.RetentionPolicy.LIMITS, duplicate_window=self._duplicate_window,
        )  # fmt: skip
        with _translated(f"stream {self.stream} setup"):
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
        durable = durable_name(subscription.name)
        return api.ConsumerConfig(
            name=durable, durable_name=durable, description=f"conveyor subscription {subscription.name}",
            filter_subject=self.subject(subscription.topic), deliver_policy=api.DeliverPolicy.ALL,
            ack_policy=api.AckPolicy.EXPLICIT, ack_wait=subscription.ack_wait,
            max_deliver=subscription.max_deliveries, inactive_threshold=self._inactive_threshold,
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
        with _translated(f"durable {wanted.durable_name} setup"):
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
