"""Concurrency with per-key order and bounded memory.

A :class:`Dispatcher` receives deliveries from a transport one at a time and
runs them concurrently, up to ``concurrency`` at once. Deliveries with the same
key run one after another, in arrival order, in a *lane*; keys without a lane
and messages without a key run side by side. ``submit`` waits while
``concurrency + buffer`` deliveries are accepted and unfinished, which pushes
back on the transport, so memory stays bounded under any backlog.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable

from conveyor import ports

Process = Callable[[ports.Delivery], Awaitable[None]]


class Dispatcher:
    """Runs deliveries concurrently, keeping per-key order.

    Args:
        process: handles one delivery completely (including ack/nack); must not raise.
        concurrency: most deliveries running at once.
        buffer: extra deliveries accepted ahead (waiting in lanes or for a slot).
    """

    def __init__(self, process: Process, concurrency: int, buffer: int | None = None) -> None:
        self._process = process
        self._running = asyncio.Semaphore(concurrency)
        self._accepted = asyncio.Semaphore(concurrency + (concurrency if buffer is None else buffer))
        self._lanes: dict[str, deque[ports.Delivery]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def in_flight(self) -> int:
        """Deliveries accepted and not yet finished."""
        return len(self._tasks) + sum(len(lane) for lane in self._lanes.values())

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
            self._spawn(self._run_lane(key, delivery))
        else:
            self._spawn(self._run_one(delivery))

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        self._idle.clear()
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not self._tasks:
            self._idle.set()

    async def _run_one(self, delivery: ports.Delivery) -> None:
        try:
            async with self._running:
                await self._process(delivery)
        finally:
            self._accepted.release()

    async def _run_lane(self, key: str, delivery: ports.Delivery) -> None:
        lane = self._lanes[key]
        try:
            while True:
                try:
                    async with self._running:
                        await self._process(delivery)
                finally:
                    self._accepted.release()
                if not lane:
                    return
                delivery = lane.popleft()
        finally:
            # On cancellation, deliveries still queued in the lane are left
            # unsettled: the broker redelivers them.
            del self._lanes[key]

    async def drain(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for accepted work to finish.

        Work still running at the deadline is cancelled and left unsettled, so
        the broker delivers it again.

        Returns:
            True if everything finished in time.
        """
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
            return True
        except TimeoutError:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            return False
