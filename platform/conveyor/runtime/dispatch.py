"""Concurrency with per-key order and bounded memory.

A :class:`Dispatcher` receives deliveries from a transport one at a time and
runs them concurrently, up to ``concurrency`` at once, on that many long-lived
runner tasks (no task per message). Deliveries with the same key run one after
another, in arrival order, in a *lane*: the runner that finishes one takes the
next of its key. Keys without a lane and messages without a key run side by
side. ``submit`` waits while ``concurrency + buffer`` deliveries are accepted
and unfinished, which pushes back on the transport, so memory stays bounded
under any backlog.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable

from conveyor import ports

log = logging.getLogger("conveyor.worker")

Process = Callable[[ports.Delivery], Awaitable[None]]


class Dispatcher:
    """Runs deliveries concurrently, keeping per-key order.

    Args:
        process: handles one delivery completely (including ack/nack); must not raise.
        concurrency: most deliveries running at once (the number of runner tasks).
        buffer: extra deliveries accepted ahead (waiting in lanes or for a runner).
    """

    def __init__(self, process: Process, concurrency: int, buffer: int | None = None) -> None:
        self._process = process
        self._concurrency = concurrency
        self._accepted = asyncio.Semaphore(concurrency + (concurrency if buffer is None else buffer))
        self._ready: asyncio.Queue[ports.Delivery] = asyncio.Queue()
        self._lanes: dict[str, deque[ports.Delivery]] = {}
        self._runners: set[asyncio.Task[None]] = set()
        self._busy = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def in_flight(self) -> int:
        """Deliveries accepted and not yet finished."""
        return self._busy + self._ready.qsize() + sum(len(lane) for lane in self._lanes.values())

    async def submit(self, delivery: ports.Delivery) -> None:
        """Accept a delivery; waits while the dispatcher is full."""
        await self._accepted.acquire()
        key = delivery.message.key
        if key is not None:
            lane = self._lanes.get(key)
            if lane is not None:
                lane.append(delivery)
                return
            self._lanes[key] = deque()
        self._idle.clear()
        if len(self._runners) < self._concurrency:
            self._start_runners()
        self._ready.put_nowait(delivery)

    def _start_runners(self) -> None:
        while len(self._runners) < self._concurrency:
            runner = asyncio.ensure_future(self._run())
            self._runners.add(runner)
            runner.add_done_callback(self._runners.discard)

    async def _run(self) -> None:
        while True:
            delivery: ports.Delivery | None = await self._ready.get()
            self._busy += 1
            try:
                while delivery is not None:
                    try:
                        await self._process(delivery)
                    except Exception:  # process must not raise; a bug there must not cost a runner
                        log.exception("a delivery's processing raised; it stays unsettled for redelivery")
                    finally:
                        self._accepted.release()
                    delivery = self._next_of_lane(delivery.message.key)
            finally:
                self._busy -= 1
                if not self._busy and self._ready.empty():
                    self._idle.set()

    def _next_of_lane(self, key: str | None) -> ports.Delivery | None:
        """The next delivery of ``key``'s lane, or None (and the lane closed) when it is empty."""
        if key is None:
            return None
        lane = self._lanes[key]
        if lane:
            return lane.popleft()
        del self._lanes[key]
        return None

    async def drain(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for accepted work to finish, then stop the runners.

        Work still running at the deadline is cancelled and left unsettled, as
        are deliveries still queued in lanes: the broker delivers them again.

        Returns:
            True if everything finished in time.
        """
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
            finished = True
        except TimeoutError:
            finished = False
        runners = list(self._runners)
        for runner in runners:
            runner.cancel()
        await asyncio.gather(*runners, return_exceptions=True)
        if not finished:  # what was cancelled or never started stays unsettled
            self._lanes.clear()
            self._ready = asyncio.Queue()
            self._busy = 0
        return finished
