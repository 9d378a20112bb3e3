"""What a failed message becomes: its dead-letter topic and headers, and the failures handlers may cause.

A dead letter is the original message, body and headers byte for byte, with
``conveyor-dlq-*`` headers naming the handler, the topic, the error type, the
error text (one line, at most 1,000 characters), the attempts spent and the
time; it goes to ``<topic>.dlq``.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from conveyor import envelope

DLQ_SUFFIX = ".dlq"
DLQ_HEADER = "conveyor-dlq-"
_MAX_ERROR_TEXT = 1000


def dead_letter_topic(topic: str) -> str:
    """The dead-letter topic of ``topic``."""
    return topic + DLQ_SUFFIX


class HandlerExit(Exception):
    """A handler (or a library it called) raised ``SystemExit`` or ``KeyboardInterrupt``: its message failed.

    The worker's own shutdown comes through its signal handlers, never as an
    exception out of a handler; one raised there fails that message like any
    other error instead of stopping every subscription of the process.
    """

    def __init__(self, raised: BaseException) -> None:
        super().__init__(f"the handler raised {type(raised).__name__}({raised})")


def dead_letter_headers(handler: str, topic: str, kind: str, text: str, attempts: int) -> dict[str, str]:
    """The ``conveyor-dlq-*`` headers that explain why a message was dead-lettered."""
    clean = " ".join(text.split())[:_MAX_ERROR_TEXT]  # header values must be one line
    return {
        DLQ_HEADER + "handler": handler,
        DLQ_HEADER + "topic": topic,
        DLQ_HEADER + "error-type": kind,
        DLQ_HEADER + "error": clean,
        DLQ_HEADER + "attempts": str(attempts),
        DLQ_HEADER + "at": envelope.format_time(datetime.now(UTC)),
    }


def taken_back(delivery: Any) -> bool:
    """Whether a cancellation of the running attempt came from the transport taking ``delivery`` back.

    A transport may cancel an attempt whose message is no longer this worker's
    (the Kafka transport does once a revoked partition's grace is over): it sets
    the delivery's ``taken_back``, and waits for its ``ended`` event (an
    ``asyncio.Event``, set here). The attempt then ends quietly, unsettled, and
    the task goes on: this withdraws that cancellation from the current task.
    False (the cancellation stands) when the delivery was not taken back or
    the task was cancelled for another reason too (a drain deadline).
    """
    if not getattr(delivery, "taken_back", False):
        return False
    ended = getattr(delivery, "ended", None)
    if isinstance(ended, asyncio.Event):
        ended.set()
    task = asyncio.current_task()
    return task is None or task.uncancel() == 0
