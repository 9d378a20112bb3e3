"""JSON read as sent: well-formedness checks and the raw text of members, numbers kept as text.

A structured CloudEvent's ``data`` must reach the handler byte for byte, so it
is never parsed into Python values and serialised again (a 30-digit integer
would come back as a float). The standard library's scanner returns where each
value ends; :func:`object_members` walks the top-level object with it and
slices the raw text of the member asked for. Numbers are kept as text
(:class:`Number`), so any number of digits is accepted.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from conveyor import errors

_WHITESPACE = re.compile(r"[ \t\n\r]*")


def show(text: str) -> str:
    """``text`` quoted and shortened for an error message."""
    return repr(text if len(text) <= 70 else text[:70] + "...")


@dataclass(frozen=True, slots=True)
class Number:
    """A JSON number, as its text."""

    text: str


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# Numbers stay text: no precision lost, no limit on digits.
_DECODER = json.JSONDecoder(parse_int=Number, parse_float=Number, parse_constant=_refuse_constant)
_SCANNER: Callable[[str, int], tuple[Any, int]] = _DECODER.scan_once  # type: ignore[attr-defined]


def _skip(text: str, index: int) -> int:
    match = _WHITESPACE.match(text, index)
    return match.end() if match else index


def _value(text: str, index: int) -> tuple[Any, int]:
    try:
        return _SCANNER(text, index)
    except StopIteration:
        raise json.JSONDecodeError("expected a value", text, index) from None


@contextlib.contextmanager
def errors_as_invalid(what: str, field: str | None = None) -> Iterator[None]:
    """Turn JSON and encoding errors raised inside into :class:`~conveyor.errors.InvalidMessage`."""
    try:
        yield
    except errors.InvalidMessage:
        raise
    except RecursionError as exc:
        raise errors.InvalidMessage(f"{what} is nested too deeply", field) from exc
    except ValueError as exc:  # JSONDecodeError, UnicodeError, a NaN
        raise errors.InvalidMessage(f"{what} is not valid UTF-8 JSON: {exc}", field) from exc


def check_json(data: bytes) -> None:
    """Check that ``data`` is one well-formed JSON value (numbers of any size).

    Raises:
        InvalidMessage: it is not; the field is ``data``.
    """
    with errors_as_invalid("data", "data"):
        text = data.decode("utf-8")
        end = _value(text, _skip(text, 0))[1]
        if _skip(text, end) != len(text):
            raise json.JSONDecodeError("extra data", text, end)


def object_members(body: bytes, what: str, raw: str = "data") -> tuple[dict[str, Any], str | None]:
    """The members of a JSON object, and the raw text of member ``raw`` (None if absent).

    Raises:
        InvalidMessage: not one well-formed UTF-8 JSON object, or a member name repeated.
    """
    members: dict[str, Any] = {}
    raw_data: str | None = None
    with errors_as_invalid(what):
        text = body.decode("utf-8")
        index = _skip(text, 0)
        if text[index : index + 1] != "{":
            raise errors.InvalidMessage(f"{what} must be a JSON object")
        index = _skip(text, index + 1)
        closed = text[index : index + 1] == "}"
        while not closed:
            if text[index : index + 1] != '"':
                raise json.JSONDecodeError("expected a member name", text, index)
            name, index = json.decoder.scanstring(text, index + 1)  # type: ignore[attr-defined]
            index = _skip(text, index)
            if text[index : index + 1] != ":":
                raise json.JSONDecodeError("expected ':'", text, index)
            start = _skip(text, index + 1)
            value, index = _value(text, start)
            if name in members:
                raise errors.InvalidMessage(f"duplicate member {show(name)} in {what}", name)
            members[name] = value
            if name == raw:
                raw_data = text[start:index]
            index = _skip(text, index)
            if text[index : index + 1] not in (",", "}"):
                raise json.JSONDecodeError("expected ',' or '}'", text, index)
            closed = text[index] == "}"
            index = _skip(text, index + 1)
        if index != len(text):
            raise json.JSONDecodeError("extra data", text, index)
    return members, raw_data
