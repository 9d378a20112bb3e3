"""A hostile producer's corpus: messages no Conveyor publisher would send, in broker-neutral form.

Each :class:`Kind` builds one or more :class:`Sample` s, a body and a headers
dict as a raw client would hand them to its broker: CloudEvents attributes under
the neutral ``ce-`` prefix (each broker's adapter renames them to its binding's
prefix), ``content-type`` as a header (AMQP moves it to the ``content_type``
property), values usually ``str`` but sometimes ``int``, ``bytes`` or ``None``
where a wire carries typed headers. Every sample carries the plain header
``fault-kind`` naming its kind, so a dead letter can be traced back to it
(Conveyor passes plain headers through and keeps them on dead letters).

A sample says what must become of it:

* ``dlq``: a poison message, dead-lettered at once (or after its retries), no effect;
* ``effect``: harmless, handled exactly once like a good message (the hostile part
  is ignored: a forged attempt, a control header, a junk plain header);
* ``either``: a wire type Conveyor may coerce to text (an ``int`` id becomes
  ``"5"``) or refuse: it must be dead-lettered *or* take effect once, never both,
  never lost, never twice.

Payloads are ``{"n": int}`` where a handler could run them at all, with ``n``
unique per sample (:func:`build`): a ``dlq`` sample whose ``n`` shows up in the
ledger took effect when it should not have.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

Expect = Literal["dlq", "effect", "either"]
Header = str | int | float | bytes | list[Any] | None
STRUCTURED = "application/cloudevents+json"
CE_JSON: dict[str, Header] = {"content-type": STRUCTURED}
TYPED = "typed"
"""Wire feature: header values other than text (AMQP tables; Kafka's raw bytes and nulls)."""
NAME_CRLF = "name-crlf"
"""Wire feature: header names with spaces, names and values with CR/LF (AMQP, Kafka). On NATS the
headers are lines of a text protocol and nats-py writes them unescaped: a CR/LF injects a header line
(``ce-id: forged`` arrives as a real attribute), so such a sample is a different, valid message there."""
CONTROL = "control"
"""Wire feature: NATS JetStream control headers (handled by the NATS adapter)."""
DELIVERY_COUNT = "delivery-count"
"""Wire feature: RabbitMQ's ``x-delivery-count`` and ``x-death`` dead-lettering headers."""
RAW_NAME = "raw-name"
"""Wire feature: header names that are not UTF-8 (an AMQP table's or a Kafka record's names are any bytes).
Such a name is written here as the ``surrogateescape`` text of its bytes (``"bad-\\udcff-name"`` for
``b"bad-\\xff-name"``); the broker's producer sends the bytes. The client library may fail to decode the
whole record (aiokafka does) or frame (aiormq did)."""


@dataclass(slots=True)
class Sample:
    """One message of a kind: body, headers, and what must become of it."""

    body: bytes
    headers: dict[str, Header]
    expect: Expect
    n: int | None = None
    """The payload's ``n`` if the body carries one a handler could apply."""
    kind: str = ""
    key: bytes | None = None


@dataclass(frozen=True, slots=True)
class Kind:
    """A named builder of hostile samples."""

    name: str
    build: Callable[[Callable[[], int]], list[Sample]]
    needs: frozenset[str] = field(default_factory=frozenset)
    """Wire features the kind needs (:data:`TYPED`, :data:`NAME_CRLF`, ...); brokers lacking one skip it."""


def _id() -> str:
    return f"h-{uuid.uuid4().hex[:20]}"


_REMOVE: Any = object()
"""An attribute value meaning "leave the attribute out"."""


def binary(**attrs: Header) -> dict[str, Header]:
    """Valid binary-mode headers, with ``attrs`` overriding (or, given :data:`_REMOVE`, removing) attributes."""
    headers: dict[str, Header] = {
        "ce-specversion": "1.0",
        "ce-id": _id(),
        "ce-source": "hostile",
        "ce-type": "fault.hostile",
        "content-type": "application/json",
    }
    for name, value in attrs.items():
        header = name if name == "content-type" else "ce-" + name
        if value is _REMOVE:
            headers.pop(header, None)
        else:
            headers[header] = value
    return headers


def structured(data: Any = None, raw: bytes | None = None, **attrs: Any) -> bytes:
    """A structured-mode body: valid attributes (overridden or removed by ``attrs``), ``data`` or raw text."""
    event: dict[str, Any] = {"specversion": "1.0", "id": _id(), "source": "hostile", "type": "fault.hostile"}
    event["datacontenttype"] = "application/json"
    for name, value in attrs.items():
        if value is _REMOVE:
            event.pop(name, None)
        else:
            event[name] = value
    if raw is not None:
        text = orjson.dumps(event)
        return text[:-1] + b',"data":' + raw + b"}"
    if data is not None:
        event["data"] = data
    return orjson.dumps(event)


def payload(n: int) -> bytes:
    return orjson.dumps({"n": n})


def around(n: int, member: bytes) -> bytes:
    """``{"n": n, <member>}`` as raw JSON text (for members orjson would not write: bad bytes, huge nesting)."""
    return b'{"n": ' + str(n).encode() + b", " + member + b"}"


def _kinds() -> list[Kind]:
    kinds: list[Kind] = []

    def kind(name: str, *needs: str) -> Callable[[Callable[[Callable[[], int]], list[Sample]]], None]:
        def register(build: Callable[[Callable[[], int]], list[Sample]]) -> None:
            kinds.append(Kind(name, build, frozenset(needs)))

        return register

    def simple(name: str, expect: Expect, make: Callable[[int], tuple[bytes, dict[str, Header]]], *needs: str) -> None:
        def build(next_n: Callable[[], int]) -> list[Sample]:
            n = next_n()
            body, headers = make(n)
            return [Sample(body, headers, expect, n)]

        kinds.append(Kind(name, build, frozenset(needs)))

    # -- the attempt extension: integers are clamped and never trusted; anything else is poison
    for label, value, expect in (
        ("attempt-99999", "99999", "effect"),
        ("attempt-negative", "-7", "effect"),
        ("attempt-huge", "9" * 40, "effect"),
        ("attempt-float", "1.5", "dlq"),
        ("attempt-non-numeric", "abc", "dlq"),
    ):
        simple(label, expect, lambda n, value=value: (payload(n), binary(attempt=value)))
    simple("attempt-structured-number", "effect", lambda n: (structured({"n": n}, attempt=99999), CE_JSON))

    # -- every context attribute with a wrong JSON type (structured mode), and datacontenttype 5
    for attr in ("id", "source", "type", "specversion"):
        for label, value in (("number", 5), ("null", None), ("list", ["x"]), ("object", {"x": 1})):
            simple(
                f"{attr}-{label}",
                "dlq",
                lambda n, attr=attr, value=value: (structured({"n": n}, **{attr: value}), CE_JSON),
            )
    simple("datacontenttype-5", "dlq", lambda n: (structured({"n": n}, datacontenttype=5), CE_JSON))

    # -- missing required attributes, unknown specversion, bad attribute values
    for attr in ("id", "source", "type", "specversion"):
        simple(f"binary-missing-{attr}", "dlq", lambda n, attr=attr: (payload(n), binary(**{attr: _REMOVE})))
    simple("specversion-0.3", "dlq", lambda n: (payload(n), binary(specversion="0.3")))
    simple("specversion-2.0-structured", "dlq", lambda n: (structured({"n": n}, specversion="2.0"), CE_JSON))
    simple("id-200-chars", "dlq", lambda n: (payload(n), binary(id="i" * 200)))
    simple("id-control-char", "dlq", lambda n: (payload(n), binary(id=f"bad\x01{n}")))
    simple("time-not-rfc3339", "dlq", lambda n: (payload(n), binary(time="yesterday")))
    simple("partitionkey-300-chars", "dlq", lambda n: (payload(n), binary(partitionkey="k" * 300)))

    # -- bodies
    simple("not-json", "dlq", lambda n: (b"this is not json " + str(n).encode(), binary()))
    simple("invalid-utf8-binary", "dlq", lambda n: (around(n, b'"s": "\xff\xfe"'), binary()))
    simple("invalid-utf8-structured", "dlq", lambda n: (structured(raw=around(n, b'"s": "\xc3\x28"')), CE_JSON))
    simple("nul-bytes-body", "dlq", lambda n: (around(n, b'"s": "a\x00b"'), binary()))
    simple("deep-nesting-10000", "dlq", lambda n: (around(n, b'"d": ' + b"[" * 10_000 + b"]" * 10_000), binary()))
    simple("number-5000-digits", "dlq", lambda n: (b'{"n": ' + b"7" * 5000 + b"}", binary()))
    simple("empty-body", "dlq", lambda n: (b"", binary()))
    simple("empty-body-no-attributes", "dlq", lambda n: (b"", {}))
    simple("json-but-not-a-cloudevent", "dlq", lambda n: (payload(n), {"content-type": "application/json"}))
    simple("huge-body-over-limit", "dlq", lambda n: (around(n, b'"pad": "' + b"x" * 900_000 + b'"'), binary()))
    simple("large-body-under-limit", "effect", lambda n: (around(n, b'"pad": "' + b"y" * 200_000 + b'"'), binary()))

    # -- headers
    simple("huge-extension-attribute", "dlq", lambda n: (payload(n), binary(junk="j" * 10_000)))
    simple("huge-plain-header", "effect", lambda n: (payload(n), {**binary(), "x-junk": "j" * 60_000}))
    simple("attribute-name-with-space", "dlq", lambda n: (payload(n), {**binary(), "ce-bad name": "v"}), NAME_CRLF)
    simple("header-name-crlf", "effect", lambda n: (payload(n), {**binary(), "x-evil\r\ninjected": "v"}), NAME_CRLF)
    simple("header-value-crlf", "dlq", lambda n: (payload(n), binary(subject="a\r\nce-id: forged")), NAME_CRLF)
    # The client library cannot decode the name (aiormq used to drop the connection at every redelivery).
    simple("header-name-not-utf8", "dlq", lambda n: (payload(n), {**binary(), "bad-\udcff\udcfe-name": "v"}), RAW_NAME)

    # -- binary-mode headers of other wire types
    simple("id-as-int", "either", lambda n: (payload(n), binary(id=uuid.uuid4().int % 10**15)), TYPED)
    simple("source-as-invalid-utf8-bytes", "either", lambda n: (payload(n), binary(source=b"\xff\xfehost")), TYPED)
    simple("type-as-null", "either", lambda n: (payload(n), binary(type=None)), TYPED)
    simple("specversion-as-float", "either", lambda n: (payload(n), binary(specversion=1.0)), TYPED)
    simple("time-as-int", "dlq", lambda n: (payload(n), binary(time=1_700_000_000)), TYPED)

    # -- duplicated ids: the second copy is absorbed by the inbox (one effect for the two)
    @kind("duplicate-id")
    def duplicate(next_n: Callable[[], int]) -> list[Sample]:
        n = next_n()
        headers = binary()
        return [Sample(payload(n), headers, "effect", n), Sample(payload(n), dict(headers), "effect", n)]

    # -- content-type lies
    simple("structured-type-binary-body", "dlq", lambda n: (payload(n), {**binary(), "content-type": STRUCTURED}))
    simple(
        "structured-body-labelled-json",
        "effect",
        lambda n: (structured({"n": n}), {"content-type": "application/json"}),
    )
    simple(
        "cloudevents-batch-type",
        "dlq",
        lambda n: (b"[" + structured({"n": n}) + b"]", {"content-type": STRUCTURED.replace("+", "-batch+")}),
    )
    simple("xml-content-type-json-body", "dlq", lambda n: (payload(n), binary(**{"content-type": "application/xml"})))

    # -- data_base64
    simple("data-base64-invalid", "dlq", lambda n: (structured(data_base64="!!not base64!!"), CE_JSON))
    simple("data-base64-number", "dlq", lambda n: (structured(data_base64=12), CE_JSON))
    simple(
        "data-and-data-base64",
        "dlq",
        lambda n: (structured({"n": n}, data_base64=base64.b64encode(payload(n)).decode()), CE_JSON),
    )

    # -- extension attributes of wrong types
    simple("extension-object", "dlq", lambda n: (structured({"n": n}, myext={"a": 1}), CE_JSON))
    simple("extension-list", "dlq", lambda n: (structured({"n": n}, myext=[1, 2]), CE_JSON))
    simple("extension-bad-name", "dlq", lambda n: (structured({"n": n}, **{"my-ext": "v"}), CE_JSON))
    simple("extension-number", "effect", lambda n: (structured({"n": n}, myext=1.5e300), CE_JSON))

    # -- forged Conveyor control headers: ignored on a producer's message
    far = "99999999999999"
    simple(
        "forged-conveyor-retry-headers",
        "effect",
        lambda n: (
            payload(n),
            {
                **binary(),
                "conveyor-attempt": "99999",
                "conveyor-due": far,
                "conveyor-not-before": far,
            },
        ),
    )
    simple(
        "forged-conveyor-dlq-headers",
        "effect",
        lambda n: (
            payload(n),
            {
                **binary(),
                "conveyor-dlq-handler": "x",
                "conveyor-dlq-attempts": "99",
                "conveyor-dlq-topic": "elsewhere",
            },
        ),
    )

    # -- broker control headers
    simple(
        "forged-x-delivery-count",
        "effect",
        lambda n: (payload(n), {**binary(), "x-delivery-count": 99999}),
        DELIVERY_COUNT,
    )
    forged_death = {"x-death": [{"count": 99, "queue": "conveyor.elsewhere", "reason": "rejected"}]}
    simple(
        "forged-x-death",
        "effect",
        lambda n: (payload(n), {**binary(), **forged_death, "x-first-death-reason": "expired"}),
        DELIVERY_COUNT,
    )
    simple("nats-expected-headers-then-dead-lettered", "dlq", lambda n: (b"not json", binary()), CONTROL)

    # -- payloads the handler refuses: a list for a dict (validation), a non-integer n (the handler raises)
    simple("payload-fails-validation", "dlq", lambda n: (orjson.dumps([n, n]), binary()))
    simple("handler-raises-on-payload", "dlq", lambda n: (b'{"n": "not a number"}', binary()))
    return kinds


KINDS: list[Kind] = _kinds()


def build(kinds: list[Kind], first_n: int) -> list[Sample]:
    """Every sample of ``kinds``, numbered from ``first_n``, each labelled with its kind."""
    counter = iter(range(first_n, first_n + 10_000))
    samples: list[Sample] = []
    for kind in kinds:
        for sample in kind.build(lambda: next(counter)):
            sample.kind = kind.name
            sample.headers = {**sample.headers, "fault-kind": kind.name}  # builders may share a dict
            samples.append(sample)
    return samples
