"""Validation of identifiers that become broker subjects, routing keys, topics or SQL values.

A name that reaches a NATS subject or an AMQP routing key unchecked can change
what a subscription matches (``*`` and ``>`` are wildcards there), so every
topic, handler and schedule name passes :func:`check` before it is used.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from conveyor import errors

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")


def check(kind: str, value: object) -> str:
    """Return ``value`` if it is a valid identifier, else raise.

    Valid: 1 to 128 characters of lowercase letters, digits, ``.``, ``_``, ``-``,
    starting with a letter or digit, with no empty dot-separated token.

    Args:
        kind: what the value names ("topic", "handler name", ...), for the message.
        value: the candidate.

    Raises:
        ConfigurationError: the value is not a valid identifier.
    """
    if not isinstance(value, str) or not _NAME.match(value) or ".." in value or value.endswith("."):
        raise errors.ConfigurationError(
            f"invalid {kind} {value!r}: use 1-128 characters of a-z, 0-9, '.', '_', '-', "
            "starting with a letter or digit, with no empty '.'-separated part"
        )
    return value


def published(publishes: Iterable[str] | Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """The ``publishes=`` of a handler or schedule as (topic, payload type or None) pairs, each topic checked.

    Args:
        publishes: topics, or a mapping of each topic to its payload type (or None).

    Raises:
        ConfigurationError: a single string instead of a list, or an invalid topic.
    """
    if isinstance(publishes, str | bytes):
        raise errors.ConfigurationError(f"publishes takes a list of topics, not the string {publishes!r}")
    pairs = list(publishes.items()) if isinstance(publishes, Mapping) else [(topic, None) for topic in publishes]
    return tuple((check("published topic", topic), payload) for topic, payload in pairs)


_TENANT = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


def check_tenant(value: object) -> str:
    """Return ``value`` if it is a valid tenant: 1-64 of a-z, 0-9, ``_``, ``-``, starting with a letter or digit.

    A tenant never contains ``.``, ``/``, ``*``, ``>`` or a space, so it can
    never widen a subject, a routing key or an id scoped by it.

    Raises:
        ConfigurationError: it is not.
    """
    if not isinstance(value, str) or not _TENANT.match(value):
        raise errors.ConfigurationError(
            f"invalid tenant {value!r}: use 1-64 characters of a-z, 0-9, '_', '-', starting with a letter or digit"
        )
    return value
