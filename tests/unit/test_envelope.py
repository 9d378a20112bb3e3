"""The CloudEvents envelope: both modes, every binding's prefix, and the cloudevents SDK."""

from datetime import UTC, datetime

import orjson
import pytest
from cloudevents.core.bindings import http as ce_http
from cloudevents.core.bindings import kafka as ce_kafka
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from conveyor import envelope, errors
from conveyor.envelope import WireMessage


def sample() -> envelope.Envelope:
    return envelope.Envelope(
        id="e-1",
        source="shop",
        type="orders.placed",
        data=b'{"order_id":"o-1"}',
        time=datetime(2026, 11, 22, 10, 0, 0, 123000, tzinfo=UTC),
        subject="orders/o-1",
        partitionkey="o-1",
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        correlationid="c-1",
        causationid="p-1",
        attempt=3,
        extensions={"tenant": "acme"},
    )


@pytest.mark.parametrize("prefix", [envelope.KAFKA_PREFIX, envelope.HTTP_PREFIX, envelope.AMQP_PREFIX, "cloudEvents:"])
def test_binary_mode_round_trips_with_each_binding_prefix(prefix: str) -> None:
    assert envelope.decode(envelope.to_binary(sample(), prefix)) == sample()


def test_structured_mode_round_trips() -> None:
    wire = envelope.to_structured(sample())
    assert wire.headers["content-type"] == envelope.STRUCTURED
    assert envelope.decode(wire) == sample()


def test_structured_mode_without_content_type_is_detected() -> None:
    wire = envelope.to_structured(sample())
    assert envelope.decode(WireMessage(wire.body, {})) == sample()


def test_binary_data_uses_data_base64_in_structured_mode() -> None:
    event = sample().evolve(data=b"\x00\xff", datacontenttype=envelope.OCTET_STREAM)
    wire = envelope.to_structured(event)
    assert "data_base64" in orjson.loads(wire.body)
    assert envelope.decode(wire).data == b"\x00\xff"


def test_our_binary_http_message_parses_with_the_cloudevents_sdk() -> None:
    wire = envelope.to_binary(sample(), envelope.HTTP_PREFIX)
    event = ce_http.from_http(ce_http.HTTPMessage(headers=wire.headers, body=wire.body), JSONFormat())
    assert (event.get_id(), event.get_source(), event.get_type()) == ("e-1", "shop", "orders.placed")
    assert event.get_extension("correlationid") == "c-1"
    assert event.get_data() == {"order_id": "o-1"}


def test_our_structured_message_parses_with_the_cloudevents_sdk() -> None:
    wire = envelope.to_structured(sample())
    event = ce_http.from_http(ce_http.HTTPMessage(headers=wire.headers, body=wire.body), JSONFormat())
    assert (event.get_id(), event.get_subject(), event.get_data()) == ("e-1", "orders/o-1", {"order_id": "o-1"})


def test_our_kafka_message_parses_with_the_cloudevents_sdk() -> None:
    wire = envelope.to_binary(sample(), envelope.KAFKA_PREFIX)
    message = ce_kafka.KafkaMessage(
        headers={k: v.encode() for k, v in wire.headers.items()}, key=wire.key, value=wire.body
    )
    event = ce_kafka.from_kafka(message, JSONFormat())
    assert (event.get_id(), event.get_extension("partitionkey")) == ("e-1", "o-1")


def sdk_event() -> CloudEvent:
    return CloudEvent(
        attributes={
            "id": "sdk-1",
            "source": "https://other.example/svc",
            "type": "com.example.order",
            "specversion": "1.0",
            "datacontenttype": "application/json",
            "subject": "s-1",
            "time": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
            "partitionkey": "k-1",
        },
        data={"order_id": "o-9", "total_cents": 5},
    )


@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_sdk_http_message_decodes(mode: str) -> None:
    convert = ce_http.to_binary if mode == "binary" else ce_http.to_structured
    message = convert(sdk_event(), JSONFormat())
    decoded = envelope.decode(WireMessage(message.body, dict(message.headers)))
    assert (decoded.id, decoded.source, decoded.subject, decoded.key) == (
        "sdk-1",
        "https://other.example/svc",
        "s-1",
        "k-1",
    )
    assert decoded.json() == {"order_id": "o-9", "total_cents": 5}


@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_sdk_kafka_message_decodes(mode: str) -> None:
    convert = ce_kafka.to_binary if mode == "binary" else ce_kafka.to_structured
    message = convert(sdk_event(), JSONFormat())
    headers = {k: v.decode() for k, v in message.headers.items()}
    key = message.key.decode() if isinstance(message.key, bytes) else message.key
    decoded = envelope.decode(WireMessage(message.value, headers, key=key))
    assert (decoded.id, decoded.time, decoded.key) == ("sdk-1", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), "k-1")


def test_missing_required_attribute_names_the_field() -> None:
    wire = WireMessage(b"{}", {"ce-id": "x", "ce-specversion": "1.0", "ce-type": "t"})
    with pytest.raises(errors.InvalidMessage, match="source") as caught:
        envelope.decode(wire)
    assert caught.value.field == "source"


def test_wrong_specversion_is_invalid() -> None:
    wire = WireMessage(b"{}", {"ce-id": "x", "ce-specversion": "0.3", "ce-type": "t", "ce-source": "s"})
    with pytest.raises(errors.InvalidMessage, match="specversion"):
        envelope.decode(wire)


def test_time_without_zone_is_invalid() -> None:
    headers = {
        "ce-id": "x",
        "ce-specversion": "1.0",
        "ce-type": "t",
        "ce-source": "s",
        "ce-time": "2026-01-01T00:00:00",
    }
    with pytest.raises(errors.InvalidMessage) as caught:
        envelope.decode(WireMessage(b"{}", headers))
    assert caught.value.field == "time"


def test_plain_bytes_are_not_a_cloudevent() -> None:
    with pytest.raises(errors.InvalidMessage, match="not a CloudEvent"):
        envelope.decode(WireMessage(b"hello", {"x-other": "1"}))


def test_structured_body_that_is_not_an_object_is_invalid() -> None:
    with pytest.raises(errors.InvalidMessage, match="JSON object"):
        envelope.decode(WireMessage(b"[1,2]", {"content-type": envelope.STRUCTURED}))


def test_non_cloudevents_headers_are_kept_apart() -> None:
    wire = envelope.to_binary(sample().evolve(headers={"x-tenant": "acme"}), envelope.HTTP_PREFIX)
    decoded = envelope.decode(wire)
    assert decoded.headers == {"x-tenant": "acme"}


def test_create_encodes_models_and_bytes() -> None:
    assert envelope.create("t", b"\x01", source="s").datacontenttype == envelope.OCTET_STREAM
    assert envelope.create("t", {"a": 1}, source="s").data == b'{"a":1}'


def test_unserialisable_data_is_a_configuration_error() -> None:
    with pytest.raises(errors.ConfigurationError, match="cannot serialise"):
        envelope.create("t", object(), source="s")
