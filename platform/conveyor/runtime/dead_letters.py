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

Each function takes a topic or its dead-letter topic's name, and an optional
``select`` predicate (:func:`matching`: by handler, error type, event id):
only the dead letters it accepts are listed or acted on (and count toward
``limit``); the others are left unsettled, so the broker keeps them, as a
peek does. On Kafka, where an ack takes effect only once every earlier record
of its partition is settled, the unchosen letters delivered before a chosen
one are moved behind it first (published again to the dead-letter topic,
then acked): acting on chosen letters takes effect on every broker.

A run reads the keeper's count first and never declares anything (a keeper
not declared holds nothing). A replay never sends a letter twice: one it
dead-lettered again meanwhile (the handler still fails) is left for the next.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from conveyor import envelope, errors, names, persistence, ports
from conveyor.runtime.worker import DLQ_HEADER, DLQ_SUFFIX, dead_letter_topic

log = logging.getLogger("conveyor.dlq")


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

    @property
    def at_time(self) -> datetime | None:
        """When it was dead-lettered (the ``conveyor-dlq-at`` header), if that reads as an ISO 8601 time."""
        try:
            value = datetime.fromisoformat(self.at.replace("Z", "+00:00"))
        except ValueError:
            return None
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)

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
"""Chooses the dead letters a listing, replay or purge acts on."""

MAX_PREFETCH = 10_000
"""Most dead letters one run holds unsettled: the unchosen ones must not block the chosen behind them."""


def matching(*, handler: str | None = None, error_type: str | None = None, event_id: str | None = None) -> Select:
    """A :data:`Select` of the dead letters with this handler, error type and event id (None: any)."""

    def select(letter: DeadLetter) -> bool:
        return (
            (handler is None or letter.handler == handler)
            and (error_type is None or letter.error_type == error_type)
            and (event_id is None or letter.event_id == event_id)
        )

    return select


def both(first: Select | None, second: Select | None) -> Select | None:
    """The dead letters both accept (None accepts every one)."""
    if first is None or second is None:
        return first or second
    return lambda letter: first(letter) and second(letter)


def source_topic(name: str) -> str:
    """The topic whose dead letters ``name`` means: the topic itself, or its dead-letter topic's name.

    ``orders.placed`` and ``orders.placed.dlq`` both mean the dead letters of ``orders.placed``
    (the name the worker's log prints is accepted as well as the topic's).

    Raises:
        ConfigurationError: the name is not a valid topic name.
    """
    names.check("topic", name)
    return name.removesuffix(DLQ_SUFFIX) if name.endswith(DLQ_SUFFIX) and name != DLQ_SUFFIX[1:] else name


def identity(letter: DeadLetter) -> tuple[str, str]:
    """What stays the same when a replayed letter is dead-lettered again: the handler and the event.

    The event id where the message is a CloudEvent, else a digest of its body and key.
    """
    if (event_id := letter.event_id) is not None:
        return letter.handler, event_id
    digest = hashlib.sha256(letter.message.body + b"\0" + (letter.message.key or "").encode()).hexdigest()
    return letter.handler, "body:" + digest


@dataclass
class _Run:
    """One pass over a keeper: a snapshot of what it held when the pass began, and what was seen since."""

    limit: int
    snapshot: int | None
    """Letters the keeper held at the start (None where the broker cannot tell)."""
    seen: set[str] = field(default_factory=set)
    found: list[DeadLetter] = field(default_factory=list)
    passed: list[ports.Delivery] = field(default_factory=list)
    """Unchosen deliveries left unsettled (in delivery order)."""

    @property
    def full(self) -> bool:
        """The limit is reached."""
        return len(self.found) >= self.limit

    @property
    def counted(self) -> bool:
        """As many letters were seen as the keeper held at the start."""
        return self.snapshot is not None and len(self.seen) >= self.snapshot


async def _drain(
    transport: ports.Transport,
    topic: str,
    limit: int,
    idle: float,
    act: Action,
    select: Select | None = None,
    skip: Select | None = None,
) -> list[DeadLetter]:
    """Hand the dead letters of ``topic`` that ``select`` accepts to ``act``, up to ``limit``.

    The keeper's count of letters is read first (nothing is declared: a keeper
    that does not exist holds nothing and ends the run at once).
    The run ends once that many were delivered and ``idle / 2`` s passed
    without another (a count can be low: Tansu reports a partition's end
    offset as its last batch's first offset + 1), else after ``idle`` s without
    a delivery. ``skip`` leaves alone a letter that is one this run already
    acted on, dead-lettered again meanwhile (a replay to a handler that still
    fails): it waits for the next run, never sent twice in one.

    On brokers whose acks settle a prefix (Kafka), an unchosen letter before a
    chosen one would keep the chosen one's ack from taking effect; so before
    ``act`` takes a chosen letter, the unchosen ones delivered before it are
    moved behind: published again to the dead-letter topic (same body, headers,
    key and broker id), then acked. A crash between the two lists such a
    letter twice (a replay absorbs it: same event id).
    """
    kept = dead_letter_topic(topic)
    count = await _count(transport, kept)
    if count is _MISSING or limit <= 0:
        return []
    run = _Run(limit, count or None)  # an empty keeper may get a letter meanwhile: wait ``idle`` for it
    size = min(limit if select is None and skip is None else MAX_PREFETCH, MAX_PREFETCH)  # unchosen ones hold slots
    keeper = ports.Subscription(name=kept, topic=kept, prefetch=size, max_deliveries=None)  # as workers do
    in_order = transport.features.acks_settle_a_prefix
    lock = asyncio.Lock()  # one delivery at a time: a move must not race the act behind it
    last = time.monotonic()

    async def take(delivery: ports.Delivery) -> None:
        nonlocal last
        last = time.monotonic()
        async with lock:
            broker_id = delivery.message.message_id or ""
            if run.full:
                return  # past the limit: left unsettled, redelivered later
            if broker_id and broker_id in run.seen:
                run.passed.append(delivery)  # a letter moved behind, met again: left unsettled (or moved again)
                return
            run.seen.add(broker_id or envelope.new_id())
            letter = _dead_letter(delivery.message, topic)
            if (select is not None and not select(letter)) or (skip is not None and skip(letter)):
                run.passed.append(delivery)
                return  # not chosen: left unsettled (or moved behind, see below), redelivered later
            if in_order:
                for earlier in run.passed:
                    await transport.publish(kept, earlier.message)
                    await earlier.ack()
                run.passed.clear()
            run.found.append(letter)
            await act(transport, delivery, letter)

    consumer = await transport.subscribe(keeper, take)
    try:
        deadline = time.monotonic() + 60
        while not consumer.active and time.monotonic() < deadline:  # noqa: ASYNC110 - Kafka joins the group
            await asyncio.sleep(0.05)
        last = max(last, time.monotonic())
        while not run.full and (quiet := time.monotonic() - last) < idle:  # idle deadline
            if run.counted and quiet >= idle / 2:
                break
            await asyncio.sleep(0.05)
        async with lock:  # an act under way finishes before the consumer stops
            pass
    finally:
        await consumer.stop()
    return run.found


async def waiting(transport: ports.Transport, topics: Iterable[str]) -> dict[str, int | None]:
    """Dead letters each topic's keeper holds, from the broker's backlog (read only, nothing declared).

    0 for a keeper not declared (nothing was ever kept); None where the broker
    cannot tell or did not answer.
    """
    names_ = list(topics)

    async def one(topic: str) -> int | None:
        try:
            count = await _count(transport, dead_letter_topic(topic))
        except errors.TransportError as exc:  # an outage, a refusal: unknown
            log.debug("no dead-letter count for %s: %s", topic, exc)
            return None
        return 0 if count == _MISSING else count

    return dict(zip(names_, await asyncio.gather(*(one(t) for t in names_)), strict=True))


_MISSING = -1
"""The count of a keeper that is not declared."""


async def _count(transport: ports.Transport, kept: str) -> int | None:
    """Letters the keeper ``kept`` holds now: :data:`_MISSING` if not declared, None where the broker cannot tell.

    Raises:
        TransientTransportError: the broker did not answer.
    """
    try:
        backlog = await ports.backlog_of(transport, ports.Subscription(name=kept, topic=kept, max_deliveries=None))
    except errors.NotDeclared:
        return _MISSING  # no keeper: nothing was ever kept here (and listing declares nothing)
    return None if backlog is None else backlog.pending + (backlog.in_flight or 0)


async def peek(
    transport: ports.Transport,
    topic: str,
    *,
    limit: int = 100,
    idle: float = 2.0,
    held: persistence.DeadLetterStore | None = None,
    select: Select | None = None,
) -> list[DeadLetter]:
    """Up to ``limit`` dead letters of ``topic`` (held ones first; those ``select`` accepts), left in place.

    ``topic`` may also be given as its dead-letter topic's name (:func:`source_topic`).
    Close the transport afterwards: that gives the broker back what was peeked.
    """

    async def keep(transport: ports.Transport, delivery: ports.Delivery, letter: DeadLetter) -> None:
        return None

    topic = source_topic(topic)
    kept = await _held(held, topic, limit, select)
    if len(kept) >= limit:
        return kept
    return kept + await _drain(transport, topic, limit - len(kept), idle, keep, select)


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

    Each goes back to the topic it failed on. Only the letters kept when the
    replay starts are sent: one that is dead-lettered again meanwhile (the
    handler still fails) is left for the next replay, never sent twice in one.

    Raises:
        TransportError: a copy was not confirmed (that dead letter stays in place).
    """
    topic = source_topic(topic)
    sent: set[tuple[str, str]] = set()

    async def send_back(transport: ports.Transport, delivery: ports.Delivery, letter: DeadLetter) -> None:
        sent.add(identity(letter))
        await transport.publish(letter.topic, letter.without_reason())
        await delivery.ack()

    done: list[DeadLetter] = []
    for letter in await _held(held, topic, limit, select):
        sent.add(identity(letter))
        await transport.publish(letter.topic, letter.without_reason())
        assert held is not None and letter.held_id is not None
        await held.release([letter.held_id])
        done.append(letter)
    if len(done) < limit:
        again = lambda letter: identity(letter) in sent  # noqa: E731 - dead-lettered again by this replay
        done += await _drain(transport, topic, limit - len(done), idle, send_back, select, again)
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

    topic = source_topic(topic)
    done = await _held(held, topic, limit, select)
    if held is not None and done:
        await held.release([letter.held_id for letter in done if letter.held_id is not None])
    if len(done) < limit:
        done += await _drain(transport, topic, limit - len(done), idle, drop, select)
    return done
