"""The handler's view of the world: the message, publishing and a bound logger."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from conveyor import envelope, errors, names, telemetry
from conveyor.transaction import Transaction

_log = logging.getLogger("conveyor.handler")


@dataclass(slots=True)
class Outgoing:
    """A message a handler published, sent once the handler succeeds."""

    topic: str
    envelope: envelope.Envelope


class Transactions(Protocol):
    """Opens handler transactions (implemented by the runtime over the database)."""

    def begin(self, ctx: Context) -> contextlib.AbstractAsyncContextManager[Transaction]:
        """A transaction that first marks ``ctx.message`` as handled in the inbox.

        Raises:
            AlreadyHandled: the inbox already has the message for this handler.
            StoreError: the database failed.
        """
        ...


class Context:
    """Passed to a handler as its second argument.

    Attributes:
        message: the envelope being handled (id, type, source, subject, time,
            key, attempt, headers, correlation and causation ids, trace context).
        handler: the handler's name.
        logger: a logger whose records carry the message id and handler name.
    """

    __slots__ = ("_logger", "_source", "_transactions", "handler", "message", "outgoing")

    def __init__(
        self, message: envelope.Envelope, handler: str, source: str, transactions: Transactions | None = None
    ) -> None:
        self.message = message
        self.handler = handler
        self._source = source
        self._transactions = transactions
        self._logger: logging.LoggerAdapter[logging.Logger] | None = None
        self.outgoing: list[Outgoing] = []

    @property
    def logger(self) -> logging.LoggerAdapter[logging.Logger]:
        """A logger bound to this message and handler."""
        if self._logger is None:
            self._logger = logging.LoggerAdapter(
                _log,
                {"handler": self.handler, "message_id": self.message.id, "attempt": self.message.attempt},
            )
        return self._logger

    def publish(
        self,
        topic: str,
        data: Any,
        *,
        key: str | None = None,
        type: str | None = None,  # noqa: A002 - the CloudEvents attribute name
        headers: Mapping[str, str] | None = None,
    ) -> envelope.Envelope:
        """Publish a message caused by the one being handled.

        The message is sent only if the handler succeeds, before the incoming
        message is acknowledged; a failed or retried attempt sends nothing.
        The correlation id is carried over, the causation id is the incoming
        message's id, and the trace context is the handler's span, so the
        next consumer continues the same trace.

        Args:
            topic: destination topic.
            data: a pydantic model, a JSON-compatible value or bytes.
            key: ordering key; messages with the same key are handled in order.
            type: CloudEvents type (default: the topic).
            headers: extra transport headers.

        Returns:
            The envelope that will be sent.

        Raises:
            ConfigurationError: invalid topic, or data that cannot be serialised.
        """
        self.outgoing.append(Outgoing(topic, self.child(topic, data, key=key, type=type, headers=headers)))
        return self.outgoing[-1].envelope

    def child(
        self,
        topic: str,
        data: Any,
        *,
        key: str | None = None,
        type: str | None = None,  # noqa: A002 - the CloudEvents attribute name
        headers: Mapping[str, str] | None = None,
    ) -> envelope.Envelope:
        """An envelope caused by the message being handled (ids and trace carried over).

        Raises:
            ConfigurationError: invalid topic, or data that cannot be serialised.
        """
        names.check("topic", topic)
        parent = self.message
        traceparent, tracestate = telemetry.current_trace() if telemetry.tracing() else (None, None)
        if traceparent is None:
            traceparent, tracestate = parent.traceparent, parent.tracestate
        return envelope.create(
            type or topic,
            data,
            source=self._source,
            key=key,
            headers=headers,
            correlationid=parent.correlationid or parent.id,
            causationid=parent.id,
            traceparent=traceparent,
            tracestate=tracestate,
        )

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        """One database transaction: the inbox mark, your writes and the outbox, committed together.

        The inbox row ``(handler name, message id)`` is inserted first; if this
        message was already handled (a redelivery), the handler stops here and
        the message is acknowledged without running the rest again. Put every
        effect inside the transaction. ``tx.session`` is a SQLAlchemy
        ``AsyncSession``; ``tx.publish(...)`` writes to the outbox.

        Raises:
            ConfigurationError: this process has no database configured.
            StoreError: the database failed (the attempt is retried).
        """
        if self._transactions is None:
            raise errors.ConfigurationError(
                "ctx.transaction() needs a database: set CONVEYOR_DATABASE_URL and run `conveyor db upgrade`"
            )
        async with self._transactions.begin(self) as tx:
            yield tx
