"""Dead letters' names and headers: ``<topic>.dlq`` and the ``conveyor-dlq-*`` headers.

A dead letter is the original message, body and headers byte for byte, with
``conveyor-dlq-*`` headers naming the handler, the topic, the error type, the
error text (one line, at most 1,000 characters), the attempts spent and the
time; it goes to ``<topic>.dlq``. The runtime writes most of them; a transport
writes one for a record its client library cannot even decode (see
:mod:`conveyor.transports.kafka_salvage`).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from conveyor import envelope

DLQ_SUFFIX = ".dlq"
DLQ_HEADER = "conveyor-dlq-"
_MAX_ERROR_TEXT = 1000


def dead_letter_topic(topic: str) -> str:
    """The dead-letter topic of ``topic``."""
    return topic + DLQ_SUFFIX


_PYDANTIC_DETAIL = re.compile(r"\s*\[type=[^\]]*\]$")  # pydantic's ``[type=..., input_value=...]`` (it echoes the data)
_PYDANTIC_HELP = "For further information visit "


def one_line(text: str, limit: int = _MAX_ERROR_TEXT) -> str:
    """An error's text as one line of at most ``limit`` characters, for headers and logs.

    Lines are joined with ``; ``, an indented line to the line before it with
    ``: `` (a pydantic ``ValidationError`` reads ``1 validation error for
    Order; total_cents: Input should be greater than 0``); pydantic's help links
    and ``[type=..., input_value=...]`` details are left out.
    """
    parts: list[str] = []
    for raw in text.splitlines():
        line = _PYDANTIC_DETAIL.sub("", " ".join(raw.split()))
        if not line or line.startswith(_PYDANTIC_HELP):
            continue
        if raw[:1].isspace() and parts:
            parts[-1] += ": " + line
        else:
            parts.append(line)
    return "; ".join(parts)[:limit]


def dead_letter_headers(handler: str, topic: str, kind: str, text: str, attempts: int) -> dict[str, str]:
    """The ``conveyor-dlq-*`` headers that explain why a message was dead-lettered."""
    clean = one_line(text)  # header values must be one line
    return {
        DLQ_HEADER + "handler": handler,
        DLQ_HEADER + "topic": topic,
        DLQ_HEADER + "error-type": kind,
        DLQ_HEADER + "error": clean,
        DLQ_HEADER + "attempts": str(attempts),
        DLQ_HEADER + "at": envelope.format_time(datetime.now(UTC)),
    }
