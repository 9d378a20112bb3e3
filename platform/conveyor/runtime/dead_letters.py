"""Dead letters: look at them, send them back to their topic, or drop them (``conveyor dlq``).

Dead letters of a topic are kept by the subscription named like its dead-letter
topic (``orders.placed.dlq``, declared by every worker), so this works the same
on every broker, through the Transport port:

* ``peek`` consumes without settling, then closes the connection: the broker
  delivers the messages again later, untouched. Each peek is one more delivery,
  so keepers have no broker-side delivery limit (``max_deliveries=None``): any
  number of listings leaves them in place. RabbitMQ requeues them when the
  connection closes; NATS gets them back with a short delay
  (:data:`conveyor.transports.nats_consume.GIVE_BACK_DELAY`), which the next
  command's ``idle`` wait covers;
* ``replay`` publishes each message back to the topic it failed on (the
  ``conveyor-dlq-*`` headers removed, the CloudEvent id kept, a new broker id),
  and acks the dead letter only after the broker confirmed the copy;
* ``purge`` acks them.

Dead letters the broker refused for good are held in the database instead
(:class:`conveyor.persistence.DeadLetterStore`); given that store, each
function covers them too (replayed ones and purged ones are deleted from it).

``replay`` and ``purge`` take an optional ``select`` predicate: only the dead
letters it accepts are acted on (and count toward ``limit``); the others are
left unsettled, so the broker keeps them, as a peek does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from conveyor import envelope, errors, names, persistence, ports
from conveyor.runtime.worker import DLQ_HEADER, dead_letter_topic


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A dead-lettered message and why it was dead-lettered."""

    message: envelope.WireMessage
    topic: str
    handler: str
    error_type: str
    error: str
    attempts: str
    at: str
    held_id: int | None = None
    """The row id when the dead letter is held in the database (the broker refused it)."""

    @property
    def event_id(self) -> str | None:
        """The CloudEvent id, if the message is a valid CloudEvent."""
        try:
            return envelope.decode(self.without_reason()).id
        except errors.InvalidMessage:
            return None

    def without_reason(self) -> envelope.WireMessage:
        """The original message: the ``conveyor-dlq-*`` headers removed, with a fresh broker id."""
        headers = {k: v for k, v in self.message.headers.items() if not k.startswith(DLQ_HEADER)}
        return envelope.WireMessage(self.message.body, headers, self.message.key, envelope.new_id())


def _dead_letter(message: envelope.WireMessage, topic: str, held_id: int | None = None) -> DeadLetter:
    headers = message.headers

    def get(name: str) -> str:
        return headers.get(DLQ_HEADER + name, "")

    return DeadLetter(
        message=message, topic=get("topic") or topic, handler=get("handler"), error_type=get("error-type"),
        error=get("error"), attempts=get("attempts"), at=get("at"), held_id=held_id,
    )  # fmt: skip


async def _held(
    store: persistence.DeadLetterStore | None, topic: str, limit: int, select: Select | None = None
) -> list[DeadLetter]:
    if store is None or limit <= 0:
        return []
    if select is None:
        return [_dead_letter(h.message, topic, h.id) for h in await store.held(dead_letter_topic(topic), limit)]
    letters = [_dead_letter(h.message, topic, h.id) for h in await store.held(dead_letter_topic(topic), 100_000)]
    return [letter for letter in letters if select(letter)][:limit]


Action = Callable[[ports.Transport, ports.Delivery, DeadLetter], Awaitable[None]]
Select = Callable[[DeadLetter], bool]
"""Chooses the dead letters a replay or purge acts on."""


async def _drain(
    transport: ports.Transport, topic: str, limit: int, idle: float, act: Action, select: Select | None = None
) -> list[DeadLetter]:
    """Hand each dead letter of ``topic`` that ``select`` accepts to ``act`` until ``limit``, or ``idle`` s pass."""
    names.check("topic", topic)
    kept = dead_letter_topic(topic)
    keeper = ports.Subscription(name=kept, topic=kept, prefetch=min(limit, 256), max_deliveries=None)  # as workers do
    found: list[DeadLetter] = []
    last = time.monotonic()

    async def take(delivery: ports.Delivery) -> None:
        nonlocal last
        last = time.monotonic()
        if len(found) >= limit:
            return  # left unsettled: redelivered later
        letter = _dead_letter(delivery.message, topic)
        if select is not None and not select(letter):
            return  # not chosen: left unsettled, redelivered later
        found.append(letter)
        await act(transport, delivery, letter)

    consumer = await transport.subscribe(keeper, take)
    try:
        deadline = time.monotonic() + 60
        while not consumer.active and time.monotonic() < deadline:  # noqa: ASYNC110 - Kafka joins the group
            await asyncio.sleep(0.05)
        last = max(last, time.monotonic())
        while len(found) < limit and time.monotonic() - last < idle:  # noqa: ASYNC110 - idle deadline
            await asyncio.sleep(0.05)
    finally:
        await consumer.stop()
    return found


async def peek(
    transport: ports.Transport,
    topic: str,
    *,
    limit: int = 100,
    idle: float = 2.0,
    held: persistence.DeadLetterStore | None = None,
) -> list[DeadLetter]:
    """Up to ``limit`` dead letters of ``topic`` (held ones first), left in place (close the transport afterwards)."""

    async def keep(transport: ports.Transport, delivery: ports.Delivery, letter: DeadLetter) -> None:
        return None

    kept = await _held(held, topic, limit)
    return kept + await _drain(transport, topic, limit - len(kept), idle, keep) if len(kept) < limit else kept


async def replay(
    transport: ports.Transport,
    topic: str,
    *,
    limit: int = 100,
    idle: float = 2.0,
    held: persistence.DeadLetterStore | None = None,
    select: Select | None = None,
) -> list[DeadLetter]:
    """Send up to ``limit`` dead letters of ``topic`` (held ones first; those ``select`` accepts) back.

    Each goes back to the topic it failed on.

    Raises:
        TransportError: a copy was not confirmed (that dead letter stays in place).
    """

    async def send_back(transport: ports.Transport, delivery: ports.Delivery, letter: DeadLetter) -> None:
        await transport.publish(letter.topic, letter.without_reason())
        await delivery.ack()

    done: list[DeadLetter] = []
    for letter in await _held(held, topic, limit, select):
        await transport.publish(letter.topic, letter.without_reason())
        assert held is not None and letter.held_id is not None
        await held.release([letter.held_id])
        done.append(letter)
    if len(done) < limit:
        done += await _drain(transport, topic, limit - len(done), idle, send_back, select)
    return done


async def purge(
    transport: ports.Transport,
    topic: str,
    *,
    limit: int = 100_000,
    idle: float = 2.0,
    held: persistence.DeadLetterStore | None = None,
    select: Select | None = None,
) -> list[DeadLetter]:
    """Delete up to ``limit`` dead letters of ``topic`` (held ones first; those ``select`` accepts)."""

    async def drop(transport: ports.Transport, delivery: ports.Delivery, letter: DeadLetter) -> None:
        await delivery.ack()

    done = await _held(held, topic, limit, select)
    if held is not None and done:
        await held.release([letter.held_id for letter in done if letter.held_id is not None])
    if len(done) < limit:
        done += await _drain(transport, topic, limit - len(done), idle, drop, select)
    return done
