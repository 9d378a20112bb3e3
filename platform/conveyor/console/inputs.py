"""Every value a console request carries is checked here before it reaches a store or the broker.

Identifiers (topics, handler, schedule and saga names) pass
:func:`conveyor.names.check`; ids are printable and bounded; counts are
bounded integers; choices are one of a fixed set. A failure raises
:class:`Refused`, which the console answers with 400 naming the field.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from urllib.parse import parse_qs

from starlette.requests import Request

from conveyor import errors, names

MAX_FORM_BYTES = 64 * 1024
"""Largest form body taken."""
MAX_FIELDS = 1100
"""Most fields in one form (a page of ids and a few more)."""
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+=-]{0,199}$")
_FORM = "application/x-www-form-urlencoded"


class Refused(Exception):
    """A request the console will not carry out, with the HTTP answer to give.

    Attributes:
        status: the HTTP status.
        message: what is wrong, for the caller.
        field: the offending input, if one is to blame.
        code: the error code of the JSON shape (derived from the status when None).
    """

    def __init__(self, status: int, message: str, field: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.code = code


Form = Mapping[str, list[str]]


async def read_form(request: Request) -> Form:
    """The request's ``application/x-www-form-urlencoded`` fields (an empty body is an empty form).

    Raises:
        Refused: another media type (415), a body over :data:`MAX_FORM_BYTES` (413),
            or one that is not UTF-8 or has too many fields (400).
    """
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise Refused(413, f"a form is at most {MAX_FORM_BYTES} bytes")
    if not body:
        return {}
    if media != _FORM:
        raise Refused(415, f"send a form ({_FORM}), not {media or '(no content type)'}")
    try:
        return parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=MAX_FIELDS)
    except (UnicodeDecodeError, ValueError) as exc:
        raise Refused(400, f"unreadable form: {exc}") from None


def one(form: Form, field: str, default: str | None = None) -> str:
    """The single value of ``field``.

    Raises:
        Refused: missing (without a default) or given more than once.
    """
    values = form.get(field)
    if not values:
        if default is None:
            raise Refused(400, f"{field} is required", field)
        return default
    if len(values) > 1:
        raise Refused(400, f"{field} is given {len(values)} times; give it once", field)
    return values[0]


def name(kind: str, value: str, field: str) -> str:
    """``value`` if it is a valid identifier (:func:`conveyor.names.check`).

    Raises:
        Refused: it is not (400 naming ``field``).
    """
    try:
        return names.check(kind, value)
    except errors.ConfigurationError as exc:
        raise Refused(400, str(exc), field) from None


def known(kind: str, value: str, field: str, choices: Collection[str]) -> str:
    """A valid identifier that is one of ``choices`` (what this application declares).

    Raises:
        Refused: invalid (400) or not declared here (404).
    """
    name(kind, value, field)
    if value not in choices:
        raise Refused(404, f"no {kind} {value!r} here", field)
    return value


def ident(value: str, field: str) -> str:
    """``value`` if it is an id: 1-200 characters of letters, digits and ``. _ : / @ + = -``.

    Raises:
        Refused: it is not (400 naming ``field``).
    """
    if not _ID.match(value):
        raise Refused(400, f"invalid {field}: 1-200 letters, digits or . _ : / @ + = -", field)
    return value


def ids(form: Form, field: str, limit: int) -> list[str]:
    """Every value of ``field`` as an id, at least one and at most ``limit``.

    Raises:
        Refused: none, too many, or one is invalid.
    """
    values = form.get(field, [])
    if not values:
        raise Refused(400, f"choose at least one ({field})", field)
    if len(values) > limit:
        raise Refused(400, f"at most {limit} at once ({field})", field)
    return [ident(value, field) for value in values]


def count(value: str | None, field: str, *, default: int, low: int, high: int) -> int:
    """A bounded integer (``default`` when absent).

    Raises:
        Refused: not an integer in ``[low, high]``.
    """
    if value is None or value == "":
        return default
    if not value.isdigit() or not low <= int(value) <= high:
        raise Refused(400, f"{field} must be a whole number from {low} to {high}", field)
    return int(value)


def choice(value: str | None, field: str, allowed: Collection[str]) -> str | None:
    """``value`` if it is one of ``allowed``; None when absent or empty.

    Raises:
        Refused: another value.
    """
    if value is None or value == "":
        return None
    if value not in allowed:
        raise Refused(400, f"{field} must be one of {', '.join(sorted(allowed))}", field)
    return value
