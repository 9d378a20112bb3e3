"""CloudEvents attributes as producer input: every name and value is validated before it is used.

Names are 1-64 lower-case ASCII letters and digits, as written (``MyExt`` is refused, not
read as ``myext``). CloudEvents 1.0 requires ``[a-z0-9]`` and says a name SHOULD NOT exceed
20 characters: a recommendation, so a longer name is still a valid event and is accepted up to
64 (our own bound on producer input). Values are at most 4096 characters
(``id`` 128, ``partitionkey`` 255: the outbox and inbox column widths) without control
characters; in structured mode context attributes must be JSON strings, extensions strings,
numbers or booleans (kept as their JSON text); ``time`` is RFC 3339 with a zone; ``attempt``
is an integer, clamped to 1..10,000; ``tenant`` is an identifier (:func:`conveyor.names.check_tenant`).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from conveyor import errors, jsontext, names

SPEC_VERSION = "1.0"
KNOWN = frozenset(
    {
        "id",
        "source",
        "specversion",
        "type",
        "time",
        "subject",
        "dataschema",
        "datacontenttype",
        "partitionkey",
        "traceparent",
        "tracestate",
        "correlationid",
        "causationid",
        "attempt",
    }
)
"""Attributes with a field of their own on the envelope; anything else is an extension."""
CONTEXT = frozenset({"id", "source", "specversion", "type", "time", "subject", "dataschema", "datacontenttype"})
"""Context attributes, which structured mode requires to be JSON strings."""
REQUIRED = ("id", "source", "specversion", "type")
MAX_VALUE = 4096
"""Longest attribute value accepted, in characters."""
TENANT = "tenant"
"""The CloudEvents extension naming an event's tenant (see :func:`conveyor.names.check_tenant`)."""
MAX_ATTEMPT = 10_000
"""A larger ``attempt`` extension is read as this."""

_NAME = re.compile(r"[a-z0-9]{1,64}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")  # C0, DEL, C1, lone surrogates
_INTEGER = re.compile(r"[+-]?[0-9]+")
_LIMITS = {"id": 128, "partitionkey": 255}  # the outbox and inbox column widths
_SHORTEST_LIMIT = min(_LIMITS.values())
_VALID_NAMES: set[str] = set(KNOWN)
"""Attribute names seen valid (bounded), so the common ones skip the pattern."""
_show = jsontext.show


def text(name: str, value: Any) -> str:
    """A structured-mode attribute's value as text (numbers keep their JSON text).

    Raises:
        InvalidMessage: a context attribute that is not a string, or an extension of another JSON type.
    """
    if isinstance(value, str):
        return value
    if name in CONTEXT:
        raise errors.InvalidMessage(f"CloudEvents attribute {_show(name)} must be a JSON string", name)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, jsontext.Number):
        return value.text
    raise errors.InvalidMessage(f"CloudEvents attribute {_show(name)} must be a string, number or boolean", name)


def check_id(value: str, field: str = "id") -> str:
    """Return ``value`` if it is a valid event id: 1-128 characters, none of them a control character.

    Args:
        value: the candidate id.
        field: what to name in the error (``id``, or the header it came from).

    Raises:
        InvalidMessage: it is not valid.
    """
    if not value:
        raise errors.InvalidMessage(f"{field} must not be empty", field)
    _check_value(field, value, _LIMITS["id"])
    return value


def _check_value(name: str, value: str, limit: int) -> None:
    if len(value) > limit:
        raise errors.InvalidMessage(f"{name} is longer than {limit} characters", name)
    if _CONTROL.search(value):
        raise errors.InvalidMessage(f"{name} contains a control character", name)


def check(attrs: dict[str, str]) -> None:
    """Check a decoded event's attributes: required ones present, names, lengths, characters, specversion.

    Raises:
        InvalidMessage: the first attribute found invalid, named.
    """
    if not (attrs.get("id") and attrs.get("source") and attrs.get("specversion") and attrs.get("type")):
        missing = [name for name in REQUIRED if not attrs.get(name)]
        raise errors.InvalidMessage(f"not a CloudEvent: missing required attribute(s) {', '.join(missing)}", missing[0])
    if not _VALID_NAMES.issuperset(attrs):
        for name in attrs:
            if name not in _VALID_NAMES:
                if not _NAME.fullmatch(name):
                    raise errors.InvalidMessage(
                        f"invalid CloudEvents attribute name {_show(name)}: use 1-64 lower-case letters a-z and digits",
                        name,
                    )
                if len(_VALID_NAMES) < 1024:
                    _VALID_NAMES.add(name)
    if max(map(len, attrs.values())) > _SHORTEST_LIMIT:
        for name, value in attrs.items():
            if len(value) > (limit := _LIMITS.get(name, MAX_VALUE)):
                raise errors.InvalidMessage(f"{name} is longer than {limit} characters", name)
    if _CONTROL.search("".join(attrs.values())):  # one scan; find the culprit only when there is one
        for name, value in attrs.items():
            _check_value(name, value, _LIMITS.get(name, MAX_VALUE))
    if attrs["specversion"] != SPEC_VERSION:
        raise errors.InvalidMessage(
            f"unsupported CloudEvents specversion {attrs['specversion']!r}; expected 1.0", "specversion"
        )
    if (tenant := attrs.get(TENANT)) is not None:
        try:
            names.check_tenant(tenant)
        except errors.ConfigurationError as exc:
            raise errors.InvalidMessage(str(exc), TENANT) from None


def check_extension(name: str, value: object) -> None:
    """Check an extension set on a new event by our own code (a handler's, a publisher's).

    Raises:
        ConfigurationError: the name is not 1-64 lower-case letters and digits or names a CloudEvents
            attribute, the value is not a string, or a tenant is not a valid identifier.
    """
    if not _NAME.fullmatch(name) or name in KNOWN or not isinstance(value, str):
        raise errors.ConfigurationError(
            f"invalid CloudEvents extension {name!r}={value!r}: the name must be 1-64 lower-case letters and "
            "digits, not a CloudEvents attribute, and the value a string"
        )
    if name == TENANT:
        names.check_tenant(value)


def parse_time(raw: str | None) -> datetime | None:
    """The ``time`` attribute, or None when absent.

    Raises:
        InvalidMessage: it is not RFC 3339 with a time zone.
    """
    if not raw:
        return None
    try:
        value = datetime.fromisoformat(raw)
    except ValueError as exc:
        raise errors.InvalidMessage(f"CloudEvents attribute time {raw!r} is not RFC 3339", "time") from exc
    if value.tzinfo is None:
        raise errors.InvalidMessage(f"CloudEvents attribute time {raw!r} has no time zone", "time")
    return value


def parse_attempt(raw: str | None) -> int:
    """The ``attempt`` extension clamped to 1..:data:`MAX_ATTEMPT` (1 when absent).

    Raises:
        InvalidMessage: it is not an integer.
    """
    if not raw:
        return 1
    if not _INTEGER.fullmatch(raw):
        raise errors.InvalidMessage(f"extension attempt {_show(raw)} is not an integer", "attempt")
    return min(max(int(raw), 1), MAX_ATTEMPT)
