"""The transactional outbox: messages written in the caller's transaction, sent later by the relay.

A service writes its business rows and the messages they cause in one
transaction::

    outbox = Outbox(source="orders")
    async with database.transaction() as session:
        session.add(order)
        await outbox.add(session, "orders.placed", {"order_id": order.id}, key=order.id)

Nothing is published unless the transaction commits, and everything that
committed is published (at least once) by :class:`conveyor.runtime.relay.Relay`.

A producer that retries (HTTP ingest) uses :meth:`Outbox.add_once`, which
stores an event id once and reports a duplicate instead of failing.

Each row is a CloudEvent in binary mode with HTTP-binding headers: the envelope
id is ``message_id``, its attributes are ``ce-*`` entries of ``headers``,
``content-type`` its data's media type and ``body`` its data. A service written
in another language can insert rows in the same form.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from conveyor import envelope, errors, names, persistence, telemetry
from sqlalchemy.ext.asyncio import AsyncSession

from event_store import database, direct, models

_MAX_DELAY = timedelta(days=3650)

AddOutcome = persistence.AddOutcome


def db_time(dialect: str, offset: float = 0.0) -> sa.ColumnElement[Any]:
    """The database clock plus ``offset`` seconds, as a SQL expression.

    With an offset (a delay, a cutoff) the clock is the statement's, not the
    transaction's: PostgreSQL's ``now()`` is when the transaction began, and a
    delay added by a handler busy for a while in its transaction would
    otherwise be spent before the commit.
    """
    if not offset:
        return models.utcnow()
    if dialect == "sqlite":
        return sa.func.strftime("%Y-%m-%d %H:%M:%f000", "now", f"{offset:+.6f} seconds")
    return sa.func.clock_timestamp() + sa.literal(timedelta(seconds=offset), sa.Interval())


def as_utc(value: datetime) -> datetime:
    """An aware UTC datetime from a database value (SQLite returns naive UTC).

    Raises:
        ConfigurationError: never for database values; for a naive argument
            passed by a caller through :func:`require_aware`.
    """
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def require_aware(name: str, value: datetime) -> datetime:
    """Return ``value`` in UTC.

    Raises:
        ConfigurationError: ``value`` is naive (its time zone would be a guess).
    """
    if value.tzinfo is None:
        raise errors.ConfigurationError(f"{name} must be an aware datetime (e.g. datetime.now(UTC)), got {value!r}")
    return value.astimezone(UTC)


def _delay_seconds(delay: timedelta | float | None) -> float:
    if delay is None:
        return 0.0
    seconds = delay.total_seconds() if isinstance(delay, timedelta) else float(delay)
    if seconds < 0 or seconds > _MAX_DELAY.total_seconds():
        raise errors.ConfigurationError(f"delay must be between 0 and {_MAX_DELAY}, got {delay!r}")
    return seconds


class Outbox:
    """Adds messages to the outbox inside the caller's transaction.

    Args:
        source: CloudEvents ``source`` of messages built from plain data (the
            service's name).
    """

    def __init__(self, source: str = "conveyor") -> None:
        self.source = source

    def build(
        self,
        topic: str,
        data: Any,
        *,
        key: str | None = None,
        type: str | None = None,  # noqa: A002 - the CloudEvents attribute name
        headers: Mapping[str, str] | None = None,
        subject: str | None = None,
        correlationid: str | None = None,
        causationid: str | None = None,
    ) -> envelope.Envelope:
        """The envelope :meth:`add` would store for these arguments.

        An :class:`~conveyor.envelope.Envelope` passed as ``data`` is kept (its
        id stays the message id); ``key`` then overrides its partition key.
        The current trace context is recorded if the envelope has none.

        Raises:
            ConfigurationError: invalid topic, or data that cannot be serialised.
        """
        names.check("topic", topic)
        if isinstance(data, envelope.Envelope):
            event = data if key is None else data.evolve(partitionkey=key)
        else:
            event = envelope.create(
                type or topic,
                data,
                source=self.source,
                key=key,
                subject=subject,
                headers=headers,
                correlationid=correlationid,
                causationid=causationid,
            )
        if event.traceparent is None:
            traceparent, tracestate = telemetry.current_trace()
            if traceparent is not None:
                event = event.evolve(traceparent=traceparent, tracestate=tracestate)
        return event

    async def add(
        self,
        session: AsyncSession,
        topic: str,
        data: Any,
        *,
        key: str | None = None,
        type: str | None = None,  # noqa: A002 - the CloudEvents attribute name
        headers: Mapping[str, str] | None = None,
        subject: str | None = None,
        correlationid: str | None = None,
        causationid: str | None = None,
        delay: timedelta | float | None = None,
        at: datetime | None = None,
    ) -> envelope.Envelope:
        """Add a message to the outbox in the caller's open transaction.

        Args:
            session: the caller's session, inside its transaction; the row
                commits or rolls back with the caller's writes.
            topic: destination topic.
            data: a pydantic model, a JSON-compatible value, bytes, or a
                ready :class:`~conveyor.envelope.Envelope`.
            key: ordering key: messages with the same key are published in
                commit order, one relay at a time.
            type: CloudEvents type (default: the topic).
            headers: extra transport headers.
            subject: CloudEvents subject.
            correlationid: id shared by the messages of one business flow.
            causationid: id of the message that caused this one.
            delay: publish no earlier than this long after commit (database clock).
            at: publish no earlier than this aware time.

        Returns:
            The stored envelope (its ``id`` is the message id).

        Raises:
            ConfigurationError: invalid topic, data, delay or time; both
                ``delay`` and ``at`` given.
            StoreError: the database refused the row (e.g. a duplicate id).
        """
        if delay is not None and at is not None:
            raise errors.ConfigurationError("give either delay or at, not both")
        event = self.build(
            topic, data, key=key, type=type, headers=headers, subject=subject,
            correlationid=correlationid, causationid=causationid,
        )  # fmt: skip
        if delay is None and at is None:
            # The common case: one fixed statement, straight to the driver, due at commit time.
            await direct.insert_outbox(session, [direct.outbox_params(topic, event)])
            return event
        dialect = session.get_bind().dialect.name
        if at is not None:
            available_at: Any = require_aware("at", at)
        else:
            available_at = db_time(dialect, _delay_seconds(delay))
        row = to_row(topic, event)
        row["available_at"] = available_at
        with database.translating():
            await session.execute(sa.insert(models.outbox).inline().values(**row))
        session.info[database.OUTBOX_ADDED] = True
        return event

    async def add_once(self, session: AsyncSession, topic: str, event: envelope.Envelope) -> AddOutcome:
        """Add an event unless its id is in the outbox already, in the caller's open transaction.

        The insert is ``INSERT ... ON CONFLICT (message_id) DO NOTHING``: a
        duplicate leaves the transaction usable (a failed insert would abort it
        on PostgreSQL). A concurrent add of the same id waits for the other
        transaction and, if that commits, sees its row. Ids are remembered as
        long as their rows are kept: the relay purges sent rows after the
        retention period, and the id may then be added again.

        Args:
            session: the caller's session, inside its transaction.
            topic: destination topic.
            event: the event; its id is the message id. It is published as soon
                as the transaction commits.

        Returns:
            ``"added"``, ``"duplicate"`` (same id, topic and ``source``; the
            first row is kept as it was) or ``"conflict"`` (the id belongs to
            an event of another topic or source); see :data:`AddOutcome`.

        Raises:
            ConfigurationError: invalid topic.
            StoreError: the database failed.
        """
        row = to_row(topic, self.build(topic, event))
        table = models.outbox
        statement = (
            database.insert_for(session)(table).values(**row).on_conflict_do_nothing(index_elements=["message_id"])
        )
        with database.translating():
            result = await session.execute(statement)
            if int(result.rowcount or 0) == 1:  # type: ignore[attr-defined]
                session.info[database.OUTBOX_ADDED] = True
                return "added"
            query = sa.select(table.c.topic, table.c.headers).where(table.c.message_id == event.scoped_id)
            stored = (await session.execute(query)).one_or_none()
        if stored is None:
            return "duplicate"  # sent and purged between the two statements
        headers = stored.headers if isinstance(stored.headers, dict) else {}
        same = stored.topic == topic and headers.get(envelope.HTTP_PREFIX + "source") == event.source
        return "duplicate" if same else "conflict"


def to_row(topic: str, event: envelope.Envelope) -> dict[str, Any]:
    """The outbox columns of an envelope (binary mode, HTTP-binding headers)."""
    wire = envelope.to_binary(event, envelope.HTTP_PREFIX)
    return {
        "message_id": event.scoped_id,
        "topic": topic,
        "partition_key": event.partitionkey,
        "headers": wire.headers,
        "body": wire.body,
    }
