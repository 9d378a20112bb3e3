"""Threads for plain (sync) handlers and jobs: daemon threads, so a hung one never holds up exit.

``asyncio.to_thread`` runs functions on the loop's default executor, whose
threads the interpreter joins at exit: one sync handler stuck in a blocking
call kept a worker alive long past its drain deadline. A thread cannot be
interrupted, so the runtime instead waits for a timed-out sync handler before
retrying its message (see :mod:`conveyor.runtime.worker`), and at shutdown
leaves such a thread behind: these threads are daemons, and the process exits
on time.
"""

from __future__ import annotations

import asyncio
import contextvars
import queue
import threading
from collections.abc import Callable
from typing import Any

MAX_THREADS = 32
"""Most threads running sync functions at once (as the default executor's limit on most hosts)."""

_Job = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", contextvars.Context, Callable[..., Any], tuple[Any, ...]]


class DaemonThreads:
    """A pool of daemon threads that run sync functions for the event loop.

    Args:
        size: most threads; more calls wait for a free thread.
    """

    def __init__(self, size: int = MAX_THREADS) -> None:
        self._size = size
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0  # threads waiting for a job
        self._pending = 0  # jobs queued and not yet taken

    def run(self, func: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """Start ``func(*args)`` in a thread, with the caller's context variables; return its future.

        Cancelling the future does not stop the thread; its result is then dropped.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._jobs.put((loop, future, contextvars.copy_context(), func, args))
        with self._lock:
            self._pending += 1
            if self._pending > self._idle and self._threads < self._size:
                self._threads += 1
                threading.Thread(target=self._work, name="conveyor-sync", daemon=True).start()
        return future

    def _work(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            loop, future, context, func, args = self._jobs.get()
            with self._lock:
                self._idle -= 1
                self._pending -= 1
            try:
                result = context.run(func, *args)
            except BaseException as exc:  # handed to the awaiting task, like asyncio.to_thread does
                _resolve(loop, future, None, exc)
            else:
                _resolve(loop, future, result, None)


def _resolve(
    loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], result: Any, error: BaseException | None
) -> None:
    def settle() -> None:
        if future.done():  # cancelled by a timeout or a drain deadline: nobody waits any more
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    if not loop.is_closed():
        loop.call_soon_threadsafe(settle)


_POOL = DaemonThreads()


def run(func: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
    """Run ``func(*args)`` on the process's pool of daemon threads; see :meth:`DaemonThreads.run`."""
    return _POOL.run(func, *args)
