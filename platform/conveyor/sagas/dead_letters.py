"""A saga command dead-lettered by a participant's worker fails its step: the worker tells the saga.

A participant that cannot handle a command (its handler raised until its
attempts were spent, rejected it, or the command is poison) never replies;
without a word, the saga would wait for the step's timeout. So when a worker
dead-letters a message that carries a saga's reply routing (``sagareply``,
``sagaid``, ``sagatoken``: a command, never a reply or a timer), it also
publishes a ``conveyor.saga.reply`` with ``sagaresult=deadlettered`` and the
dead letter's reason to the saga's topic. The saga fails the step as on a
timeout: what was done is undone, this step included, since the dead letter
may yet be replayed (see :mod:`conveyor.sagas.engine`).

The notice's id derives from the handler and the command's id, so a command
dead-lettered twice (a redelivery of the same message) tells the saga once.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from conveyor import attributes, envelope, errors, ports
from conveyor.sagas import wire

log = logging.getLogger("conveyor.sagas")

_IDS = uuid.UUID("0e7a4d52-1c39-4b8e-8f0d-7b5e2a9c6d14")
TRIES = (0.5, 2.0)
"""Pauses between the tries of a notice the broker could not take (an outage); then it is given up, logged."""


def notice(
    message: envelope.WireMessage, handler: str, source: str, reason: str
) -> tuple[str, envelope.Envelope] | None:
    """The saga's topic and the notice that ``message`` was dead-lettered, or None if it is no saga command.

    Args:
        message: the dead-lettered message as the broker delivered it.
        handler: the handler that dead-lettered it.
        source: the CloudEvents ``source`` of the notice (the worker's).
        reason: why it was dead-lettered (kept in the saga's step log).
    """
    try:
        command = envelope.decode(message)
        topic, extensions = wire.reply_to(command, failed=True)
    except (errors.InvalidMessage, errors.ConfigurationError):
        return None  # not a CloudEvent, or no saga command: nobody waits for its reply
    extensions[wire.RESULT] = wire.DEAD_LETTERED
    if command.tenant is not None:
        extensions[attributes.TENANT] = command.tenant
    event = envelope.create(
        wire.REPLY,
        {"reason": f"dead-lettered by {handler}: {reason}"[:1000]},
        source=source,
        key=extensions[wire.INSTANCE],
        correlationid=command.correlationid or command.id,
        causationid=command.id,
        traceparent=command.traceparent,
        tracestate=command.tracestate,
        extensions=extensions,
    )
    event.id = str(uuid.uuid5(_IDS, f"{handler}\n{command.scoped_id}"))
    return topic, event


async def tell_saga(
    transport: ports.Transport, message: envelope.WireMessage, handler: str, source: str, reason: str
) -> None:
    """If ``message`` is a saga's command, publish to its saga that it was dead-lettered. Never raises.

    The broker just took the dead letter, so it is up: a notice it cannot take
    is tried again twice, then given up with an error logged (the step's
    timeout fails the step instead).
    """
    try:
        found = notice(message, handler, source, reason)
        if found is None:
            return
        topic, event = found
        wire_message = envelope.to_binary(event, transport.binary_prefix)
        for pause in (*TRIES, None):
            try:
                await transport.publish(topic, wire_message)
                return
            except errors.TransientTransportError:
                if pause is None:
                    raise
                await asyncio.sleep(pause)
    except Exception as exc:
        log.error(
            "%s dead-lettered a command of saga instance %s but could not tell the saga (%s); "
            "the step fails when its timeout expires",
            handler, message.key, exc,
        )  # fmt: skip
