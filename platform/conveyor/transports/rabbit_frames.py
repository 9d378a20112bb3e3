"""Content headers the AMQP client cannot decode, made decodable on our connections only.

pamqp (under aiormq) decodes a header-table field name, and every short-string
property (``message_id``, ``content_type``...), as strict UTF-8. One message
whose header name is not UTF-8 (any client writing raw bytes can send it;
RabbitMQ passes it on) makes ``pamqp.frame.unmarshal`` raise, aiormq drops the
whole connection, the broker redelivers the message to the next connection, and
so on: the consumer never sees it, the acks in hand fail at every drop, and the
quorum queue's delivery limit finally removes it.

Rather than patch pamqp's decoder, which every other AMQP client in the process
shares, our connections read the socket through :class:`FrameReader`, given to
aiormq with its public ``transport_factory`` parameter. It hands aiormq the
broker's bytes unchanged, frame by frame, except a content header pamqp could
not decode for its text: that one is decoded here leniently (an undecodable name
or property with U+FFFD replacement characters, every other byte kept),
re-encoded, and marked with the header :data:`UNREADABLE` whose value starts
with this process's :data:`TOKEN` (a producer cannot forge it) and says what was
wrong. :func:`conveyor.transports.rabbit_wire.incoming` turns the mark into
``WireMessage.unreadable``, and the runtime dead-letters the message as invalid:
its body byte for byte, its headers with what could be kept.

Checking costs little: a frame that is not a content header is passed on as
read, and a content header's names and strings are only decoded when they are
not ASCII. ``tests/unit/test_rabbit_frames.py`` fails if a pamqp upgrade stops
refusing such a frame (this module may then go) or changes the frame layout.
"""

from __future__ import annotations

import asyncio
import secrets
import struct
from typing import Any, cast

import aio_pika
import pamqp.decode
import pamqp.exceptions
import pamqp.frame
from aiormq.connection import TCPTransportFactory, TLSTransportFactory, TransportFactory
from pamqp import constants
from pamqp.commands import Basic
from pamqp.header import ContentHeader
from yarl import URL

UNREADABLE = "conveyor-unreadable"
"""The header marking a content header this module had to rewrite."""
TOKEN = secrets.token_hex(16)
"""Starts the value of :data:`UNREADABLE` when this process set it."""

_HEAD = 7  # frame type (1), channel (2), payload size (4)
_FIXED = {ord(k): n for k, n in {"t": 1, "b": 1, "B": 1, "s": 2, "u": 2, "I": 4, "i": 4, "l": 8, "L": 8,
          "f": 4, "d": 8, "D": 5, "T": 8, "V": 0, "\x00": 0}.items()}  # fmt: skip
"""Sizes of the fixed-size field values, by type octet (pamqp's ``TABLE_MAPPING``)."""
_LONG = (ord("S"), ord("x"))
_TABLE, _ARRAY = ord("F"), ord("A")
_PROPERTIES = [
    (name, str(getattr(Basic.Properties, "_" + name)), Basic.Properties.flags[name])
    for name in Basic.Properties.__slots__
]
"""Each property's name, pamqp type and flag bit, in wire order."""


def unreadable_reason(value: object) -> str | None:
    """The reason an :data:`UNREADABLE` header value gives, if this process set it; else None."""
    if isinstance(value, str) and value.startswith(TOKEN):
        return value[len(TOKEN) :].strip()
    return None


class FrameReader:
    """What aiormq reads frames from: the socket's bytes, content headers made decodable.

    It stands in for the ``asyncio.StreamReader`` aiormq's frame receiver uses
    (``readexactly``, ``read``, ``at_eof``), whatever sizes it reads in.
    """

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader
        self._out = b""
        self._at = 0

    def at_eof(self) -> bool:
        """True once every byte was handed out and the socket is at its end."""
        return self._at >= len(self._out) and self._reader.at_eof()

    async def read(self, n: int = -1) -> bytes:
        """What is buffered and then up to ``n`` bytes (all until EOF with -1) of the socket."""
        rest, self._out, self._at = self._out[self._at :], b"", 0
        return rest + await self._reader.read(n)

    async def readexactly(self, n: int) -> bytes:
        """The next ``n`` bytes (``asyncio.IncompleteReadError`` if the socket ends first)."""
        while len(self._out) - self._at < n:
            frame = await self._frame()
            rest = self._out[self._at :]
            self._out, self._at = (rest + frame if rest else frame), 0
        chunk = self._out[self._at : self._at + n]
        self._at += n
        return chunk

    async def _frame(self) -> bytes:
        head = await self._reader.readexactly(_HEAD)
        if head[:4] == b"AMQP":  # the server's protocol header (it refused our version): 8 bytes
            return head + await self._reader.readexactly(1)
        kind, channel, size = struct.unpack(">BHI", head)
        rest = await self._reader.readexactly(size + 1)
        if kind == constants.FRAME_HEADER and not readable(rest[:-1]):
            return rewritten(rest[:-1], channel) or head + rest
        return head + rest


class ReadableFrames(TransportFactory):
    """aiormq's transport factory for the URL's scheme, reading through :class:`FrameReader`."""

    def __init__(self, url: str) -> None:
        self._inner = TLSTransportFactory() if URL(url).scheme == "amqps" else TCPTransportFactory()

    async def create(self, url: URL, **kwargs: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Open the connection as aiormq would, and read it through a :class:`FrameReader`."""
        reader, writer = await self._inner.create(url, **kwargs)
        return cast(asyncio.StreamReader, FrameReader(reader)), writer


def readable(payload: bytes) -> bool:
    """Whether every field name and short string of a content header payload is UTF-8 (so pamqp decodes it).

    A payload this scan cannot follow is left to pamqp (True): it fails there as before.
    """
    try:
        _scan_properties(payload)
    except UnicodeDecodeError:
        return False
    except (IndexError, KeyError, ValueError, struct.error):
        return True
    return True


def rewritten(payload: bytes, channel: int) -> bytes | None:
    """The content header frame re-encoded with its text decoded leniently and marked; None if it is malformed."""
    problems: list[str] = []
    try:
        weight, body_size = struct.unpack(">xxHQ", payload[:12])
        at, flags = _flags(payload, 12)
        properties = Basic.Properties()
        for name, kind, flag in _PROPERTIES:
            if flags & flag:
                if kind == "shortstr":
                    size = payload[at]
                    value: Any = _text(payload[at + 1 : at + 1 + size], f"property {name}", problems)
                    at += 1 + size
                elif kind == "table":
                    used, value = _table(payload[at:], problems)
                    at += used
                else:
                    used, value = pamqp.decode.by_type(payload[at:], kind)
                    at += used
                setattr(properties, name, value)
        properties.headers = {**(properties.headers or {}), UNREADABLE: f"{TOKEN} {'; '.join(problems)}"}
        return pamqp.frame.marshal(ContentHeader(weight, body_size, properties), channel)
    except (IndexError, KeyError, TypeError, ValueError, struct.error, pamqp.exceptions.PAMQPException):
        return None


def _flags(payload: bytes, at: int) -> tuple[int, int]:
    flags, word = 0, 0
    while True:
        partial: int = struct.unpack_from(">H", payload, at)[0]
        at += 2
        flags |= partial << (word * 16)
        if not partial & 1:
            return at, flags
        word += 1


def _scan_properties(payload: bytes) -> None:
    at, flags = _flags(payload, 12)
    if payload[at:].isascii():  # often so: then every name and string is UTF-8
        return
    for _, kind, flag in _PROPERTIES:
        if flags & flag:
            if kind == "shortstr":
                size = payload[at]
                _check(payload[at + 1 : at + 1 + size])
                at += 1 + size
            elif kind == "table":
                at = _scan_table(payload, at)
            else:
                at += 1 if kind == "octet" else 8  # octet, or timestamp


def _check(raw: bytes) -> None:
    if not raw.isascii():
        raw.decode("utf-8")


def _scan_table(data: bytes, at: int) -> int:
    size: int = struct.unpack_from(">I", data, at)[0]
    at += 4
    end = at + size
    if end > len(data):
        raise ValueError("field table longer than its frame")
    if data[at:end].isascii():  # ASCII throughout: every name is UTF-8
        return end
    while at < end:
        size = data[at]
        _check(data[at + 1 : at + 1 + size])
        at = _scan_value(data, at + 1 + size)
    return end


def _scan_value(data: bytes, at: int) -> int:
    kind = data[at]
    at += 1
    if (fixed := _FIXED.get(kind)) is not None:
        return at + fixed
    if kind in _LONG:
        length: int = struct.unpack_from(">I", data, at)[0]
        return at + 4 + length
    if kind == _TABLE:
        return _scan_table(data, at)
    if kind == _ARRAY:
        size: int = struct.unpack_from(">I", data, at)[0]
        end = at + 4 + size
        at += 4
        while at < end:
            at = _scan_value(data, at)
        return end
    raise KeyError(kind)


def _text(raw: bytes, what: str, problems: list[str]) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        problems.append(f"{what} {raw!r} is not UTF-8")
        return raw.decode("utf-8", "replace")


def _table(data: bytes, problems: list[str]) -> tuple[int, dict[str, Any]]:
    size: int = struct.unpack_from(">I", data, 0)[0]
    at, end, table = 4, 4 + size, {}
    while at < end:
        length = data[at]
        name = _text(data[at + 1 : at + 1 + length], "header name", problems)
        used, table[name] = _value(data[at + 1 + length :], problems)
        at += 1 + length + used
    return end, table


def _value(data: bytes, problems: list[str]) -> tuple[int, Any]:
    kind = data[0]
    if kind == _TABLE:
        used, table = _table(data[1:], problems)
        return used + 1, table
    if kind == _ARRAY:
        size: int = struct.unpack_from(">I", data, 1)[0]
        at, end, items = 5, 5 + size, []
        while at < end:
            used, item = _value(data[at:], problems)
            items.append(item)
            at += used
        return end, items
    used, value = pamqp.decode.embedded_value(data)
    if isinstance(value, bytes):  # a long string that is not UTF-8: pamqp writes it back as a byte array
        value = bytearray(value)
    return used, value


class Connection(aio_pika.Connection):
    """aio-pika's connection, reading its socket through a :class:`FrameReader`.

    ``transport_factory`` is aiormq's own connection parameter; aio-pika passes
    its ``kwargs`` on to aiormq but keeps only the ones it knows from
    :func:`aio_pika.connect`, hence this subclass (``connection_class``).
    """

    def __init__(self, url: URL, *args: Any, **kwargs: Any) -> None:
        super().__init__(url, *args, **kwargs)
        self.kwargs["transport_factory"] = ReadableFrames(str(url))
