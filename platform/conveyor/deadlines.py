"""Timeouts with one timer per kind of operation instead of one per operation.

``asyncio.timeout`` schedules and cancels a timer handle for every attempt,
about a third of the runtime's own cost per message. Every attempt of one
handler has the same timeout, so deadlines expire in the order attempts
start: :class:`Deadlines` keeps the running attempts in an insertion-ordered
dict and one timer armed at the oldest one's deadline. When it fires it
cancels each attempt past its deadline and re-arms for the next.

The NATS transport uses the same for its PubAcks (one timeout for every publish).

The cancellation protocol is ``asyncio.timeout``'s: the attempt's task is
cancelled, and :meth:`Deadlines.finish` tells the attempt to turn that
``CancelledError`` into ``TimeoutError`` only if no one else cancelled the
task too (``Task.uncancel`` counts), so a drain's cancellation is never
mistaken for a timeout.
"""

from __future__ import annotations

import asyncio


class Deadline:
    """One running attempt's deadline."""

    __slots__ = ("at", "cancelling", "expired", "task")

    def __init__(self, task: asyncio.Task[object], at: float) -> None:
        self.task = task
        self.at = at
        self.cancelling = task.cancelling()
        self.expired = False


class Deadlines:
    """The deadlines of one handler's running attempts.

    Args:
        seconds: the handler's timeout; ``None`` for none.
    """

    __slots__ = ("_live", "_seconds", "_timer")

    def __init__(self, seconds: float | None) -> None:
        self._seconds = seconds
        self._live: dict[Deadline, None] = {}
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> Deadline | None:
        """Start the current task's deadline (``None`` when the handler has no timeout)."""
        if self._seconds is None:
            return None
        task = asyncio.current_task()
        if task is None:  # pragma: no cover - attempts always run in a task
            raise RuntimeError("an attempt's deadline needs a running task")
        loop = task.get_loop()
        deadline = Deadline(task, loop.time() + self._seconds)
        self._live[deadline] = None
        if self._timer is None:
            self._timer = loop.call_at(deadline.at, self._expire, loop)
        return deadline

    def finish(self, deadline: Deadline | None) -> bool:
        """Forget an attempt's deadline; True if it cancelled the attempt and no one else did.

        Call it once the attempt ends, and again (it is idempotent) where a
        ``CancelledError`` is caught: True means raise ``TimeoutError`` instead.
        """
        if deadline is None:
            return False
        self._live.pop(deadline, None)
        if not deadline.expired:
            return False
        deadline.expired = False
        return deadline.task.uncancel() <= deadline.cancelling

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        now = loop.time()
        while self._live:
            oldest = next(iter(self._live))
            if oldest.at > now:
                self._timer = loop.call_at(oldest.at, self._expire, loop)
                return
            del self._live[oldest]
            if not oldest.task.done():
                oldest.expired = True
                oldest.task.cancel()

    @property
    def running(self) -> int:
        """Attempts with a live deadline."""
        return len(self._live)
