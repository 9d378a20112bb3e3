"""A relay batch's claim, held open in a task of its own from the claim to its mark (:mod:`conveyor.runtime.relay`)."""

from __future__ import annotations

import asyncio
import logging

from conveyor import stores

log = logging.getLogger("conveyor.relay")


def _retrieve(task: asyncio.Task[None]) -> None:
    """Take a claim task's failure as seen: the relay reports it where it awaits :meth:`Claim.marked`.

    A claim the relay no longer awaits (its round failed first, a drain) would
    otherwise make asyncio log "Task exception was never retrieved"; its rows
    are claimed and published again, so only a debug line is left of it.
    """
    if not task.cancelled() and task.exception() is not None:
        log.debug("an outbox claim ended with %r", task.exception())


class Claim:
    """One batch's claim held open in a task of its own, from the claim to its mark.

    The store's claim is a context manager whose transaction (PostgreSQL)
    belongs to the task that entered it, so a batch's whole life runs in one
    task: claim, wait for the publish outcome (:meth:`release`), exit (mark).
    """

    def __init__(self, store: stores.OutboxStore, limit: int, after: Claim | None = None) -> None:
        loop = asyncio.get_running_loop()
        self._batch: asyncio.Future[stores.OutboxBatch] = loop.create_future()
        self._outcome: asyncio.Future[Exception | None] = loop.create_future()
        self.task = asyncio.create_task(self._hold(store, limit, after))
        self.task.add_done_callback(_retrieve)

    async def _hold(self, store: stores.OutboxStore, limit: int, after: Claim | None) -> None:
        claimed = False
        try:
            if after is not None:
                # Claim once the previous batch is marked: its keys are free again by then (a
                # claim made before would skip them too). Its outcome is the relay's to report.
                await asyncio.wait([after.task])
            async with store.claim(limit) as batch:
                claimed = True
                self._batch.set_result(batch)
                failure = await self._outcome
                if failure is not None:
                    raise failure  # the store keeps what was recorded, then re-raises
        except Exception as exc:
            if claimed:
                raise
            self._batch.set_exception(exc)  # the claim failed: batch() raises it
        finally:
            if not self._batch.done():
                self._batch.cancel()

    async def batch(self) -> stores.OutboxBatch:
        """The claimed batch.

        Raises:
            StoreError: the claim failed.
        """
        return await asyncio.shield(self._batch)

    def release(self, failure: Exception | None = None) -> None:
        """Hand back the publish outcome (``failure``: what the publish raised); the mark starts."""
        if not self._outcome.done():
            self._outcome.set_result(failure)

    async def marked(self) -> None:
        """Wait until the batch is marked.

        Raises:
            StoreError: the mark failed.
            Exception: the ``failure`` given to :meth:`release`, after the mark.
        """
        await asyncio.shield(self.task)

    async def abandon(self) -> None:
        """Cancel the claim (rolled back: its rows are claimed again); wait for it."""
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        if not self._batch.cancelled():
            self._batch.exception()  # a failed claim's error is retrieved: nothing to report after a cancel
