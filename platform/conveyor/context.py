"""The handler's view of the world: the message, publishing and a bound logger."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from conveyor import attributes, envelope, errors, names, persistence, telemetry
from conveyor.transaction import AlreadyHandled, Transaction

_log = logging.getLogger("conveyor.handler")
_IDS = uuid.UUID("9d0c6f5e-3b7a-4c1e-9a51-6f2f3d1b8c47")
"""Namespace of the ids of messages a handler publishes (see :meth:`Context.child`)."""


class Context:
    """Passed to a handler as its second argument.

    Attributes:
        message: the envelope being handled (id, type, source, subject, time,
            key, attempt, headers, correlation and causation ids, trace context).
        handler: the handler's name.
        outgoing: messages the attempt published, in order; sent when it succeeds.
        duplicate: the inbox showed the message was already handled.
        in_database: the attempt was waiting for one of Conveyor's own database
            steps (the inbox claim, the commit) and has not seen it answer: a
            timeout then is the database's, not the message's.
    """

    __slots__ = (
        "_children",
        "_logger",
        "_source",
        "_tx",
        "_unit",
        "_units",
        "duplicate",
        "handler",
        "in_database",
        "message",
        "outgoing",
    )

    def __init__(
        self,
        message: envelope.Envelope,
        handler: str,
        source: str,
        units: persistence.UnitOfWorkFactory | None = None,
    ) -> None:
        self.message = message
        self.handler = handler
        self._source = source
        self._units = units
        self._unit: persistence.UnitOfWork | None = None
        self._tx: Transaction | None = None
        self._logger: logging.LoggerAdapter[logging.Logger] | None = None
        self._children = 0
        self.outgoing: list[persistence.Outgoing] = []
        self.duplicate = False
        self.in_database = False

    @property
    def logger(self) -> logging.LoggerAdapter[logging.Logger]:
        """A logger bound to this message and handler."""
        if self._logger is None:
            self._logger = logging.LoggerAdapter(
                _log,
                {"handler": self.handler, "message_id": self.message.id, "attempt": self.message.attempt},
            )
        return self._logger

    @property
    def unit(self) -> persistence.UnitOfWork | None:
        """The attempt's open unit of work, if ``ctx.transaction()`` opened one."""
        return self._unit

    def publish(
        self,
        topic: str,
        data: Any,
        *,
        key: str | None = None,
        type: str | None = None,  # noqa: A002 - the CloudEvents attribute name
        headers: Mapping[str, str] | None = None,
        delay: timedelta | float | None = None,
        at: datetime | None = None,
        extensions: Mapping[str, str] | None = None,
    ) -> envelope.Envelope:
        """Publish a message caused by the one being handled, if the attempt succeeds.

        Nothing is sent by a failed attempt. When the attempt has a database
        transaction (``ctx.transaction()``, before or after this call), the
        message goes to the outbox in it and the relay sends it after the
        commit; otherwise it is sent to the broker after the handler returns,
        before the incoming message is acknowledged. Its id is derived from the
        incoming message's id, the handler and the order of publishes, so a
        retried attempt sends the same ids and consumers drop the doubles.

        The correlation id is carried over, the causation id is the incoming
        message's id, and the trace context is the handler's span.

        Args:
            topic: destination topic.
            data: a pydantic model, a JSON-compatible value or bytes.
            key: ordering key; messages with the same key are handled in order.
            type: CloudEvents type (default: the topic).
            headers: extra transport headers.
            delay: publish no earlier than this long after the attempt commits
                (needs a database: the message waits in the outbox).
            at: publish no earlier than this aware time (likewise).
            extensions: CloudEvents extension attributes (lower-case names).

        Returns:
            The envelope that will be sent.

        Raises:
            ConfigurationError: invalid topic, data that cannot be serialised,
                an invalid extension, or both ``delay`` and ``at``.
        """
        if delay is not None and at is not None:
            raise errors.ConfigurationError("give either delay or at, not both")
        event = self.child(topic, data, key=key, type=type, headers=headers, extensions=extensions)
        self.outgoing.append(persistence.Outgoing(topic, event, delay, at))
        return event

    def reply(self, data: Any = None, *, failed: bool = False, reason: str | None = None) -> envelope.Envelope:
        """Answer the saga command being handled: success, or ``failed=True`` with a ``reason``.

        The reply goes to the saga that sent the command, correlated with its
        instance and step, and, like every publish, only if this attempt
        succeeds (with a transaction, in the same commit as your writes).

        Args:
            data: the reply's payload (a pydantic model or JSON-compatible value).
            failed: the step failed: the saga undoes what it did before it.
            reason: why it failed (kept in the saga's step log).

        Returns:
            The envelope that will be sent.

        Raises:
            ConfigurationError: the message being handled is not a saga command.
        """
        from conveyor.sagas import wire

        topic, extensions = wire.reply_to(self.message, failed=failed)
        if failed and data is None:
            data = {"reason": reason or "failed"}
        elif failed and reason is not None and isinstance(data, dict):
            data = {**data, "reason": reason}
        instance = extensions[wire.INSTANCE]
        return self.publish(topic, data, key=instance, type=wire.REPLY, extensions=extensions)

    @property
    def needs_outbox(self) -> bool:
        """True if an outgoing message is delayed: it can only wait in the outbox."""
        return any(o.delay is not None or o.at is not None for o in self.outgoing)

    def child(
        self,
        topic: str,
        data: Any,
        *,
        key: str | None = None,
        type: str | None = None,  # noqa: A002 - the CloudEvents attribute name
        headers: Mapping[str, str] | None = None,
        extensions: Mapping[str, str] | None = None,
    ) -> envelope.Envelope:
        """An envelope caused by the message being handled (ids and trace carried over).

        Its id is a UUID derived from the handler, the incoming message id and
        how many envelopes this attempt built before it: the same on every
        attempt that publishes in the same order.

        Raises:
            ConfigurationError: invalid topic, or data that cannot be serialised.
        """
        names.check("topic", topic)
        parent = self.message
        traceparent, tracestate = telemetry.current_trace() if telemetry.tracing() else (None, None)
        if traceparent is None:
            traceparent, tracestate = parent.traceparent, parent.tracestate
        event = envelope.create(
            type or topic,
            data,
            source=self._source,
            key=key,
            headers=headers,
            correlationid=parent.correlationid or parent.id,
            causationid=parent.id,
            traceparent=traceparent,
            tracestate=tracestate,
            extensions=_with_tenant(extensions, parent.tenant),
        )
        event.id = str(uuid.uuid5(_IDS, f"{self.handler}\n{parent.id}\n{self._children}"))
        self._children += 1
        return event

    def transaction(self) -> _TransactionScope:
        """The attempt's database transaction: the inbox mark, your writes and the outbox, committed together.

        Use it as ``async with ctx.transaction() as tx:``. The first call opens
        the transaction and inserts the inbox row ``(handler name, message id)``;
        if this message was already handled (a redelivery), the handler stops
        there and the message is acknowledged without running the rest. Later
        calls join the same transaction. It commits once, when the handler
        returns, with every message the attempt published; an exception or
        timeout anywhere in the handler rolls all of it back and the retry runs
        the handler again. ``tx.session`` is a SQLAlchemy ``AsyncSession``.

        Raises:
            ConfigurationError: this process has no database configured, or the
                handler is a plain (sync) function.
            StoreError: the database failed (the attempt is retried).
        """
        return _TransactionScope(self)

    async def open_transaction(self) -> Transaction:
        """Open (or join) the attempt's transaction; see :meth:`transaction`.

        Raises:
            ConfigurationError: no database is configured.
            StoreError: the database failed.
        """
        if self._tx is not None:
            return self._tx
        if self._units is None:
            raise errors.ConfigurationError(
                "ctx.transaction() needs a database: set CONVEYOR_DATABASE_URL and run `conveyor db upgrade`"
            )
        self.in_database = True  # left set if the claim never answers (a timeout cancels it)
        unit = await self._units.begin(self.handler, self.message.scoped_id)
        self.in_database = False
        if unit is None:
            self.duplicate = True
            raise AlreadyHandled(f"{self.handler} already handled message {self.message.id}")
        self._unit = unit
        self._tx = Transaction(unit.tx, unit.events, self.child, self.outgoing)
        return self._tx


def _with_tenant(extensions: Mapping[str, str] | None, tenant: str | None) -> Mapping[str, str] | None:
    """What a handler publishes belongs to the tenant of the message it handles."""
    if tenant is None or (extensions and attributes.TENANT in extensions):
        return extensions
    return {**(extensions or {}), attributes.TENANT: tenant}


class _TransactionScope:
    """``async with ctx.transaction() as tx``; refuses a plain ``with`` with an explanation."""

    __slots__ = ("_ctx",)

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx

    async def __aenter__(self) -> Transaction:
        return await self._ctx.open_transaction()

    async def __aexit__(self, *exc_info: object) -> None:
        return None  # the attempt commits or rolls back as a whole, when the handler ends

    def __enter__(self) -> Transaction:
        raise errors.ConfigurationError(
            f"handler {self._ctx.handler}: ctx.transaction() is asynchronous; a plain (sync) handler runs in a "
            "thread and cannot share the attempt's database transaction. Declare it with `async def` and use "
            "`async with ctx.transaction() as tx:`"
        )

    def __exit__(self, *exc_info: object) -> None:
        return None
