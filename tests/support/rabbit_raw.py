"""Raw AMQP for hostile-input tests: a header name that is not UTF-8, as any raw client can send it."""

from __future__ import annotations

import uuid

import aio_pika
from pamqp.commands import Basic
from raw_names import RawName

CLOUDEVENT = {"specversion": "1.0", "id": "e-1", "source": "/other-service", "type": "orders.placed"}
BAD_NAME = b"bad-\xff\xfe-name"
"""A header name that is not UTF-8; Conveyor reads it as ``bad-\\ufffd\\ufffd-name``."""


async def publish_undecodable(channel: aio_pika.abc.AbstractChannel, topic: str, body: bytes) -> None:
    """Publish a binary-mode CloudEvent whose headers table also holds :data:`BAD_NAME`, confirmed."""
    headers = {f"cloudEvents_{k}": v for k, v in CLOUDEVENT.items()} | {RawName(BAD_NAME): "v"}
    properties = Basic.Properties(headers=headers, content_type="application/json", message_id=str(uuid.uuid4()))
    raw = await channel.get_underlay_channel()
    await raw.basic_publish(body, exchange="conveyor", routing_key=topic, properties=properties, mandatory=True)
