"""Header names no well-behaved client writes: names whose bytes are not UTF-8, as a raw client can send them."""

from __future__ import annotations


class RawName(str):
    """A header name whose encoding is the given bytes, valid UTF-8 or not (aio-pika, pamqp and aiokafka
    write names with ``str.encode``, so this is how a test makes them write other bytes)."""

    raw: bytes

    def __new__(cls, raw: bytes) -> RawName:
        name = super().__new__(cls, raw.decode("latin-1"))
        name.raw = raw
        return name

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        """The raw bytes, whatever the encoding asked for."""
        return self.raw
