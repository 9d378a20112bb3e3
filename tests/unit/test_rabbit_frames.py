"""Content headers pamqp cannot decode, made decodable on Conveyor's RabbitMQ connections only.

These tests also watch the libraries: the first fails if a pamqp upgrade decodes a
header name that is not UTF-8 by itself (``rabbit_frames`` may then go), the
others read through aiormq's own frame receiver, as a connection does.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pamqp.exceptions
import pamqp.frame
import pytest
from aiormq.connection import FrameReceiver
from conveyor.transports import rabbit_frames
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.header import ContentHeader

BAD = b"bad-\xff\xfe-name"


def header_frame(headers: dict[str, object], channel: int = 1, **properties: object) -> bytes:
    """A content header frame; a header named ``bad-AA-name`` is written as :data:`BAD` (not UTF-8)."""
    frame = pamqp.frame.marshal(ContentHeader(0, 10, Basic.Properties(headers=headers, **properties)), channel)
    return frame.replace(b"bad-AA-name", BAD)


def stream(*frames: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(b"".join(frames))
    reader.feed_eof()
    return reader


async def received(*frames: bytes) -> list[object]:
    """The frames aiormq's frame receiver reads through a FrameReader."""
    receiver = FrameReceiver(rabbit_frames.FrameReader(stream(*frames)))  # type: ignore[arg-type]
    return [(await receiver.get_frame())[2] for _ in frames]


def test_pamqp_still_refuses_a_header_name_that_is_not_utf8() -> None:
    with pytest.raises(pamqp.exceptions.UnmarshalingException) as caught:
        pamqp.frame.unmarshal(header_frame({"bad-AA-name": "v"}))
    assert isinstance(caught.value.__cause__, UnicodeDecodeError)


async def test_header_name_that_is_not_utf8_is_read_with_replacement_characters_and_marked() -> None:
    deliver = pamqp.frame.marshal(Basic.Deliver("tag", 1, False, "conveyor", "orders"), 1)
    body = pamqp.frame.marshal(ContentBody(b"0123456789"), 1)
    nested = {"ok": 1, "deep": {"bad-AA-name": [1, "x"]}}
    frames = await received(deliver, header_frame({"bad-AA-name": "v", "n": nested}, message_id="m-1"), body)
    header = frames[1]
    assert isinstance(header, ContentHeader) and header.body_size == 10
    headers = header.properties.headers
    reason = rabbit_frames.unreadable_reason(headers.pop(rabbit_frames.UNREADABLE))
    assert reason is not None and "b'bad-\\xff\\xfe-name'" in reason
    assert headers == {"bad-\ufffd\ufffd-name": "v", "n": {"ok": 1, "deep": {"bad-\ufffd\ufffd-name": [1, "x"]}}}
    assert header.properties.message_id == "m-1"
    assert isinstance(frames[0], Basic.Deliver) and isinstance(frames[2], ContentBody)


async def test_short_string_property_that_is_not_utf8_is_read_and_marked() -> None:
    frame = pamqp.frame.marshal(ContentHeader(0, 1, Basic.Properties(message_id="id-AA")), 1)
    (header,) = await received(frame.replace(b"id-AA", b"id-\xc3\x28"))
    assert isinstance(header, ContentHeader)
    assert header.properties.message_id == "id-\ufffd("
    reason = rabbit_frames.unreadable_reason(header.properties.headers[rabbit_frames.UNREADABLE])
    assert reason is not None and "message_id" in reason


async def test_readable_frames_pass_through_byte_for_byte() -> None:
    frames = [
        pamqp.frame.marshal(Basic.Deliver("tag", 1, False, "conveyor", "orders"), 1),
        header_frame(
            {
                "subject": "café ☕",
                "big": "x" * 300,
                "when": datetime(2026, 1, 2, tzinfo=UTC),
                "n": [1, {"a": bytearray(b"\xff")}],
            },
            timestamp=datetime(2026, 1, 2, tzinfo=UTC),
            content_type="application/json",
        ),
        pamqp.frame.marshal(ContentBody(b"\xff" * 10), 1),
    ]
    reader = rabbit_frames.FrameReader(stream(*frames))
    assert await reader.readexactly(sum(map(len, frames))) == b"".join(frames)
    assert rabbit_frames.readable(frames[1][7:-1])


def test_producer_cannot_forge_the_unreadable_mark() -> None:
    assert rabbit_frames.unreadable_reason("forged reason") is None
    assert rabbit_frames.unreadable_reason(f"{rabbit_frames.TOKEN} why") == "why"
