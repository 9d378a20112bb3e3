"""Subscription queues on RabbitMQ: names, arguments, binding records, and keepers.

A subscription with a delivery limit is the durable quorum queue
``<exchange>.<name>`` with ``x-delivery-limit`` = ``max_deliveries``, a
backstop against redelivery loops.

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

Keepers of earlier versions were quorum queues ``<exchange>.<name>`` with
``x-delivery-limit``. A queue's type and arguments cannot change in place, hence
the new name and a move on every declare of a keeper (:func:`move_old_keeper`):
if the old queue exists, it is unbound from the topic (after the new queue was
bound, so dead letters always have a queue), each message is taken without ack,
published to the new queue through the default exchange with publisher
confirms (same body, properties and header values; only the delivery's own
``x-delivery-count``/``x-acquired-count`` are dropped), and acked in the old
queue once confirmed; then the old queue is deleted if it is empty and unused
(checked just before the delete: quorum queues refuse ``if-empty``, so a dead
letter an old worker routes there in that instant, after binding the old queue
again, would go with it).
A crash in between leaves a message in both queues at worst (listed twice,
replayed twice: the handlers' inbox drops the repeat by its event id), never in
neither.

In a rolling deploy, an old worker that starts after a new one declares the old
keeper again, and dead letters published meanwhile go to both queues. The next
declare by a new version (a worker start, or any ``conveyor dlq`` command) moves
the old queue's messages again and deletes it; those dead letters are then in
the new keeper twice, which a replay absorbs as above. A move that fails
(broker unreachable, a copy not confirmed) is logged and retried by the next
declare; the old queue keeps what was not moved.
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
from conveyor.transports import rabbit_wire

log = logging.getLogger("conveyor.transports.rabbit")

# Headers a quorum queue adds to a delivery: they describe that delivery, not the message.
_DELIVERY_HEADERS = frozenset({rabbit_wire.DELIVERY_COUNT, "x-acquired-count"})


def queue_name(exchange: str, subscription: str, *, kept: bool) -> str:
    """The queue of a subscription: ``<exchange>.<name>``, or ``<exchange>-kept.<name>`` without a delivery limit."""
    return f"{exchange}-kept.{subscription}" if kept else f"{exchange}.{subscription}"


def queue_arguments(subscription: ports.Subscription) -> FieldTable:
    """Arguments of a subscription's queue: classic without a delivery limit, else quorum with one."""
    if subscription.max_deliveries is None:
        return {"x-queue-type": "classic"}
    return {"x-queue-type": "quorum", "x-delivery-limit": subscription.max_deliveries}


async def declare(channel: AbstractChannel, exchange: str, subscription: ports.Subscription, timeout: float) -> None:
    """Declare the subscription's queue and reconcile its binding through the binding records.

    Raises:
        Exception: one of :data:`rabbit_wire.DRIVER_ERRORS` (the channel is closed then).
    """
    name = queue_name(exchange, subscription.name, kept=subscription.max_deliveries is None)
    queue = await channel.declare_queue(name, durable=True, arguments=queue_arguments(subscription))
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
    for old in {m.body.decode() for m in held} - {subscription.topic}:
        await queue.unbind(exchange, routing_key=old)
        log.info("%s moved from topic %s to %s: unbound the old one", subscription.name, old, subscription.topic)
    for kept in held:
        await kept.ack()


def explain(subscription: ports.Subscription, queue: str, exc: BaseException) -> str:
    """What to do when RabbitMQ refused to declare a subscription's queue (its arguments changed)."""
    return (
        f"RabbitMQ refused to declare queue {queue!r} of subscription {subscription.name!r}: {exc}. "
        f"Conveyor declares it with the arguments {queue_arguments(subscription)} (x-delivery-limit is "
        "max_deliveries, derived from max_attempts); an existing queue's arguments cannot "
        "change. Keep the previous setting, or migrate: stop the consumers, let the queue "
        f"drain, delete it (rabbitmqctl delete_queue {queue}) and start again."
    )


async def move_old_keeper(
    connection: AbstractConnection, exchange: str, subscription: ports.Subscription, timeout: float
) -> int:
    """Move the messages of a keeper's quorum queue of earlier versions, if it exists, into its classic queue.

    Call it after the classic queue was declared and bound. Failures are logged,
    not raised: the old queue keeps what was not moved and the next declare tries again.

    Returns:
        How many messages were moved.
    """
    old = queue_name(exchange, subscription.name, kept=False)
    new = queue_name(exchange, subscription.name, kept=True)
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
            "moving dead letters from %s to %s stopped after %d (%s); the rest stay in %s "
            "and the next declare (worker start or `conveyor dlq`) moves them",
            old, new, moved, exc, old,
        )  # fmt: skip
        return moved
    if deleted:
        log.info("moved %d dead letters from the old keeper queue %s to %s and deleted it", moved, old, new)
    else:
        log.warning(
            "moved %d dead letters from %s to %s; %s is not empty or in use, so it stays (unbound) "
            "and the next declare moves what it holds",
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
        raise errors.TransportError(f"RabbitMQ did not confirm the copy of a dead letter into {new!r} ({confirm!r})")
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
