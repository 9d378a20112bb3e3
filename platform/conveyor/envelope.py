"""The message envelope: a CloudEvents 1.0 event, and its wire forms.

Every Conveyor message is a CloudEvent. On the wire it takes one of the two
forms of the CloudEvents protocol bindings:

* **binary mode**: the event's data is the message body; its attributes are
  headers with a binding-specific prefix (``ce_`` on Kafka, ``ce-`` on HTTP and
  NATS, ``cloudEvents_`` on AMQP) and ``datacontenttype`` travels as the
  ``content-type`` header;
* **structured mode**: the body is the whole event as JSON and the content
  type is ``application/cloudevents+json``.

:func:`decode` detects the mode the way the bindings prescribe (a CloudEvents
content type means structured, anything else binary; only the JSON event format
is supported) and accepts the header
prefixes of every binding, so a service publishing with any CloudEvents SDK,
over any broker, is understood. A message that is not a valid CloudEvent raises
:class:`~conveyor.errors.InvalidMessage` with the reason.

The envelope keeps ``data`` as encoded bytes: the handler's payload type
decides how to parse them (pydantic validates JSON bytes directly, which is
faster than parsing twice). In structured mode ``data`` is the original JSON text
of the member, byte for byte: re-serialising would turn big integers into floats.

Every attribute is producer input and is validated (:mod:`conveyor.attributes`).
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import orjson
import pydantic

from conveyor import attributes, errors, jsontext

SPEC_VERSION = attributes.SPEC_VERSION
JSON = "application/json"
STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
OCTET_STREAM = "application/octet-stream"

KAFKA_PREFIX = "ce_"
HTTP_PREFIX = "ce-"
NATS_PREFIX = "ce-"
AMQP_PREFIX = "cloudEvents_"
# Decoding accepts every binding's prefix (compared lower-cased): ``ce_``,
# ``ce-``, ``cloudEvents_`` and the ``cloudEvents:`` of AMQP binding 1.0.
_KNOWN = attributes.KNOWN
_show = jsontext.show
check_json = jsontext.check_json


@dataclass(slots=True)
class WireMessage:
    """A message as a broker carries it.

    Attributes:
        body: the payload bytes.
        headers: string headers (Kafka record headers, AMQP headers table,
            NATS headers, HTTP headers).
        key: the ordering key (Kafka record key), if any.
        message_id: the broker-level id used for deduplication (NATS
            ``Nats-Msg-Id``, AMQP ``message_id``). It equals the event id on a
            first publish; a retried or dead-lettered copy gets a fresh one,
            because JetStream deduplicates ids across the whole stream. On a
            received message without one, transports fill in what identifies
            it on every redelivery (NATS ``<stream>/<sequence>``, Kafka
            ``<topic>/<partition>/<offset>``): the id of a plain message
            (see :mod:`conveyor.plain`).
        unreadable: on a received message, why the transport could not read it
            as it was sent (a header name that is not UTF-8), if so; its
            headers then hold what could be read, its body is intact, and the
            runtime dead-letters it as invalid.
    """

    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    key: str | None = None
    message_id: str | None = None
    unreadable: str | None = None


@dataclass(slots=True)
class Envelope:
    """A CloudEvent, as handlers see it through ``ctx.message``.

    Attributes:
        id: globally unique id; also the inbox's deduplication key, so it stays
            the same on every delivery and retry of the event.
        source: the producing service (URI reference).
        type: the event type; defaults to the topic.
        data: the encoded payload.
        time: when the event happened (aware UTC), if known.
        subject: what the event is about, if given.
        datacontenttype: media type of ``data``.
        dataschema: URI of ``data``'s schema, if given.
        partitionkey: the ordering key: events with the same key are handled in order.
        traceparent: W3C trace context of the producer.
        tracestate: W3C vendor trace state.
        correlationid: id shared by every message of one business flow.
        causationid: id of the message that caused this one.
        attempt: 1 on the first delivery, incremented on each retry.
        extensions: other CloudEvents extension attributes.
        headers: transport headers that are not CloudEvents attributes.
    """

    id: str
    source: str
    type: str
    data: bytes
    time: datetime | None = None
    subject: str | None = None
    datacontenttype: str = JSON
    dataschema: str | None = None
    partitionkey: str | None = None
    traceparent: str | None = None
    tracestate: str | None = None
    correlationid: str | None = None
    causationid: str | None = None
    attempt: int = 1
    extensions: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str | None:
        """The ordering key (alias of ``partitionkey``)."""
        return self.partitionkey

    @property
    def tenant(self) -> str | None:
        """The tenant the event belongs to (the ``tenant`` extension), if any."""
        return self.extensions.get(attributes.TENANT)

    @property
    def scoped_id(self) -> str:
        """The id within its tenant: ``tenant/id``; without a tenant the id, or ``/id`` if it holds a ``/``.

        It keys everything that deduplicates by id (the inbox, the outbox, the
        brokers' message ids), so two tenants' equal ids never collide, and an
        untenanted ``acme/42`` is never tenant ``acme``'s ``42`` (a tenant
        starts with a letter or digit, never with ``/``).
        """
        tenant = self.extensions.get(attributes.TENANT)
        if tenant is not None:
            return f"{tenant}/{self.id}"
        return f"/{self.id}" if "/" in self.id else self.id

    def json(self) -> Any:
        """Parse ``data`` as JSON.

        Raises:
            InvalidMessage: the data is not valid JSON.
        """
        try:
            return orjson.loads(self.data)
        except orjson.JSONDecodeError as exc:
            raise errors.InvalidMessage(f"data is not valid JSON: {exc}", "data") from exc

    def attributes(self) -> dict[str, str]:
        """The CloudEvents context attributes and extensions as strings."""
        attrs = {"id": self.id, "source": self.source, "specversion": SPEC_VERSION, "type": self.type}
        optional = (
            ("time", format_time(self.time) if self.time else None),
            ("subject", self.subject),
            ("dataschema", self.dataschema),
            ("partitionkey", self.partitionkey),
            ("traceparent", self.traceparent),
            ("tracestate", self.tracestate),
            ("correlationid", self.correlationid),
            ("causationid", self.causationid),
        )
        for name, value in optional:
            if value is not None:
                attrs[name] = value
        if self.attempt != 1:
            attrs["attempt"] = str(self.attempt)
        attrs.update(self.extensions)
        return attrs

    def evolve(self, **changes: Any) -> Envelope:
        """Return a copy with some fields replaced."""
        return replace(self, **changes)


def new_id() -> str:
    """A fresh message id (UUID4 text)."""
    return str(uuid.uuid4())


def format_time(value: datetime) -> str:
    """RFC 3339 text of an aware datetime, in UTC with a ``Z``."""
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def encode_data(data: Any) -> tuple[bytes, str]:
    """Encode a payload; return the bytes and their content type.

    ``bytes`` pass through as ``application/octet-stream``; pydantic models and
    anything orjson can serialise (dicts, lists, str, numbers, datetimes,
    dataclasses, UUIDs) become JSON.

    Raises:
        ConfigurationError: the value cannot be serialised.
    """
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data), OCTET_STREAM
    if isinstance(data, pydantic.BaseModel):
        return data.__pydantic_serializer__.to_json(data), JSON
    try:
        return orjson.dumps(data), JSON
    except TypeError as exc:
        raise errors.ConfigurationError(
            f"cannot serialise {type(data).__name__} as message data: {exc}; "
            "pass a pydantic model, a JSON-compatible value or bytes"
        ) from exc


def create(
    type: str,  # noqa: A002 - the CloudEvents attribute name
    data: Any,
    *,
    source: str,
    key: str | None = None,
    subject: str | None = None,
    headers: Mapping[str, str] | None = None,
    correlationid: str | None = None,
    causationid: str | None = None,
    traceparent: str | None = None,
    tracestate: str | None = None,
    extensions: Mapping[str, str] | None = None,
) -> Envelope:
    """Build a new envelope with a fresh id and the current time.

    Raises:
        ConfigurationError: data that cannot be serialised, or an extension
            whose name is not 1-64 lower-case letters and digits, that names a
            CloudEvents attribute, or whose value is not a string.
    """
    body, content_type = encode_data(data)
    for name, value in (extensions or {}).items():
        attributes.check_extension(name, value)
    return Envelope(
        id=new_id(),
        source=source,
        type=type,
        data=body,
        time=datetime.now(UTC),
        subject=subject,
        datacontenttype=content_type,
        partitionkey=key,
        correlationid=correlationid,
        causationid=causationid,
        traceparent=traceparent,
        tracestate=tracestate,
        extensions=dict(extensions) if extensions else {},
        headers=dict(headers) if headers else {},
    )


def to_binary(envelope: Envelope, prefix: str) -> WireMessage:
    """Binary-mode wire form: data as body, attributes as prefixed headers."""
    headers = dict(envelope.headers)
    for name, value in envelope.attributes().items():
        headers[prefix + name] = value
    headers["content-type"] = envelope.datacontenttype
    return WireMessage(body=envelope.data, headers=headers, key=envelope.partitionkey, message_id=envelope.scoped_id)


def to_structured(envelope: Envelope) -> WireMessage:
    """Structured-mode wire form: the whole event as JSON."""
    event: dict[str, Any] = dict(envelope.attributes())
    event["datacontenttype"] = envelope.datacontenttype
    if is_json(envelope.datacontenttype):
        event["data"] = orjson.Fragment(envelope.data) if envelope.data else None
    else:
        event["data_base64"] = base64.b64encode(envelope.data).decode("ascii")
    headers = dict(envelope.headers)
    headers["content-type"] = STRUCTURED
    return WireMessage(
        body=orjson.dumps(event), headers=headers, key=envelope.partitionkey, message_id=envelope.scoped_id
    )


_KEY_HEADERS = frozenset(prefix + "partitionkey" for prefix in ("ce_", "ce-", "cloudevents_", "cloudevents:"))


def binary_partition_key(headers: Mapping[str, Any]) -> str | None:
    """The CloudEvents ``partitionkey`` of a binary-mode message's headers (any binding's prefix), if any.

    Transports use it as the ordering key of messages from producers that set
    no broker-level key, so per-key order holds for them too.
    """
    for name, value in headers.items():
        # every key header name ends in "y" (any case): a cheap test before lower-casing
        if name[-1:] in "yY" and name.lower() in _KEY_HEADERS and value:
            return value if isinstance(value, str) else str(value)
    return None


def decode(message: WireMessage) -> Envelope:
    """Read a CloudEvent from a wire message, in either mode.

    Raises:
        InvalidMessage: the message is not a valid CloudEvent; the text says why.
    """
    attrs: dict[str, str] = {}
    plain: dict[str, str] = {}
    content_type: str | None = None
    for name, value in message.headers.items():
        kind, attribute = _HEADER_ATTRIBUTES.get(name) or _header_attribute(name)
        if kind is _ATTRIBUTE:
            attrs[attribute] = value
        elif kind is _CONTENT_TYPE:
            content_type = value
        else:
            plain[name] = value
    if content_type is not None and content_type.lower().startswith("application/cloudevents"):
        _check_event_format(content_type)
        return _decode_structured(message, plain)
    if not attrs and looks_structured(message.body, content_type):
        # Structured mode without a content type: the NATS binding's baseline,
        # and (labelled JSON) what many hand-written producers send.
        return _decode_structured(message, plain)
    if not attrs:
        raise errors.InvalidMessage(
            "not a CloudEvent: no ce-* attribute headers and the body is not a structured "
            "CloudEvent (JSON object with specversion)"
        )
    attrs.setdefault("datacontenttype", content_type or JSON)
    return _from_attributes(attrs, message.body, plain, message.key)


_ATTRIBUTE, _CONTENT_TYPE, _OTHER = "attribute", "content-type", "other"
_HEADER_ATTRIBUTES: dict[str, tuple[str, str]] = {}
"""Header name -> (what it is, attribute name): a bounded cache of :func:`_header_attribute`."""


def _header_attribute(name: str) -> tuple[str, str]:
    # The prefix is compared lower-cased (the bindings spell it ``ce_``, ``ce-``,
    # ``cloudEvents_``); the attribute name is kept as written, so an upper-case
    # one is refused by :func:`conveyor.attributes.check` as CloudEvents requires.
    # (HTTP header names are case-insensitive: the HTTP layer lower-cases them.)
    lower = name.lower()
    head = lower[:3]
    if head == "ce_" or head == "ce-":
        found = (_ATTRIBUTE, name[3:])
    elif lower.startswith("cloudevents") and lower[11:12] in ("_", ":"):
        found = (_ATTRIBUTE, name[12:])
    elif lower == "content-type":
        found = (_CONTENT_TYPE, "")
    else:
        found = (_OTHER, "")
    if len(_HEADER_ATTRIBUTES) < 4096:
        _HEADER_ATTRIBUTES[name] = found
    return found


def looks_structured(body: bytes, content_type: str | None) -> bool:
    """Whether a message without CloudEvents attribute headers is a structured event all the same.

    True for a body that looks like one (a JSON object naming ``specversion``)
    labelled with no content type (the NATS binding's baseline) or a JSON one
    (``application/json``, ``*+json``: what hand-written producers send). A body
    labelled anything else (``text/plain``, ``application/msgpack``) is what its
    label says, not an event.
    """
    if content_type is not None and content_type.strip() and not is_json(content_type):
        return False
    head = body[:512].lstrip()
    return head.startswith(b"{") and b'"specversion"' in body


def _check_event_format(content_type: str) -> None:
    """Refuse a CloudEvents content type other than the JSON event format (parameters allowed).

    Raises:
        InvalidMessage: a batch, or another event format (Avro, Protobuf, ...).
    """
    base = content_type.split(";", 1)[0].strip().lower()
    if base == STRUCTURED:
        return
    if base == BATCH:
        reason = "batched content mode is not supported: send one event per message"
    else:
        reason = f"event format {_show(base)} is not supported"
    raise errors.InvalidMessage(f"{reason}; structured mode takes {STRUCTURED}", "content-type")


def _decode_structured(message: WireMessage, plain: dict[str, str]) -> Envelope:
    event, raw_data = jsontext.object_members(message.body, "structured CloudEvent")
    content_type = event.pop("datacontenttype", None)
    if content_type is not None and not isinstance(content_type, str):
        raise errors.InvalidMessage("CloudEvents attribute 'datacontenttype' must be a string", "datacontenttype")
    content_type = content_type or JSON
    if "data_base64" in event and "data" in event:
        raise errors.InvalidMessage("a structured CloudEvent has data or data_base64, not both", "data")
    if "data_base64" in event:
        encoded = event.pop("data_base64")
        if not isinstance(encoded, str):
            raise errors.InvalidMessage("data_base64 must be a JSON string", "data_base64")
        try:
            data = base64.b64decode(encoded, validate=True)
        except ValueError as exc:
            raise errors.InvalidMessage(f"data_base64 is not valid base64: {exc}", "data_base64") from exc
    elif raw_data is not None:
        value = event.pop("data")
        with jsontext.errors_as_invalid("data", "data"):
            text = value if isinstance(value, str) and not is_json(content_type) else raw_data
            data = text.encode()
    else:
        data = b""
    attrs: dict[str, str] = {}
    for name, value in event.items():
        if value is None:
            continue
        attrs[name] = attributes.text(name, value)  # names as written: JSON is case-sensitive
    attrs["datacontenttype"] = content_type
    return _from_attributes(attrs, data, plain, message.key)


def _from_attributes(attrs: dict[str, str], data: bytes, plain: dict[str, str], key: str | None) -> Envelope:
    attributes.check(attrs)
    return Envelope(
        id=attrs["id"],
        source=attrs["source"],
        type=attrs["type"],
        data=data,
        time=attributes.parse_time(attrs.get("time")),
        subject=attrs.get("subject"),
        datacontenttype=attrs["datacontenttype"],
        dataschema=attrs.get("dataschema"),
        partitionkey=attrs.get("partitionkey") or key,
        traceparent=attrs.get("traceparent"),
        tracestate=attrs.get("tracestate"),
        correlationid=attrs.get("correlationid"),
        causationid=attrs.get("causationid"),
        attempt=attributes.parse_attempt(attrs.get("attempt")),
        extensions={k: v for k, v in attrs.items() if k not in _KNOWN} if not _KNOWN.issuperset(attrs) else {},
        headers=plain,
    )


def is_json(content_type: str) -> bool:
    """True if a media type is JSON (``application/json``, ``*+json``, ``text/json``)."""
    base = content_type.split(";", 1)[0].strip().lower()
    return base == JSON or base.endswith("+json") or base == "text/json"
