"""Our NATS header parsing gives exactly what nats-py's own gives, for any header block."""

from __future__ import annotations

from conveyor.transports.nats_wire import WireClient, parse_header_lines
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.client import Client

_piece = st.one_of(
    st.binary(max_size=40),
    st.sampled_from(
        [
            b"ce-id",
            b" x",
            b"\x1cname",
            b"a b",
            b"\xff",
            b"\xc3\xa9",
            b":",
            b"\t",
            b"",
            b"\x85",
            b"NATS/1.0",
            b"\xe2\x82",
            b"\xc3",
            b"\xed\xa0\x80",
            b"\xf0\x9f\x98",
            b"\xa0x",
            b"\r",
            b"\n",
            b"\x0b",
            b"\xc2\xa0",
        ]
    ),
)
_line = st.builds(lambda n, sep, v: n + sep + v, _piece, st.sampled_from([b":", b": ", b"", b"::"]), _piece)
_block = st.lists(_line, max_size=12).map(lambda lines: b"\r\n".join([b"NATS/1.0", *lines]) + b"\r\n\r\n")


@given(_block)
@settings(max_examples=2000, deadline=None)
def test_same_result_as_the_library_for_any_block(raw: bytes) -> None:
    assert parse_header_lines(raw) == Client._parse_header_lines(raw)


def test_a_cloudevent_header_block_parses_and_the_client_uses_the_fast_parser() -> None:
    raw = b"NATS/1.0\r\nce-id: e-1\r\nce-source: svc\r\ncontent-type: application/json\r\nNats-Msg-Id: e-1\r\n\r\n"
    expected = {"ce-id": "e-1", "ce-source": "svc", "content-type": "application/json", "Nats-Msg-Id": "e-1"}
    assert parse_header_lines(raw) == expected
    assert WireClient._parse_header_lines is parse_header_lines
