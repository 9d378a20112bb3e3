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


# Structured mode keeps the data member byte for byte.

_HEAD = b'{"specversion":"1.0","id":"e-1","source":"shop","type":"t","datacontenttype":"application/json","data":'


def structured(data: bytes) -> WireMessage:
    return WireMessage(_HEAD + data + b"}", {"content-type": envelope.STRUCTURED})


def structured_event(members: str) -> WireMessage:
    return WireMessage(members.encode(), {"content-type": envelope.STRUCTURED})


def binary(**attrs: str) -> WireMessage:
    headers = {"ce-id": "e-1", "ce-specversion": "1.0", "ce-type": "t", "ce-source": "shop"}
    headers.update({f"ce-{name}": value for name, value in attrs.items()})
    return WireMessage(b"{}", headers)


EXACT_DATA = {
    "30-digit integer": b"123456789012345678901234567890",
    "5000-digit number": b"9" * 5000,
    "floats": b"[1.10, 1e5, -0.0, 2.50E-3]",
    "unicode escapes": '{"s": "\\u00e9\\ud83d\\ude00 é"}'.encode(),
    "odd whitespace": b'{ "b" :\t[ 1 ,\n {"a" : {} } ] ,"a":null\r\n}',
    "string": b'"text"',
}


@pytest.mark.parametrize("data", EXACT_DATA.values(), ids=EXACT_DATA.keys())
def test_structured_data_is_kept_byte_for_byte(data: bytes) -> None:
    assert envelope.decode(structured(data)).data == data


@pytest.mark.parametrize("data", EXACT_DATA.values(), ids=EXACT_DATA.keys())
def test_structured_reencoding_keeps_data_bytes(data: bytes) -> None:
    reencoded = envelope.to_structured(envelope.decode(structured(data)))
    assert envelope.decode(reencoded).data == data


def test_structured_string_data_with_non_json_content_type_is_its_utf8() -> None:
    members = '"specversion":"1.0","id":"e","source":"s","type":"t","datacontenttype":"text/plain"'
    wire = structured_event("{" + members + ',"data":"caf\\u00e9"}')
    assert envelope.decode(wire).data == "café".encode()


MALFORMED = {
    "invalid UTF-8": _HEAD + b'"\xff"}',
    "10,000-deep": _HEAD + b"[" * 10_000 + b"]" * 10_000 + b"}",
    "NaN": _HEAD + b"NaN}",
    "Infinity": _HEAD + b"[-Infinity]}",
    "trailing data": _HEAD + b"1} {}",
    "unterminated": _HEAD + b'"abc}',
    "missing value": _HEAD + b"}",
    "control character in string": _HEAD + b'"a\x01b"}',
}


@pytest.mark.parametrize("body", MALFORMED.values(), ids=MALFORMED.keys())
def test_structured_malformed_body_is_invalid(body: bytes) -> None:
    with pytest.raises(errors.InvalidMessage):
        envelope.decode(WireMessage(body, {"content-type": envelope.STRUCTURED}))


def test_structured_duplicate_member_is_invalid() -> None:
    wire = structured_event('{"specversion":"1.0","id":"e-1","source":"s","type":"t","id":"e-2"}')
    with pytest.raises(errors.InvalidMessage, match="duplicate") as caught:
        envelope.decode(wire)
    assert caught.value.field == "id"


def test_check_json_accepts_a_5000_digit_number() -> None:
    envelope.check_json(b"[" + b"7" * 5000 + b"]")


def test_check_json_refuses_malformed_data() -> None:
    with pytest.raises(errors.InvalidMessage) as caught:
        envelope.check_json(b'{"a": ')
    assert caught.value.field == "data"


# Every attribute a producer sends is validated.


def test_id_of_128_characters_is_valid() -> None:
    assert envelope.decode(binary(id="i" * 128)).id == "i" * 128


def test_id_longer_than_128_characters_is_invalid() -> None:
    with pytest.raises(errors.InvalidMessage) as caught:
        envelope.decode(binary(id="i" * 129))
    assert caught.value.field == "id"


@pytest.mark.parametrize("control", ["\x00", "\n", "\r", "\t", "\x1b", "\x7f", "\x80", "\x85", "\x9f"])
def test_id_with_control_character_is_invalid(control: str) -> None:
    with pytest.raises(errors.InvalidMessage) as caught:
        envelope.decode(binary(id=f"e{control}1"))
    assert caught.value.field == "id"


@pytest.mark.parametrize(
    ("name", "value"),
    [("id", "5"), ("source", "1"), ("specversion", "1.0"), ("type", "true"), ("subject", "3"), ("time", "1")],
)
def test_structured_non_string_context_attribute_is_invalid(name: str, value: str) -> None:
    members = {"specversion": '"1.0"', "id": '"e-1"', "source": '"s"', "type": '"t"', name: value}
    wire = structured_event("{" + ",".join(f'"{k}":{v}' for k, v in members.items()) + "}")
    with pytest.raises(errors.InvalidMessage, match="string") as caught:
        envelope.decode(wire)
    assert caught.value.field == name


def test_structured_non_string_datacontenttype_is_invalid() -> None:
    wire = structured_event('{"specversion":"1.0","id":"e-1","source":"s","type":"t","datacontenttype":5,"data":1}')
    with pytest.raises(errors.InvalidMessage) as caught:
        envelope.decode(wire)
    assert caught.value.field == "datacontenttype"


def test_structured_number_and_boolean_extensions_are_kept_as_their_text() -> None:
    wire = structured_event('{"specversion":"1.0","id":"e-1","source":"s","type":"t","amount":12.50,"vip":true}')
    assert envelope.decode(wire).extensions == {"amount": "12.50", "vip": "true"}


@pytest.mark.parametrize("value", ["1.5", "abc", " 3", "3_0", "\u0663", "0x10"])
def test_attempt_that_is_not_an_integer_is_invalid(value: str) -> None:
    with pytest.raises(errors.InvalidMessage) as caught:
        envelope.decode(binary(attempt=value))
    assert caught.value.field == "attempt"


@pytest.mark.parametrize("value", ["true", "1.5", '"2.0"'])
def test_structured_attempt_that_is_not_an_integer_is_invalid(value: str) -> None:
    wire = structured_event(f'{{"specversion":"1.0","id":"e-1","source":"s","type":"t","attempt":{value}}}')
    with pytest.raises(errors.InvalidMessage) as caught:
        envelope.decode(wire)
    assert caught.value.field == "attempt"


@pytest.mark.parametrize(("value", "expected"), [("99999", 10_000), ("0", 1), ("-5", 1), ("7", 7)])
def test_attempt_is_clamped_to_1_through_10000(value: str, expected: int) -> None:
    assert envelope.decode(binary(attempt=value)).attempt == expected


@pytest.mark.parametrize("name", ["foo-bar", "foo_bar", "foo bar", "tenant.id", "", "x" * 65])
def test_invalid_extension_name_is_invalid(name: str) -> None:
    with pytest.raises(errors.InvalidMessage) as caught:
        envelope.decode(binary(**{name: "v"}))
    assert caught.value.field == name


def test_structured_invalid_extension_name_is_invalid() -> None:
    wire = structured_event('{"specversion":"1.0","id":"e-1","source":"s","type":"t","my_ext":"v"}')
    with pytest.raises(errors.InvalidMessage) as caught:
        envelope.decode(wire)
    assert caught.value.field == "my_ext"


def test_extension_name_of_64_characters_is_valid() -> None:
    assert envelope.decode(binary(**{"x" * 64: "v"})).extensions == {"x" * 64: "v"}


@pytest.mark.parametrize("value", ["a\x00b", "a\r\nb", "\x1b[31m", "a\x85"])
def test_attribute_value_with_control_character_is_invalid(value: str) -> None:
    with pytest.raises(errors.InvalidMessage) as caught:
        envelope.decode(binary(subject=value))
    assert caught.value.field == "subject"


def test_attribute_value_longer_than_4096_characters_is_invalid() -> None:
    with pytest.raises(errors.InvalidMessage) as caught:
        envelope.decode(binary(tenant="v" * 4097))
    assert caught.value.field == "tenant"


def test_attribute_value_of_4096_characters_is_valid() -> None:
    assert envelope.decode(binary(subject="v" * 4096)).subject == "v" * 4096


def test_partitionkey_longer_than_255_characters_is_invalid() -> None:
    with pytest.raises(errors.InvalidMessage) as caught:
        envelope.decode(binary(partitionkey="k" * 256))
    assert caught.value.field == "partitionkey"


def test_structured_data_and_data_base64_together_are_invalid() -> None:
    wire = structured_event('{"specversion":"1.0","id":"e-1","source":"s","type":"t","data_base64":"AA==","data":1}')
    with pytest.raises(errors.InvalidMessage) as caught:
        envelope.decode(wire)
    assert caught.value.field == "data"


def test_structured_data_base64_that_is_not_a_string_is_invalid() -> None:
    wire = structured_event('{"specversion":"1.0","id":"e-1","source":"s","type":"t","data_base64":1234}')
    with pytest.raises(errors.InvalidMessage) as caught:
        envelope.decode(wire)
    assert caught.value.field == "data_base64"


def test_check_json_refuses_deep_nesting() -> None:
    with pytest.raises(errors.InvalidMessage, match="nested too deeply"):
        envelope.check_json(b"[" * 10_000 + b"]" * 10_000)


# Structured mode is the JSON event format only; attribute names are lower case as written.

_EVENT = b'{"specversion":"1.0","id":"e-1","source":"s","type":"t","data":{"n":1}}'


@pytest.mark.parametrize("content_type", ["text/plain", "application/msgpack", "application/octet-stream"])
def test_structured_body_labelled_another_media_type_is_not_a_cloudevent(content_type: str) -> None:
    with pytest.raises(errors.InvalidMessage, match="not a CloudEvent"):
        envelope.decode(WireMessage(_EVENT, {"content-type": content_type}))


@pytest.mark.parametrize(
    "content_type",
    [
        "application/cloudevents+msgpack",
        "application/cloudevents+avro",
        "application/cloudevents",
        "application/cloudevents-batch+json",
    ],
)
def test_cloudevents_content_type_other_than_the_json_format_is_invalid(content_type: str) -> None:
    with pytest.raises(errors.InvalidMessage, match="application/cloudevents\\+json") as caught:
        envelope.decode(WireMessage(_EVENT, {"content-type": content_type}))
    assert caught.value.field == "content-type"


@pytest.mark.parametrize(
    "content_type",
    ["application/cloudevents+json; charset=utf-8", "Application/CloudEvents+JSON", "application/json", None],
)
def test_structured_event_with_the_json_format_or_plain_json_or_no_type_decodes(content_type: str | None) -> None:
    headers = {} if content_type is None else {"content-type": content_type}
    assert envelope.decode(WireMessage(_EVENT, headers)).json() == {"n": 1}


@pytest.mark.parametrize("prefix", ["ce-", "ce_", "cloudEvents_", "cloudEvents:"])
def test_binary_extension_name_with_upper_case_is_invalid(prefix: str) -> None:
    headers = {prefix + name: value for name, value in (("id", "e-1"), ("specversion", "1.0"), ("type", "t"))}
    headers |= {prefix + "source": "s", prefix + "MyExt": "v"}
    with pytest.raises(errors.InvalidMessage, match="lower-case") as caught:
        envelope.decode(WireMessage(b"{}", headers))
    assert caught.value.field == "MyExt"


@pytest.mark.parametrize("name", ["MyExt", "ID"])
def test_structured_attribute_name_with_upper_case_is_invalid(name: str) -> None:
    wire = structured_event('{"specversion":"1.0","id":"e-1","source":"s","type":"t","' + name + '":"v"}')
    with pytest.raises(errors.InvalidMessage, match="lower-case") as caught:
        envelope.decode(wire)
    assert caught.value.field == name
