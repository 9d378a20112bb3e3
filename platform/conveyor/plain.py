"""Plain messages: bodies from producers that do not speak CloudEvents, for handlers that accept them.

A FastStream or Node producer, or a CDC connector, sends a JSON body with no
CloudEvents attributes. :func:`envelope.decode <conveyor.envelope.decode>`
refuses it (it is not a CloudEvent), so by default it is dead-lettered. A
handler declared with ``@on(topic, plain=True)`` (or every handler, with
``CONVEYOR_PLAIN_MESSAGES=true``) accepts it instead: :func:`read` wraps the
body in an envelope that :func:`synthesise` builds from what the broker knows
about the message.

Only a message that is not a CloudEvent at all is synthesised: one with a
CloudEvents attribute header (any binding's prefix), a CloudEvents content
type, or a body that looks like a structured CloudEvent (a JSON object with
``specversion``, labelled JSON or not at all) is decoded as one, and stays a dead letter if it is invalid.

The synthesised id is the broker's id of the message (``WireMessage.message_id``,
filled by each transport), so every redelivery of the message has the same id
and the inbox applies it once:

* RabbitMQ: the AMQP ``message_id`` property (aio-pika, FastStream and every
  aiormq client set one by default);
* NATS JetStream: the ``Nats-Msg-Id`` header, else ``<stream>/<sequence>``;
* Kafka: ``<topic>/<partition>/<offset>`` (or the id a Conveyor retry copy carries).

A message with no broker id (a RabbitMQ message without ``message_id``) gets a
fresh id at each delivery: it cannot be deduplicated across redeliveries, so a
redelivery after a lost acknowledgement applies it again. Conveyor does not
fall back to a hash of the body: two equal messages sent on purpose would then
count as one.
"""

from __future__ import annotations

import hashlib

from conveyor import attributes, envelope, errors

SOURCE_PREFIX = "conveyor:plain:"
"""The ``source`` of a synthesised envelope is this followed by the broker (``conveyor:plain:rabbitmq``)."""

_CE_PREFIXES = ("ce_", "ce-", "cloudevents_", "cloudevents:")


def is_cloudevent(message: envelope.WireMessage) -> bool:
    """Whether a wire message claims to be a CloudEvent, in either mode (valid or not).

    True with any CloudEvents attribute header, a CloudEvents content type, or
    a body that looks like a structured CloudEvent (a JSON object naming
    ``specversion``) labelled with no content type or a JSON one, the same
    rules :func:`conveyor.envelope.decode` uses.
    """
    content_type: str | None = None
    for name, value in message.headers.items():
        lower = name.lower()
        if lower.startswith(_CE_PREFIXES):
            return True
        if lower == "content-type":
            if value.lower().startswith("application/cloudevents"):
                return True
            content_type = value
    return envelope.looks_structured(message.body, content_type)


def synthesise(message: envelope.WireMessage, topic: str, broker: str) -> envelope.Envelope:
    """An envelope for a plain (non-CloudEvents) message received on ``topic``.

    Args:
        message: the wire message; its ``message_id`` becomes the event id.
        topic: the topic it was received on; it becomes the event ``type``.
        broker: the broker's name (``rabbitmq``, ``nats``, ``kafka``, ``memory``),
            named in the ``source``.

    Returns:
        An envelope with ``type`` = the topic, ``source`` = ``conveyor:plain:<broker>``,
        ``datacontenttype`` from the ``content-type`` header (else
        ``application/json``), the body as ``data``, the message key as
        ``partitionkey`` and the other headers as ``headers``. The id is the
        broker id; one longer than 128 characters or with control characters
        is replaced by ``sha256:<hex digest>`` of it (still stable); without
        one a fresh id is used (no deduplication across redeliveries).
    """
    headers: dict[str, str] = {}
    content_type = envelope.JSON
    for name, value in message.headers.items():
        if name.lower() == "content-type":
            content_type = value or envelope.JSON
        else:
            headers[name] = value
    return envelope.Envelope(
        id=_event_id(message.message_id),
        source=SOURCE_PREFIX + broker,
        type=topic,
        data=message.body,
        datacontenttype=content_type,
        partitionkey=message.key,
        headers=headers,
    )


def read(message: envelope.WireMessage, topic: str, broker: str) -> envelope.Envelope:
    """Decode a CloudEvent, or synthesise an envelope for a message that is not one.

    Raises:
        InvalidMessage: the message claims to be a CloudEvent but is not a valid one.
    """
    if is_cloudevent(message):
        return envelope.decode(message)
    return synthesise(message, topic, broker)


def _event_id(broker_id: str | None) -> str:
    if not broker_id:
        return envelope.new_id()
    try:
        return attributes.check_id(broker_id)
    except errors.InvalidMessage:
        return "sha256:" + hashlib.sha256(broker_id.encode("utf-8", "surrogatepass")).hexdigest()
