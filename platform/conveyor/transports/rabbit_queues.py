"""Subscription queues on RabbitMQ: names, arguments, binding records, and keepers.

A subscription with a delivery limit is the durable quorum queue
``<exchange>-limited.<name>`` with ``x-delivery-limit`` = ``max_deliveries``, a
backstop against redelivery loops. A message over the limit is dead-lettered,
never dropped: the queue's ``x-dead-letter-exchange`` is the durable fanout
exchange ``<exchange>-over-limit.<name>``, bound to the keeper of the topic's
dead-letter topic (the classic queue ``<exchange>-kept.<topic>.dlq``, declared
here too), with ``x-dead-letter-strategy: at-least-once`` (so a message stays
in its queue until the keeper confirmed it; this needs ``x-overflow:
reject-publish``, which only matters for a queue with a length limit, and
Conveyor sets none). The arguments name no topic, so a subscription can move to
another topic: the over-limit exchange is bound to the new keeper and unbound
from the old ones, as the queue's own binding is. Such a dead letter carries no
``conveyor-dlq-*`` reason (the broker, not Conveyor, dead-lettered it);
``conveyor dlq replay`` sends it back to its topic all the same.

A subscription without one (``max_deliveries=None``: the keepers of dead
letters, see :meth:`conveyor.runtime.worker.Worker.dead_letter_subscriptions`)
must never lose a message to redeliveries: ``conveyor dlq list`` reads dead
letters by taking them without settling, and every listing is a redelivery.
Quorum queues count those: RabbitMQ 4.x gives every quorum queue a delivery
limit of 20 by default, and 3.x may refuse ``x-delivery-limit`` = -1. So a
keeper is the durable *classic* queue ``<exchange>-kept.<name>`` (explicit
``x-queue-type: classic``, so a vhost whose default queue type is quorum does
not change it). The price: a classic queue lives on one node of a cluster,
where a quorum queue is replicated.

Bindings: RabbitMQ keeps old bindings and AMQP 0-9-1 cannot list them, so each
subscription's bound topic is recorded as a message in its classic queue
``<exchange>-binding.<name>``; a declare reads the records, records the new
topic, binds it and unbinds the old ones, and only then acks the old records (a
crash in between leaves records to clean up next time, never an unknown binding).

Earlier versions kept both kinds in the quorum queue ``<exchange>.<name>`` with
``x-delivery-limit`` and no dead-letter target (a message over the limit was
dropped). A queue's type and arguments cannot change in place, hence the new
names and a move on every declare (:func:`move_old_queue`):
if the old queue exists, it is unbound from the topic (after the new queue was
bound, so messages always have a queue), each message is taken without ack,
published to the new queue through the default exchange with publisher
confirms (same body, properties and header values; only the delivery's own
``x-delivery-count``/``x-acquired-count`` are dropped), and acked in the old
queue once confirmed; then the old queue is deleted if it is empty and unused
(checked just before the delete: quorum queues refuse ``if-empty``, so a
message an old worker routes there in that instant, after binding the old queue
again, would go with it).
A crash in between leaves a message in both queues at worst (handled, listed or
replayed twice: the handlers' inbox drops the repeat by its event id), never in
neither.

In a rolling deploy, an old worker that starts after a new one declares the old
queue again, and messages published meanwhile go to both queues (an old worker
consumes one, a new worker the other: the inbox applies each event once). The
next declare by a new version (a worker start, or any ``conveyor dlq`` command
for a keeper) moves the old queue's messages again and deletes it once no old
worker consumes it; those messages are then in the new queue twice, which the
inbox absorbs as above. A move that fails (broker unreachable, a copy not
confirmed) is logged and retried by the next declare; the old queue keeps what
was not moved.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import aio_pika
import aiormq
import aiormq.abc
from aio_pika.abc import AbstractChannel, AbstractConnection
from pamqp.commands import Basic
from pamqp.common import FieldTable

from conveyor import errors, ports
from conveyor.runtime.failures import dead_letter_topic
from conveyor.transports import rabbit_wire

log = logging.getLogger("conveyor.transports.rabbit")

# Headers a quorum queue adds to a delivery: they describe that delivery, not the message.
_DELIVERY_HEADERS = frozenset({rabbit_wire.DELIVERY_COUNT, "x-acquired-count"})


_KEEPER: FieldTable = {"x-queue-type": "classic"}


def queue_name(exchange: str, subscription: str, *, kept: bool) -> str:
    """The queue of a subscription: ``<exchange>-limited.<name>``, or ``<exchange>-kept.<name>`` without a limit."""
    return f"{exchange}-kept.{subscription}" if kept else f"{exchange}-limited.{subscription}"


def old_queue_name(exchange: str, subscription: str) -> str:
    """The queue earlier versions gave a subscription of either kind: ``<exchange>.<name>``."""
    return f"{exchange}.{subscription}"


def over_limit_exchange(exchange: str, subscription: str) -> str:
    """The fanout exchange a subscription's queue dead-letters into: ``<exchange>-over-limit.<name>``."""
    return f"{exchange}-over-limit.{subscription}"


def queue_arguments(exchange: str, subscription: ports.Subscription) -> FieldTable:
    """Arguments of a subscription's queue: classic without a delivery limit, else quorum dead-lettering past it."""
    if subscription.max_deliveries is None:
        return dict(_KEEPER)
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": subscription.max_deliveries,
        "x-dead-letter-exchange": over_limit_exchange(exchange, subscription.name),
        "x-dead-letter-strategy": "at-least-once",  # kept until the keeper confirmed it
        "x-overflow": "reject-publish",  # at-least-once needs it (else RabbitMQ falls back to at-most-once)
    }


async def declare(channel: AbstractChannel, exchange: str, subscription: ports.Subscription, timeout: float) -> None:
    """Declare the subscription's queue and reconcile its binding through the binding records.

    Raises:
        Exception: one of :data:`rabbit_wire.DRIVER_ERRORS` (the channel is closed then).
    """
    limited = subscription.max_deliveries is not None
    name = queue_name(exchange, subscription.name, kept=not limited)
    if limited:  # the dead-letter target exists before the queue that names it
        over_limit = await channel.declare_exchange(
            over_limit_exchange(exchange, subscription.name), aio_pika.ExchangeType.FANOUT, durable=True
        )
    queue = await channel.declare_queue(name, durable=True, arguments=queue_arguments(exchange, subscription))
    record = await channel.declare_queue(f"{exchange}-binding.{subscription.name}", durable=True)
    held = []
    get = functools.partial(record.get, no_ack=False, fail=False, timeout=timeout)
    while (kept := await get()) is not None:
        held.append(kept)
    await channel.default_exchange.publish(
        aio_pika.Message(subscription.topic.encode(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
        routing_key=record.name, timeout=timeout,
    )  # fmt: skip
    await queue.bind(exchange, routing_key=subscription.topic)
    if limited:
        await (await _keeper(channel, exchange, subscription.topic)).bind(over_limit)
    for old in {m.body.decode() for m in held} - {subscription.topic}:
        await queue.unbind(exchange, routing_key=old)
        if limited:  # declared first: an old topic's keeper may be gone, and unbinding a missing queue fails
            await (await _keeper(channel, exchange, old)).unbind(over_limit)
        log.info("%s moved from topic %s to %s: unbound the old one", subscription.name, old, subscription.topic)
    for kept in held:
        await kept.ack()


async def _keeper(channel: AbstractChannel, exchange: str, topic: str) -> aio_pika.abc.AbstractQueue:
    """The keeper queue of ``topic``'s dead-letter topic, declared as its keeper subscription declares it."""
    keeper = queue_name(exchange, dead_letter_topic(topic), kept=True)
    return await channel.declare_queue(keeper, durable=True, arguments=dict(_KEEPER))


def explain(exchange: str, subscription: ports.Subscription, queue: str, exc: BaseException) -> str:
    """What to do when RabbitMQ refused to declare a subscription's queue (its arguments changed)."""
    return (
        f"RabbitMQ refused to declare queue {queue!r} of subscription {subscription.name!r}: {exc}. "
        f"Conveyor declares it with the arguments {queue_arguments(exchange, subscription)} (x-delivery-limit is "
        "max_deliveries, derived from max_attempts); an existing queue's arguments cannot "
        "change. Keep the previous setting, or migrate: stop the consumers, let the queue "
        f"drain, delete it (rabbitmqctl delete_queue {queue}) and start again."
    )


async def move_old_queue(
    connection: AbstractConnection, exchange: str, subscription: ports.Subscription, timeout: float
) -> int:
    """Move the messages of a subscription's queue of earlier versions, if it exists, into its current queue.

    Call it after the current queue was declared and bound. Failures are logged,
    not raised: the old queue keeps what was not moved and the next declare tries again.

    Returns:
        How many messages were moved.
    """
    old = old_queue_name(exchange, subscription.name)
    new = queue_name(exchange, subscription.name, kept=subscription.max_deliveries is None)
    moved = 0
    try:
        if not await _exists(connection, old, timeout):
            return 0
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        try:
            raw = await channel.get_underlay_channel()
            await raw.queue_unbind(old, exchange, routing_key=subscription.topic, timeout=timeout)
            while await _move_one(raw, old, new, timeout):
                moved += 1
        finally:
            if not channel.is_closed:
                with contextlib.suppress(*rabbit_wire.DRIVER_ERRORS):
                    await channel.close()
        deleted = await _delete_if_empty(connection, old, timeout)
    except (errors.TransportError, *rabbit_wire.DRIVER_ERRORS) as exc:
        log.warning(
            "moving messages from %s to %s stopped after %d (%s); the rest stay in %s "
            "and the next declare (worker start or `conveyor dlq`) moves them",
            old, new, moved, exc, old,
        )  # fmt: skip
        return moved
    if deleted:
        log.info("moved %d messages from the queue of an earlier version %s to %s and deleted it", moved, old, new)
    else:
        log.warning(
            "moved %d messages from %s to %s; %s is not empty or in use (an older worker?), so it stays "
            "(unbound) and the next declare moves what it holds",
            moved, old, new, old,
        )  # fmt: skip
    return moved


async def _exists(connection: AbstractConnection, queue: str, timeout: float) -> bool:
    """Passive declare on a throwaway channel: a missing queue closes the channel it was asked on."""
    channel = await connection.channel(publisher_confirms=False)
    try:
        await channel.declare_queue(queue, passive=True, timeout=timeout)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return False
    finally:
        if not channel.is_closed:
            with contextlib.suppress(*rabbit_wire.DRIVER_ERRORS):
                await channel.close()
    return True


async def _move_one(raw: aiormq.abc.AbstractChannel, old: str, new: str, timeout: float) -> bool:
    """Copy the next message of ``old`` to ``new``, confirmed, then ack it; False once ``old`` is empty.

    Raises:
        TransportError: the broker did not confirm the copy (the original goes
            back to ``old`` with the channel).
    """
    got = await raw.basic_get(old, no_ack=False, timeout=timeout)
    if not isinstance(got.delivery, Basic.GetOk):
        return False
    properties = got.header.properties
    if properties.headers and _DELIVERY_HEADERS & properties.headers.keys():
        properties.headers = {k: v for k, v in properties.headers.items() if k not in _DELIVERY_HEADERS}
    confirm = await raw.basic_publish(
        got.body, exchange="", routing_key=new, properties=properties, mandatory=True, timeout=timeout
    )
    if not isinstance(confirm, Basic.Ack):
        raise errors.TransportError(f"RabbitMQ did not confirm the copy of a message into {new!r} ({confirm!r})")
    await raw.basic_ack(got.delivery_tag or 0)
    return True


async def _delete_if_empty(connection: AbstractConnection, queue: str, timeout: float) -> bool:
    """Delete ``queue`` if it holds no message and has no consumer; False if it does.

    Quorum queues refuse the ``if-empty``/``if-unused`` flags of queue.delete
    (with a connection error: NOT_IMPLEMENTED), so the counts come from a
    passive declare just before a plain delete.
    """
    channel = await connection.channel(publisher_confirms=False)
    try:
        raw = await channel.get_underlay_channel()
        counts = await raw.queue_declare(queue, passive=True, timeout=timeout)
        if counts.message_count or counts.consumer_count:
            return False
        await raw.queue_delete(queue, timeout=timeout)
    finally:
        if not channel.is_closed:
            with contextlib.suppress(*rabbit_wire.DRIVER_ERRORS):
                await channel.close()
    return True
