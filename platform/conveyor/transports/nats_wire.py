"""The wire side of the NATS transport: durable names, header blocks, outgoing headers.

A :class:`~conveyor.envelope.WireMessage` travels as a NATS message with headers: its
own headers (JetStream control headers stripped), ``Nats-Msg-Id`` for its id and
``conveyor-key`` for its ordering key (see :mod:`conveyor.transports.nats`).
"""

from __future__ import annotations

import hashlib

from nats.aio.client import Client

from conveyor import names
from conveyor.envelope import WireMessage
from conveyor.transports import nats_consume


def durable_name(subscription_name: str) -> str:
    """The JetStream durable consumer name of a subscription; deterministic and injective.

    Dots become ``_`` (``billing.charge-order`` -> ``billing_charge-order``). A
    name that already contains ``_`` also gets ``__`` and a digest of the name,
    a suffix no dots-only name can produce, so distinct names never collide.

    Raises:
        ConfigurationError: the name is not a valid identifier.
    """
    names.check("subscription name", subscription_name)
    readable = subscription_name.replace(".", "_")
    if "_" not in subscription_name:
        return readable
    return f"{readable}__{hashlib.sha256(subscription_name.encode()).hexdigest()[:10]}"


_ASCII_SPACE = " \t\n\r\x0b\x0c"
"""What ``bytes.strip()`` strips (``str.strip()`` strips more)."""


def parse_header_lines(raw: bytes) -> dict[str, str]:
    """nats-py's header-block parsing, the same result at a fraction of the cost.

    The library decodes each name and value on its own and tests every
    character of every name with a generator (``any(c.isspace() for c in
    key)``); a CloudEvent carries eight headers, so that alone cost more per
    message than the rest of our consume path. Here the block is decoded once
    (UTF-8 decoding never merges an ASCII byte into a replaced sequence, so
    splitting after decoding gives what splitting before does), a name is
    kept only if ASCII (as the library's ``decode("ascii")`` requires), and
    ``key.split() != [key]`` is the library's whitespace test (``str.split``
    splits on exactly the characters ``isspace`` accepts).
    ``tests/unit/test_nats_headers.py`` checks both agree on arbitrary input.
    """
    out: dict[str, str] = {}
    for line in raw.decode("utf-8", "replace").split("\r\n"):
        name, sep, value = line.partition(":")
        if not sep:
            continue
        key = name.strip(_ASCII_SPACE)
        if not key.isascii() or (key and key.split() != [key]):
            continue
        out[key] = value.strip(_ASCII_SPACE)
    return out


class WireClient(Client):
    """nats-py's client with :func:`parse_header_lines` (a private hook: if it goes, the library's own runs)."""

    _parse_header_lines = staticmethod(parse_header_lines)


def outgoing_headers(message: WireMessage) -> dict[str, str] | None:
    """The NATS headers of an outgoing message: its own, the dedup id and the key.

    JetStream control headers (``Nats-Msg-Id``, ``Nats-Expected-*``, ...) are
    ours to set: a copy of a consumed message (a dead letter, a replay)
    carrying a producer's would be refused for good.
    """
    headers = {k: v for k, v in message.headers.items() if not k.lower().startswith("nats-")}
    if message.message_id is not None:
        headers[nats_consume.MSG_ID_HEADER] = message.message_id
    if message.key is not None:
        headers[nats_consume.KEY_HEADER] = message.key
    return headers or None
