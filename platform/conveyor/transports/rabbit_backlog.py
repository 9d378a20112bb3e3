"""Backlog of a RabbitMQ subscription: its queue's depth, by a passive declare.

The passive ``queue.declare`` answers with the queue's ready messages
(``message_count``): messages waiting, not those handed to a consumer and
unacknowledged. AMQP tells neither the unacknowledged count nor message ages
(the management plugin does, over HTTP, which the transport does not use), so
``in_flight`` and ``oldest_age_s`` are None. Delayed retries wait in delay
tiers, not in the queue, and are not counted until they come back.
"""

from __future__ import annotations

import asyncio
import contextlib

import aiormq
from aio_pika.abc import AbstractConnection

from conveyor import errors, ports
from conveyor.transports import rabbit_wire


async def queue_backlog(connection: AbstractConnection, queue: str, timeout: float) -> ports.Backlog:
    """The depth of ``queue``, read on a throwaway channel (a refused passive declare closes its channel).

    Raises:
        NotDeclared: the queue does not exist (the subscription is not declared).
        TransportError: the broker refused the declare.
        TransientTransportError: the broker did not answer within ``timeout``.
    """
    channel = None
    try:
        async with asyncio.timeout(timeout):
            channel = await connection.channel(publisher_confirms=False)
            declared = await channel.declare_queue(queue, passive=True)
    except TimeoutError as exc:
        raise errors.TransientTransportError(f"RabbitMQ did not report the depth of {queue!r} in time") from exc
    except aiormq.exceptions.ChannelNotFoundEntity as exc:
        raise errors.NotDeclared(f"RabbitMQ has no queue {queue!r}: declare the subscription first") from exc
    except rabbit_wire.DRIVER_ERRORS as exc:
        raise rabbit_wire.transport_error(f"depth of queue {queue!r}", exc) from exc
    finally:
        if channel is not None and not channel.is_closed:
            with contextlib.suppress(*rabbit_wire.DRIVER_ERRORS, TimeoutError):
                await channel.close()
    result = declared.declaration_result
    return ports.Backlog(pending=int(result.message_count or 0))
