"""What a failed message becomes: its dead-letter topic and headers (see :mod:`conveyor.dead_letter`), and the
failures handlers may cause.
"""

from __future__ import annotations

import asyncio
from typing import Any

from conveyor.dead_letter import DLQ_HEADER, DLQ_SUFFIX, dead_letter_headers, dead_letter_topic

__all__ = ["DLQ_HEADER", "DLQ_SUFFIX", "HandlerExit", "dead_letter_headers", "dead_letter_topic", "taken_back"]


class HandlerExit(Exception):
    """A handler (or a library it called) raised ``SystemExit`` or ``KeyboardInterrupt``: its message failed.

    The worker's own shutdown comes through its signal handlers, never as an
    exception out of a handler; one raised there fails that message like any
    other error instead of stopping every subscription of the process.
    """

    def __init__(self, raised: BaseException) -> None:
        super().__init__(f"the handler raised {type(raised).__name__}({raised})")


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
