"""The handler's view of the world: the message, publishing and a bound logger."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from conveyor import envelope, names, telemetry

_log = logging.getLogger("conveyor.handler")


@dataclass(slots=True)
class Outgoing:
    """A message a handler published, sent once the handler succeeds."""

    topic: str
    envelope: envelope.Envelope


class Context:
    """Passed to a handler as its second argument.

    Attributes:
        message: the envelope being handled (id, type, source, subject, time,
            key, attempt, headers, correlation and causation ids, trace context).
        handler: the handler's name.
        logger: a logger whose records carry the message id and handler name.
    """

    __slots__ = ("_logger", "_source", "handler", "message", "outgoing")

    def __init__(self, message: envelope.Envelope, handler: str, source: str) -> None:
        self.message = message
        self.handler = handler
        self._source = source
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
        names.check("topic", topic)
        parent = self.message
        traceparent, tracestate = telemetry.current_trace()
        if traceparent is None:
            traceparent, tracestate = parent.traceparent, parent.tracestate
        child = envelope.create(
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
        self.outgoing.append(Outgoing(topic, child))
        return child
