"""The Kafka transport, on aiokafka: ``kafka://host:port[,host:port][?option=value&...]``.

Wire mapping (other services can publish without Conveyor):

* Kafka topic = the Conveyor topic. :meth:`KafkaTransport.declare` creates
  missing topics with ``partitions`` partitions (default 8: at least the most
  replicas of any group, or one replica gets everything) and warns about an
  existing topic with fewer. Publishing to a topic this process has not seen
  creates it the same way first.
* Records use the CloudEvents Kafka binding: binary mode (``ce_`` headers,
  ``content-type``, key = ``partitionkey``) as the runtime encodes it, and
  structured mode is understood on input. ``WireMessage.message_id`` travels in
  the ``conveyor-message-id`` header.
* Each subscription is a consumer group named after it
  (``auto_offset_reset="earliest"``, auto-commit off). A new group reads the
  topic from the start (``features.history_for_new_groups``), so a subscription
  declared but not consuming yet loses nothing; a group with committed offsets
  resumes after them.

Guarantees and how they are kept:

* **Publish**: ``acks="all"``; :meth:`publish` returns once the in-sync
  replicas have the record; an idempotent producer by default, so a send
  retried after a lost acknowledgement writes no duplicate. ``?idempotence=0``
  turns it off for brokers without ``InitProducerId`` (Tansu, the broker of
  our tests); a retried send may then write a duplicate, which the inbox
  absorbs. Sends are pipelined (:mod:`~conveyor.transports.kafka_produce`):
  concurrent publishes and :meth:`publish_many` share batches of up to
  ``max_batch_size`` bytes per partition, and records are enqueued in call
  order, so the order of one topic and key holds.
* **Ack = commit, in the background**, never auto-commit. An ack returns as
  soon as its offset is recorded; a record's offset is committed only once it
  and every earlier record of its partition are settled (deliveries of one
  partition settle out of order because the runtime runs keys concurrently),
  by a background task that commits in rounds (one request in flight; what is
  settled meanwhile rides on the next). A crash before that commit redelivers
  the records settled since the last one (at-least-once; the inbox absorbs the
  duplicates); a revocation or :meth:`close` commits what is settled before the
  partitions are let go. A commit lost to a rebalance is logged: the new owner
  redelivers. A failed commit is logged and retried after a backoff (0.1 s
  doubling to 5 s) with the offsets settled meanwhile. Unsettled records at
  :meth:`close` are not committed and go to the group's next member
  (``close`` leaves the group at once). Kafka has no broker-side
  redelivery limit: ``Subscription.max_deliveries`` and ``ack_wait`` are not
  used; the attempt header, the attempt marks (next item) and the runtime's
  retry policy bound retries.
* **Attempts cut short by a crash** are counted
  (:mod:`conveyor.transports.kafka_attempts`), so a record that kills its
  worker every time ends as a ``TooManyDeliveries`` dead letter instead of
  blocking its partition. Before handing out records beyond its mark, a member
  raises the mark to four prefetches (at most 128 records) past the highest of them, in the
  committed offsets of the shadow group ``_conveyor.attempts.<subscription name>`` (never joined; the
  "offset" packs a mark: offset ``s`` up to which records may be out, and one record ``r``
  with its count ``t`` of attempts that started and never settled; see
  :mod:`conveyor.transports.kafka_marks`; with ACLs, grant the principal
  ``READ`` on that group too). A new owner finding ``s`` at or past
  the group's committed offset recovers the records up to ``s`` one at a time
  (one recovered record out in the member; its other partitions go on),
  counting each attempt durably before it starts; the delivery's attempt is
  at least that count. Marks are fenced by their writer: one write at a time,
  a revocation's mark after the write in flight, none once the member's group
  generation changed. A record that crashes the worker
  runs at most ``max_attempts + 1`` times (the first crash, with a whole batch
  out, is blamed on no record); the others of its batch run again with their
  attempt unchanged. A graceful handover (revocation, close) resets the mark:
  only deliveries whose handler had started and that are abandoned unsettled
  count as an attempt, as on brokers with a delivery count. Costs: one small
  commit per four prefetches (at most 128 records) of a partition, and after a
  crash a serial pass over the records between the committed offset and the
  mark (the records out plus at most 128, fewer at the end of the log; more
  when a slow record held the commit back).
* **Records the client cannot decode** (a header name that is not UTF-8:
  aiokafka fails the whole fetch) are found by a raw fetch and dead-lettered to
  ``<topic>.dlq`` with key, value and header values byte for byte, such names
  decoded as Latin-1 and ``conveyor-dlq-error-type: UndecodableRecord``; the
  offset is committed past them (see :mod:`~conveyor.transports.kafka_salvage`).
* **Rebalances**: before rejoining, a member stops handing out records of its
  revoked partitions (held ones are dropped), waits up to ``revoke_grace_ms``
  for the deliveries out to settle, commits, and drops the rest: their ack or
  nack raises ``TransportError``, commits and publishes nothing, and the new
  owner redelivers them. Attempts still running after the grace are
  cancelled, and the member rejoins only once they ended (up to the grace
  again), so they do not overlap the new owner (a sync handler's thread cannot
  be interrupted and may).
  Deliveries still queued in the runtime (a key's lane, the dispatcher's
  buffer) never start: ``KafkaDelivery.claim()``, called by the runtime right
  before the handler, returns False once the partition is being revoked.
* **Prefetch**: at most ``Subscription.prefetch`` deliveries are out unsettled
  (``getmany(max_records=room)``). When the limit holds for a while (slow
  handlers), every partition is paused and the loop keeps polling, so
  ``max_poll_interval_ms`` never expires and slow handlers cause no rebalances.
* **nack(delay)**: a copy (same key, body and headers; ``conveyor-attempt`` =
  attempt + 1, ``conveyor-not-before`` = epoch ms) goes to the subscription's
  retry topic ``_conveyor.retry.<subscription name>`` (Conveyor topics cannot
  start with ``_``, so it never collides), and the original is committed once
  the broker acked the copy. Only that group reads its retry topic; the
  consumer holds a copy in memory (bounded; past the bound the retry partitions
  are paused) until its time, so a long delay blocks neither other keys nor
  other retries. ``Delivery.attempt`` is the ``conveyor-attempt`` header (or
  more, after a crash), so attempts survive restarts, and the delay survives a worker crash. A retried
  message loses its place in its key's order; records are otherwise delivered
  in partition order (``ordered_per_key``). The not-before time is wall-clock:
  skewed hosts shorten or lengthen delays. A held copy also holds back the
  commits of later copies of its retry partition, so a crash redelivers those
  (duplicates, never losses). If the copy cannot be published, the record is
  redelivered from memory after the delay instead.
* **Reconnects**: aiokafka reconnects by itself; the fetch loop logs errors,
  backs off and continues, and positions reset to the earliest offset when the
  broker lost them (a memory-only broker restarted). ``Consumer.active`` is
  true while the member has partitions assigned and its fetch loop is healthy
  (a member of a group with more members than partitions stays inactive).

Tansu (the Kafka-protocol broker of our tests) numbers a group's first
generation 0, and aiokafka only sends LeaveGroup for generation > 0, so the
consumer sends LeaveGroup itself in that case; otherwise the next member waits
a session timeout. Tansu also holds a JoinGroup about half the session timeout,
which is why tests use short session timeouts.

URL options (query parameters; integers):

``partitions`` (8) partitions of topics created here; ``replication_factor`` (1)
their replication factor (set it to your cluster's, e.g. 3);
``session_timeout_ms`` (10000), ``heartbeat_interval_ms`` (3000),
``max_poll_interval_ms`` (300000), ``rebalance_timeout_ms`` (= session timeout)
and ``fetch_max_wait_ms`` (100) for the consumers; ``request_timeout_ms``
(30000) for requests, sends and commits; ``idempotence`` (1; 0 turns the
idempotent producer off); ``revoke_grace_ms`` (a quarter of the rebalance
timeout); ``linger_ms`` (5) and ``max_batch_size`` (262144 bytes) for the
producer's batches. Tests on Tansu use ``?idempotence=0&partitions=4&session_timeout_ms=2000&
heartbeat_interval_ms=400``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka import errors as kafka_errors
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.protocol.group import LeaveGroupRequest

from conveyor import errors, names, ports
from conveyor.envelope import KAFKA_PREFIX, WireMessage
from conveyor.transports import kafka_backlog, kafka_consume, kafka_marks, kafka_options, kafka_produce

log = logging.getLogger("conveyor.transports.kafka")

RETRY_PREFIX = "_conveyor.retry."
_TOPIC_EXISTS = kafka_errors.TopicAlreadyExistsError.errno
_ADMIN_ATTEMPTS = 2


KafkaOptions = kafka_options.KafkaOptions
parse_url = kafka_options.parse_url


def retry_topic(subscription: str) -> str:
    """The retry topic of a subscription (read only by its group)."""
    return RETRY_PREFIX + subscription


_translate = kafka_produce.translate


class KafkaTransport:
    """Transport over Kafka (or a Kafka-protocol broker such as Tansu or Redpanda).

    Args:
        url: ``kafka://host:port[,host:port]``, with options as query parameters.
        options: tuning; when given, the URL's query parameters are ignored.

    Raises:
        ConfigurationError: the URL or an option is invalid.
    """

    features = ports.TransportFeatures(
        ordered_per_key=True,
        history_for_new_groups=True,
        attempts_survive_restart=True,  # retry copies' header; a crash's attempts in the marks
        durable=True,
        acks_settle_a_prefix=True,  # offsets are committed in order per partition
    )
    binary_prefix = KAFKA_PREFIX

    def __init__(self, url: str, options: KafkaOptions | None = None) -> None:
        self.url = url
        self.servers, parsed = parse_url(url)
        self.options = options or parsed
        self._producer: kafka_produce.Producer | None = None
        self._admin: AIOKafkaAdminClient | None = None
        self._consumers: list[kafka_consume.KafkaConsumer] = []
        self._topics: set[str] = set()
        self._topic_lock = asyncio.Lock()
        self._lag = kafka_backlog.LagReader(self.servers, self.options.request_timeout_ms)

    @property
    def _timeout(self) -> float:
        return self.options.request_timeout_ms / 1000

    async def connect(self) -> None:
        """Start the producer and the admin client.

        Raises:
            TransientTransportError: the broker is unreachable.
        """
        bootstrap = ",".join(self.servers)
        producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            client_id="conveyor",
            acks="all",
            enable_idempotence=bool(self.options.idempotence),
            request_timeout_ms=self.options.request_timeout_ms,
            linger_ms=self.options.linger_ms,
            max_batch_size=self.options.max_batch_size,
        )
        admin = AIOKafkaAdminClient(
            bootstrap_servers=bootstrap, client_id="conveyor-admin", request_timeout_ms=self.options.request_timeout_ms
        )
        try:
            await producer.start()
            await admin.start()
        except (kafka_errors.KafkaError, OSError) as exc:
            await producer.stop()
            await admin.close()
            raise errors.TransientTransportError(f"cannot connect to Kafka at {bootstrap}: {exc!r}") from exc
        self._producer, self._admin = kafka_produce.Producer(producer), admin

    async def close(self) -> None:
        """Stop every consumer (unsettled records go to other members), then the producer; idempotent."""
        consumers, self._consumers = self._consumers, []
        for consumer in consumers:
            await consumer.close()
        producer, self._producer = self._producer, None
        admin, self._admin = self._admin, None
        if producer is not None:
            await producer.producer.stop()
        if admin is not None:
            await admin.close()
        await self._lag.close()

    async def declare(self, topics: Sequence[str], subscriptions: Sequence[ports.Subscription]) -> None:
        """Create missing topics (and each subscription's retry topic).

        Consumer groups need no declaring: a new group starts at the earliest
        offset, so it receives everything published from now on (and before).

        Raises:
            ConfigurationError: an invalid topic or subscription name.
            TransportError: topics cannot be created or described.
        """
        wanted = [names.check("topic", t) for t in topics]
        for subscription in subscriptions:
            wanted.append(names.check("topic", subscription.topic))
            wanted.append(retry_topic(names.check("subscription name", subscription.name)))
        await self._ensure_topics(wanted, recheck=True)

    async def publish(self, topic: str, message: WireMessage) -> None:
        """Send a record and return once the in-sync replicas have it (``acks="all"``).

        Concurrent publishes are pipelined: they share the producer's batches
        (see :mod:`~conveyor.transports.kafka_produce`).

        Raises:
            TransportError: the transport is closed or the broker refused the record.
            TransientTransportError: the broker is unreachable or did not answer in time.
        """
        if topic not in self._topics:
            await self._ensure_topics([names.check("topic", topic)])
        await self._send(topic, message, {})

    async def publish_many(self, messages: Sequence[tuple[str, WireMessage]]) -> list[Exception | None]:
        """Send every record, pipelined, then wait for the broker's acknowledgements.

        Records are enqueued in the order given, so those of one topic and key
        (one partition) reach the broker in that order. One record's refusal
        does not stop the others.

        Returns:
            Per message, in order: None once the in-sync replicas have it, else
            the error that refused it (``TransportError``; ``ConfigurationError``
            for an invalid topic name; the topic's creation error).

        Raises:
            TransportError: the transport is not connected (nothing was sent).
        """
        producer = self._producer
        if producer is None:
            raise errors.TransportError(f"Kafka transport {self.url} is not connected (closed or never connected)")
        refused: dict[str, Exception] = {}
        missing = []
        for topic in dict.fromkeys(t for t, _ in messages if t not in self._topics):
            try:
                missing.append(names.check("topic", topic))
            except errors.ConfigurationError as exc:
                refused[topic] = exc
        if missing:
            try:
                await self._ensure_topics(missing)
            except errors.TransportError as exc:
                refused.update(dict.fromkeys(missing, exc))
        return await producer.send_many([refused.get(topic) or (topic, message) for topic, message in messages])

    async def _send(self, topic: str, message: WireMessage, extra: dict[str, str]) -> None:
        producer = self._producer
        if producer is None:
            raise errors.TransportError(f"Kafka transport {self.url} is not connected (closed or never connected)")
        await producer.send(topic, message, extra)

    async def _send_record(
        self, topic: str, value: bytes | None, key: bytes | None, headers: Sequence[tuple[str, bytes | None]]
    ) -> None:
        producer = self._producer
        if producer is None:
            raise errors.TransportError(f"Kafka transport {self.url} is not connected (closed or never connected)")
        if topic not in self._topics:
            await self._ensure_topics([topic])
        await producer.send_record(topic, value, key, headers)

    async def subscribe(self, subscription: ports.Subscription, callback: ports.DeliveryCallback) -> ports.Consumer:
        """Declare the subscription and join its consumer group.

        The partition assignment arrives in the background; ``active`` turns
        true once partitions are assigned.

        Raises:
            TransportError: not connected, or the topics cannot be created.
            TransientTransportError: the broker is unreachable.
        """
        if self._producer is None:
            raise errors.TransportError(f"Kafka transport {self.url} is not connected; call connect() first")
        await self.declare([], [subscription])
        options = self.options
        kafka = AIOKafkaConsumer(
            bootstrap_servers=",".join(self.servers),
            client_id=f"conveyor-{subscription.name}",
            group_id=subscription.name,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=options.session_timeout_ms,
            heartbeat_interval_ms=options.heartbeat_interval_ms,
            max_poll_interval_ms=options.max_poll_interval_ms,
            rebalance_timeout_ms=options.rebalance_timeout_ms or None,
            fetch_max_wait_ms=options.fetch_max_wait_ms,
            request_timeout_ms=options.request_timeout_ms,
        )
        shadow = AIOKafkaConsumer(
            bootstrap_servers=",".join(self.servers),
            client_id=f"conveyor-{subscription.name}-attempts",
            group_id=kafka_marks.shadow_group(subscription.name),
            enable_auto_commit=False,
            request_timeout_ms=options.request_timeout_ms,
        )
        consumer = kafka_consume.KafkaConsumer(
            kafka, subscription, retry_topic(subscription.name), callback, self._send, self._timeout, self._leave,
            revoke_grace=options.revoke_grace, marks=kafka_marks.MarkStore(kafka, shadow, self._timeout),
            send_record=self._send_record,
        )  # fmt: skip
        await consumer.start()
        self._consumers.append(consumer)
        return consumer

    async def backlog(self, subscription: ports.Subscription) -> ports.Backlog:
        """The consumer group's lag on the topic (see :mod:`~conveyor.transports.kafka_backlog`); joins no group.

        Raises:
            TransportError: not connected, no such topic, or the broker failed.
        """
        if self._admin is None:
            raise errors.TransportError(f"Kafka transport {self.url} is not connected")
        return await self._lag.lag(self._admin, subscription)

    async def _leave(self, node: int, group: str, member: str) -> None:
        if self._producer is not None:
            await self._producer.producer.client.send(node, LeaveGroupRequest(group, member))

    async def check(self) -> None:
        """Fetch the cluster's topic list (a metadata round trip).

        Raises:
            TransportError: not connected, or the broker did not answer.
        """
        if self._admin is None:
            raise errors.TransportError(f"Kafka transport {self.url} is not connected")
        try:
            await asyncio.wait_for(self._admin.list_topics(), min(self._timeout, 5.0))
        except (kafka_errors.KafkaError, OSError, TimeoutError) as exc:
            raise _translate(exc, f"Kafka at {','.join(self.servers)} is not reachable") from exc

    async def _ensure_topics(self, topics: Sequence[str], *, recheck: bool = False) -> None:
        # recheck: ask the broker even about topics this process created before
        # (declare reconciles; a broker that lost its data gets them back).
        async with self._topic_lock:
            missing = list(dict.fromkeys(t for t in topics if recheck or t not in self._topics))
            if not missing:
                return
            admin = self._admin
            if admin is None:
                raise errors.TransportError(f"Kafka transport {self.url} is not connected")
            for attempt in range(_ADMIN_ATTEMPTS):
                try:
                    await self._create_topics(admin, missing)
                    break
                except (kafka_errors.KafkaError, OSError) as exc:
                    # The admin client does not retry; a dropped connection (broker
                    # restart) is replaced on the next request, so try once more.
                    if attempt + 1 == _ADMIN_ATTEMPTS or not getattr(exc, "retriable", isinstance(exc, OSError)):
                        raise _translate(exc, f"cannot create Kafka topics {missing}") from exc
                    await asyncio.sleep(0.2)
            self._topics.update(missing)

    async def _create_topics(self, admin: AIOKafkaAdminClient, topics: list[str]) -> None:
        options = self.options
        response = await admin.create_topics(
            [NewTopic(t, options.partitions, options.replication_factor) for t in topics]
        )
        existing = []
        for topic, code, text in response.topic_errors:
            if code == _TOPIC_EXISTS:
                existing.append(topic)
            elif code:
                raise errors.TransportError(f"cannot create Kafka topic {topic!r}: error {code} {text}")
        if existing:
            self._check_partitions(await admin.describe_topics(existing))

    def _check_partitions(self, described: list[dict[str, object]]) -> None:
        for topic in described:
            count = len(topic.get("partitions") or ())  # type: ignore[arg-type]
            if count < self.options.partitions:
                log.warning(
                    "Kafka topic %s has %d partition(s), fewer than the configured %d: at most %d "
                    "replicas of a group share its work",
                    topic.get("topic"), count, self.options.partitions, count,
                )  # fmt: skip
