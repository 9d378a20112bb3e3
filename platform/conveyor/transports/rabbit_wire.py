"""The wire side of the RabbitMQ transport: message mapping, delay tiers, driver errors.

A :class:`~conveyor.envelope.WireMessage` travels as an AMQP 0-9-1 message:
its headers in the headers table (``content-type`` in the ``content_type``
property), its key in the header ``conveyor-key``, its id in ``message_id``,
persistent. A delayed copy carries ``conveyor-attempt`` and, past the largest
delay tier, ``conveyor-due`` (see :mod:`conveyor.transports.rabbit`).

Tiers dead-letter ``at-least-once`` (``x-dead-letter-strategy``, which needs
``x-overflow: reject-publish``; RabbitMQ 3.10+): an expired copy stays in the
tier until its queue confirmed it, so a copy expiring while its queue is
unavailable is retried (every few minutes), not lost; copies for a deleted
queue wait in the tier (counted in ``messages``, neither ready nor unacked) until
the queue is declared again. A copy to a deleted tier queue is returned: the
original is requeued and the tier declared again. Earlier versions used classic
tier queues ``conveyor-delay.<ms>ms`` (at-most-once); a queue's type cannot
change in place, so they are left alone: operators may delete those queues and
exchanges once empty (``rabbitmqctl list_queues name messages``).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import aiormq
import aiormq.abc
from pamqp.commands import Basic
from pamqp.common import FieldTable

from conveyor import errors
from conveyor.envelope import WireMessage, binary_partition_key
from conveyor.runtime.failures import DLQ_HEADER
from conveyor.transports import rabbit_frames

KEY_HEADER = "conveyor-key"
ATTEMPT_HEADER = "conveyor-attempt"
DUE_HEADER = "conveyor-due"
DELIVERY_COUNT = "x-delivery-count"
DEFAULT_TIERS = tuple(0.05 * 2**k for k in range(17))  # 50 ms .. 3276.8 s
_PERSISTENT = 2
# Headers RabbitMQ adds when dead-lettering: not part of the message.
_BROKER_HEADERS = frozenset(
    {"x-death", "x-first-death-exchange", "x-first-death-queue", "x-first-death-reason",
     "x-last-death-exchange", "x-last-death-queue", "x-last-death-reason", DELIVERY_COUNT}
)  # fmt: skip
_INTERNAL = _BROKER_HEADERS | {KEY_HEADER, ATTEMPT_HEADER, DUE_HEADER}
_UNREACHABLE = (aiormq.exceptions.AMQPConnectionError, ConnectionError, OSError, TimeoutError)
_REFUSED = (aiormq.exceptions.AuthenticationError, aiormq.exceptions.ConnectionNotAllowed)
_TRANSIENT = (
    *_UNREACHABLE,
    aiormq.exceptions.ChannelInvalidStateError,
    aiormq.exceptions.DeliveryError,
)
DRIVER_ERRORS = (
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
    *_UNREACHABLE,
)
"""The driver exceptions the transport catches and translates with :func:`transport_error`."""


def transport_error(doing: str, exc: BaseException) -> errors.TransportError:
    """Translate a driver exception: transient if the broker is unreachable or busy.

    A returned (unroutable) message is a plain :class:`~conveyor.errors.TransportError`:
    the outbox relay spends an attempt on it and parks it in the end, where
    operators see it, instead of retrying it forever as an outage.
    """
    if isinstance(exc, aiormq.exceptions.PublishError):  # a basic.return: unroutable, retrying is no cure
        code, reason = getattr(exc.frame, "reply_code", "?"), getattr(exc.frame, "reply_text", "")
        return errors.TransportError(
            f"RabbitMQ {doing} failed: the broker returned the message ({code} {reason}): "
            "no queue is bound to its routing key"
        )
    text = f"RabbitMQ {doing} failed: {type(exc).__name__}: {exc}"
    if isinstance(exc, _REFUSED):
        return errors.TransportError(text + " (check the user, password and vhost of the URL)")
    if isinstance(exc, _TRANSIENT):
        return errors.TransientTransportError(text)
    return errors.TransportError(text)


def _text(value: Any) -> str:
    """A header value from any client as text (pamqp gives bytes, ints, datetimes...)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def _int(value: Any, default: int) -> int:
    try:
        return int(_text(value))
    except ValueError:
        return default


def outgoing_properties(message: WireMessage) -> Basic.Properties:
    """AMQP properties of a wire message: headers table, content type, id, persistent."""
    headers: dict[str, Any] = {}
    content_type = None
    for name, value in message.headers.items():
        if name.lower() == "content-type":
            content_type = value
        else:
            headers[name] = value
    if message.key is not None:
        headers[KEY_HEADER] = message.key
    return Basic.Properties(
        content_type=content_type,
        headers=headers,
        delivery_mode=_PERSISTENT,
        message_id=message.message_id,
    )


def incoming(raw: aiormq.abc.DeliveredMessage, *, trusted: bool = True) -> tuple[WireMessage, int, int | None]:
    """Read a delivery: the wire message, its attempt and its due time (epoch ms), if any.

    A content header :mod:`~conveyor.transports.rabbit_frames` had to make
    readable gives a message whose ``unreadable`` says why. A message RabbitMQ
    dead-lettered past a queue's delivery limit (``x-first-death-reason``
    ``delivery_limit``) gets the ``conveyor-dlq-*`` reason Conveyor would have
    written (error type ``DeliveryLimit``, the handler), unless it has one.

    Args:
        raw: the delivery.
        trusted: it came back through our delay tiers. A message routed by the
            topic exchange is a producer's: its attempt and due headers are
            ignored (a producer could skip every retry or park a message).
    """
    props = raw.header.properties
    headers: dict[str, str] = {}
    key = due = unreadable = death = death_queue = None
    attempt, returns = 1, 0
    # The broker sets x-delivery-count only on a redelivery; on a first delivery the header is a producer's.
    redelivered = bool(raw.redelivered)
    for name, value in (props.headers or {}).items():
        if value is None:
            continue  # an AMQP void is no value: a null attribute is a missing one
        if name not in _INTERNAL:
            if name == rabbit_frames.UNREADABLE and (reason := rabbit_frames.unreadable_reason(value)) is not None:
                unreadable = reason
                continue
            headers[name] = _text(value)
        elif name == KEY_HEADER:
            key = _text(value)
        elif name == ATTEMPT_HEADER and trusted:
            attempt = _int(value, 1)
        elif name == DELIVERY_COUNT and redelivered:
            returns = _int(value, 0)
        elif name == DUE_HEADER and trusted:
            due = _int(value, 0)
        elif name == "x-first-death-reason":
            death = _text(value)
        elif name == "x-first-death-queue":
            death_queue = _text(value)
    if death == "delivery_limit" and DLQ_HEADER + "error-type" not in headers:
        headers |= _over_limit(death_queue or "?")
    if props.content_type:
        headers["content-type"] = props.content_type
    if key is None:
        key = binary_partition_key(headers)
    # message_id is the only id a RabbitMQ message keeps across redeliveries (copies keep it too);
    # a message published without one has none (see conveyor.plain).
    message = WireMessage(raw.body, headers, key, props.message_id or None, unreadable)
    return message, max(attempt, 1) + returns, due


def _over_limit(queue: str) -> dict[str, str]:
    """The ``conveyor-dlq-*`` reason of a message RabbitMQ dead-lettered past ``queue``'s delivery limit."""
    head, _, subscription = queue.partition(".")
    reason = {
        DLQ_HEADER + "error-type": "DeliveryLimit",
        DLQ_HEADER + "error": (
            f"RabbitMQ dead-lettered it from queue {queue} past the queue's delivery limit (x-delivery-limit): "
            "it was delivered that often without being settled"
        ),
    }
    if head.endswith("-limited"):
        reason[DLQ_HEADER + "handler"] = subscription
    return reason


def copy_properties(raw: aiormq.abc.DeliveredMessage, attempt: int, due: int | None) -> Basic.Properties:
    """Properties of a delayed copy: same message, next attempt (user_id and expiry dropped)."""
    props = raw.header.properties
    dropped = _BROKER_HEADERS | {ATTEMPT_HEADER, DUE_HEADER}  # ours are set below; a producer's never pass
    headers = {k: v for k, v in (props.headers or {}).items() if k not in dropped}
    headers[ATTEMPT_HEADER] = attempt
    if due is not None:
        headers[DUE_HEADER] = due
    return Basic.Properties(
        content_type=props.content_type, content_encoding=props.content_encoding, headers=headers,
        delivery_mode=_PERSISTENT, correlation_id=props.correlation_id, reply_to=props.reply_to,
        message_id=props.message_id, timestamp=props.timestamp, message_type=props.message_type,
        app_id=props.app_id,
    )  # fmt: skip


def tier_ms(tiers: Sequence[float], delay: float) -> int:
    """The delay tier (milliseconds) a delay rounds up to; the largest one if none is long enough."""
    return round(next((t for t in tiers if t >= delay), tiers[-1]) * 1000)


def tier_arguments(ms: int) -> FieldTable:
    """Arguments of a delay tier's queue: quorum, TTL ``ms``, at-least-once dead-lettering to the default exchange."""
    return {
        "x-queue-type": "quorum",
        "x-message-ttl": ms,
        "x-dead-letter-exchange": "",
        "x-dead-letter-strategy": "at-least-once",  # kept until the target queue confirmed it
        "x-overflow": "reject-publish",  # at-least-once needs it (else RabbitMQ falls back to at-most-once)
    }


def tier_name(exchange: str, ms: int) -> str:
    """The fanout exchange and quorum queue of a delay tier: ``<exchange>-delay-quorum.<ms>ms``.

    Not ``<exchange>-delay.<ms>ms``: those were classic queues (at-most-once
    dead-lettering) and a queue's type cannot change in place.
    """
    return f"{exchange}-delay-quorum.{ms}ms"
