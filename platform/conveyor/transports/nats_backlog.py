"""Backlog of a NATS JetStream subscription, from its durable consumer's info.

* ``pending``: the consumer's ``num_pending``, messages of its filter subject
  not yet delivered;
* ``in_flight``: ``num_ack_pending``, delivered and not yet acked (this
  includes messages naked with a delay and waiting to be redelivered);
* ``oldest_age_s``: the age of the first message above the consumer's ack
  floor (the oldest not yet acked), read with a stream message get (the
  stream stores the time each message arrived); 0 when nothing is unsettled.

Nothing here creates or changes the durable: a subscription never declared is
a :class:`~conveyor.errors.TransportError`.
"""

from __future__ import annotations

from datetime import UTC, datetime

import nats.js.errors
from nats.js import JetStreamContext

from conveyor import errors, ports
from conveyor.transports import nats_consume


async def consumer_backlog(js: JetStreamContext, stream: str, durable: str, subject: str) -> ports.Backlog:
    """The backlog of durable consumer ``durable`` of ``stream``, filtered on ``subject``.

    Raises:
        NotDeclared: no such durable.
        TransportError: the server did not answer.
    """
    with nats_consume.translated(f"consumer info of {durable}"):
        try:
            info = await js.consumer_info(stream, durable)
        except nats.js.errors.NotFoundError as exc:
            raise errors.NotDeclared(f"no JetStream durable {durable} in stream {stream}: declare it first") from exc
    pending, in_flight = int(info.num_pending or 0), int(info.num_ack_pending or 0)
    age: float | None = 0.0  # nothing unsettled
    if pending + in_flight:
        age = None
        floor = info.ack_floor.stream_seq if info.ack_floor is not None else 0
        with nats_consume.translated(f"oldest message of {durable}"):
            try:
                oldest = await js.get_msg(stream, seq=(floor or 0) + 1, subject=subject, next=True)
            except nats.js.errors.NotFoundError:
                oldest = None
        if oldest is not None and oldest.time is not None:
            age = max((datetime.now(UTC) - oldest.time).total_seconds(), 0.0)
    return ports.Backlog(pending=pending, in_flight=in_flight, oldest_age_s=age)
