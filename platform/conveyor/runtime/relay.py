"""The outbox relay: publishes committed outbox rows with broker confirmation, then marks them sent.

Each round claims a batch from the :class:`~conveyor.stores.OutboxStore`,
publishes it and settles it:

* rows are published pipelined (``Transport.publish_many``) in waves: every
  keyless row and the first row of each key, then the next row of each key
  whose previous row the broker confirmed, and so on; so rows of one key go
  out in outbox order, and a failure stops that key for the round (its later
  rows wait, so order holds) while keyless rows and other keys flow on
  (:mod:`conveyor.runtime.relay_waves`);
* a message is marked sent only after the broker confirmed it. A relay that
  dies in between publishes it again after restart with the same message id
  (at-least-once; the consumers' inbox drops the duplicate). The crash point
  ``relay.after-publish`` (:func:`conveyor.crash.maybe_crash`) reproduces that;
* :meth:`Relay.run` overlaps the database with the broker: while batch N is
  being published, batch N+1 is claimed and batch N-1 marked, each in its own
  claim (its own transaction on PostgreSQL). A key is never in two open
  claims (PostgreSQL: its rows are locked, ``SKIP LOCKED`` and the key-prefix
  rule skip it; SQLite: the store skips the ids and keys of its open claims),
  so a key's rows still go out one batch after the other, in order. Stores
  that cannot hold two claims at once (``concurrent_claims`` false, e.g.
  in-memory SQLite) run the rounds one after the other.

Failures degrade per key, never globally:

* **the broker refused a message** (:class:`~conveyor.errors.TransportError`):
  the row spends an attempt and is due again after an exponential backoff;
  meanwhile its key waits and every other key and keyless row flows on. After
  ``max_attempts`` the row is **parked**: kept with its last error, never
  claimed again until an operator runs ``conveyor outbox retry`` (or
  ``purge``). A parked row holds its key (later rows of the key wait, so
  per-key order is never silently broken); a parked keyless row blocks nothing;
* **the broker is unreachable or busy**
  (:class:`~conveyor.errors.TransientTransportError`) is not the row's fault:
  no attempt is spent and nothing is parked; the round stops publishing and the
  whole relay backs off (doubling, up to ``max_backoff``) and resumes;
* **the database failed, or anything else raised** (a bug): the store keeps
  what the broker confirmed, the relay logs the error (with its traceback if it
  is not a database error), backs off and goes on. Only cancellation ends
  :meth:`Relay.run`.

Between rounds the relay sleeps until the store signals a commit (PostgreSQL
``LISTEN/NOTIFY``, or a commit in this process), the next claimable row is due
(rows of waiting keys and parked rows do not count), or ``poll_interval``
passed, whichever comes first, but at least ``min_idle`` after an empty claim,
so it never spins. It purges rows sent longer ago than ``retention``; a task
of its own refreshes the backlog gauges every ``metrics_interval``, whether
rounds succeed or not, and :meth:`Relay.progress` (readiness) reports a relay
whose due rows wait while it publishes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from prometheus_client import Gauge

from conveyor import errors, ports, stores
from conveyor.runtime import relay_waves
from conveyor.runtime.relay_claims import Claim
from conveyor.runtime.relay_waves import (
    RELAY_FAILURES,
    RELAY_PUBLISHED,
    RelayOptions,
    RoundResult,
    wire_message,
)

__all__ = ["RELAY_FAILURES", "RELAY_PUBLISHED", "Relay", "RelayOptions", "RoundResult", "wire_message"]

log = logging.getLogger("conveyor.relay")

# Database-wide figures, the same in every process that reads them: in multiprocess
# mode the live processes' maximum (a dead process's last reading is dropped).
OUTBOX_BACKLOG = Gauge(
    "conveyor_outbox_backlog", "Unsent outbox rows (due, scheduled or parked).", multiprocess_mode="livemax"
)
OUTBOX_DUE = Gauge(
    "conveyor_outbox_due", "Unsent, unparked outbox rows due now: what the relay should be publishing.",
    multiprocess_mode="livemax",
)  # fmt: skip
OUTBOX_SCHEDULED = Gauge(
    "conveyor_outbox_scheduled",
    "Unsent, unparked outbox rows not due yet (delayed messages, saga timers, backoffs).",
    multiprocess_mode="livemax",
)
OUTBOX_OLDEST_AGE = Gauge(
    "conveyor_outbox_oldest_age_seconds", "Age of the oldest due, unsent outbox row.", multiprocess_mode="livemax"
)
OUTBOX_PARKED = Gauge(
    "conveyor_outbox_parked",
    "Outbox rows parked after their last attempt (see conveyor outbox).",
    multiprocess_mode="livemax",
)


class Relay:
    """Moves outbox rows to the broker.

    Args:
        store: the outbox store (e.g. ``event_store.SqlOutboxStore(database)``).
        transport: a connected transport.
        options: pacing; defaults to :class:`RelayOptions`.
    """

    def __init__(
        self,
        store: stores.OutboxStore,
        transport: ports.Transport,
        *,
        options: RelayOptions | None = None,
    ) -> None:
        self.store = store
        self.transport = transport
        self.options = options or RelayOptions()
        self._waves = relay_waves.WavePublisher(transport, self.options)
        self._next_purge = time.monotonic() + self.options.purge_interval
        self._ahead: Claim | None = None  # the next batch, claimed while the current one publishes
        self._current: Claim | None = None  # the batch being published
        self._marking: Claim | None = None  # the previous batch, being marked
        self._open: set[Claim] = set()  # every claim whose task runs: a cancelled relay rolls them all back
        self.stats: stores.OutboxStats | None = None
        """The backlog as of the last metrics refresh (None before the first)."""
        self.last_progress = time.monotonic()
        """When a round last published something, or found nothing to publish (monotonic seconds)."""

    def retry_delay(self, attempts: int) -> float:
        """Backoff before a row that failed ``attempts + 1`` times is due again (with jitter)."""
        return self._waves.retry_delay(attempts)

    async def run_once(self) -> RoundResult:
        """Claim one batch, publish it, settle it (no overlap with other rounds).

        Raises:
            StoreError: the database failed (nothing of this round was marked
                unless published before the failure).
            Exception: anything a publish raised other than a
                :class:`~conveyor.errors.TransportError` (a bug); the rows the
                broker confirmed in this round are marked sent first.
        """
        async with self.store.claim(self.options.batch_size) as batch:
            return await self._waves.publish(batch)

    async def _pipelined_round(self) -> RoundResult:
        """Publish one batch while the next is claimed and the previous one is marked.

        The batch is the one claimed ahead during the previous round, or a fresh
        claim. An empty claim made ahead proves nothing (its keys may have been
        in flight), so a fresh claim follows it. The previous batch's mark is
        awaited after this batch's publish; after an outage the batch claimed
        ahead is given back and this batch's mark awaited, so the relay backs
        off with nothing open.

        Raises:
            StoreError: a claim or a mark failed.
            Exception: a publish raised a bug (after its batch was marked).
        """
        limit = self.options.batch_size
        claim, self._ahead = self._ahead, None
        fresh = claim is None
        claim = self._current = claim or self._claim(limit)
        batch = await claim.batch()
        if not batch.messages:
            claim.release()
            self._current = None
            await claim.marked()
            await self._finish_marking()
            return RoundResult(0, 0, 0) if fresh else await self._pipelined_round()
        # Claimed while this batch publishes, once the previous one is marked; it
        # holds none of this batch's keys (see the module docstring).
        self._ahead = self._claim(limit, after=self._marking)
        try:
            result = await self._waves.publish(batch)
        except Exception as exc:
            claim.release(exc)
            self._current = None
            await self._finish_marking()
            await claim.marked()  # raises exc once what was confirmed is marked
            raise
        claim.release()
        previous, self._marking, self._current = self._marking, claim, None
        if previous is not None:
            await previous.marked()
        if result.interrupted:
            await self.drain()
        return result

    def _claim(self, limit: int, after: Claim | None = None) -> Claim:
        """A new claim, tracked until its task ends (see :meth:`_abandon`)."""
        claim = Claim(self.store, limit, after)
        self._open.add(claim)
        claim.task.add_done_callback(lambda _task: self._open.discard(claim))
        return claim

    async def _finish_marking(self) -> None:
        marking, self._marking = self._marking, None
        if marking is not None:
            await marking.marked()

    async def drain(self) -> None:
        """Give back the batch claimed ahead (unpublished) and wait for pending marks.

        Raises:
            StoreError: a pending mark failed.
        """
        for unpublished in (self._ahead, self._current):
            if unpublished is not None:
                with contextlib.suppress(Exception):  # a claim that failed or is given back: nothing to keep
                    await unpublished.batch()
                unpublished.release()
                with contextlib.suppress(Exception):
                    await unpublished.marked()
        self._ahead = self._current = None
        await self._finish_marking()

    async def _abandon(self) -> None:
        """On cancellation: roll back whatever is still open.

        Every claim whose task still runs, not only the three the round names:
        a cancellation while a round awaits the previous batch's mark finds
        that batch in none of them.
        """
        for claim in list(self._open):
            await claim.abandon()
        self._ahead = self._current = self._marking = None

    async def _round(self) -> RoundResult:
        if getattr(self.store, "concurrent_claims", False):
            return await self._pipelined_round()
        return await self.run_once()

    async def run(self, stop: asyncio.Event) -> None:
        """Relay until ``stop`` is set; the round in progress is finished first.

        Never raises but on cancellation: a failed round is logged and followed
        by a backoff.
        """
        gauges = asyncio.create_task(self._refresh_gauges(stop), name="relay-gauges")
        try:
            await self._run(stop)
        except BaseException:
            await asyncio.shield(self._abandon())
            raise
        finally:
            gauges.cancel()
            await asyncio.gather(gauges, return_exceptions=True)
        try:
            await self.drain()
        except Exception as exc:  # the next relay claims what was not marked
            log.warning("outbox relay: marking the last batch failed (%s); it will be published again", exc)

    async def _run(self, stop: asyncio.Event) -> None:
        backoff = 0.0
        while not stop.is_set():
            try:
                result = await self._round()
            except Exception as exc:
                await self._drain_after_failure()
                backoff = self._next_backoff(backoff)
                if isinstance(exc, errors.StoreError):
                    log.warning("outbox relay: database failed (%s); retrying in %.1fs", exc, backoff)
                else:
                    log.exception("outbox relay round failed; retrying in %.1fs", backoff)
                await self._sleep(stop, backoff)
                continue
            if result.published or not result.claimed:
                self.last_progress = time.monotonic()
            await self._housekeeping()
            if result.interrupted:
                backoff = self._next_backoff(backoff)
                log.warning(
                    "outbox relay: the broker is unreachable (%d message(s) waiting); retrying in %.1fs",
                    result.interrupted, backoff,
                )  # fmt: skip
                await self._sleep(stop, backoff)
                continue
            backoff = 0.0
            if result.claimed:
                continue  # there may be more; refused rows are backing off and not claimed again yet
            await self._idle(stop)

    async def _drain_after_failure(self) -> None:
        """After a failed round: settle what is open before backing off (its own failure is logged)."""
        try:
            await self.drain()
        except Exception as exc:
            log.warning("outbox relay: marking a batch failed too (%s); it will be published again", exc)

    def _next_backoff(self, current: float) -> float:
        return min(max(current * 2, 0.1), self.options.max_backoff)

    async def _idle(self, stop: asyncio.Event) -> None:
        timeout = self.options.poll_interval
        try:
            due = await self.store.next_due_in()
        except Exception as exc:  # the next round reports a lasting failure
            log.debug("outbox relay: cannot tell when the next row is due: %r", exc)
            due = None
        if due is not None:
            timeout = min(timeout, due)
        timeout = max(timeout, self.options.min_idle)
        waiters = [
            asyncio.ensure_future(self.store.wait(timeout)),
            asyncio.ensure_future(stop.wait()),
        ]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)

    @staticmethod
    async def _sleep(stop: asyncio.Event, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await stop.wait()

    async def _refresh_gauges(self, stop: asyncio.Event) -> None:
        """Refresh the backlog gauges every ``metrics_interval``, whatever the rounds do (they may all fail)."""
        while not stop.is_set():
            try:
                await self.refresh_metrics()
            except errors.StoreError as exc:
                log.debug("outbox relay: cannot read the backlog figures: %s", exc)
            except Exception:
                log.exception("outbox relay: reading the backlog figures failed")
            await self._sleep(stop, max(self.options.metrics_interval, 0.1))

    async def _housekeeping(self) -> None:
        now = time.monotonic()
        try:
            if now >= self._next_purge:
                self._next_purge = now + self.options.purge_interval
                purged = await self.store.purge(self.options.retention)
                if purged:
                    log.info("outbox relay purged %d sent rows", purged)
        except errors.StoreError as exc:
            log.warning("outbox relay housekeeping failed: %s", exc)
        except Exception:
            log.exception("outbox relay housekeeping failed")

    async def progress(self) -> None:
        """Readiness probe (critical): the relay is not stalled.

        Raises:
            ConveyorError: the oldest due row has waited longer than ``stall_after``
                and no round has published anything for as long (rounds failing,
                or one stuck on the database or the broker).
            StoreError: the backlog cannot be read.
        """
        stats = await self.refresh_metrics()
        idle = time.monotonic() - self.last_progress
        if stats.oldest_age > self.options.stall_after and idle > self.options.stall_after:
            raise errors.ConveyorError(
                f"the relay is stalled: the oldest due outbox message has waited {stats.oldest_age:.0f}s and "
                f"nothing was published for {idle:.0f}s (limit {self.options.stall_after:.0f}s); see its log"
            )

    async def health(self) -> None:
        """Readiness probe (non-critical): parked rows, or a backlog far behind.

        Raises:
            TransportError: rows are parked, or the oldest due row has waited
                longer than ``stall_after`` (the relay is stalled or far behind).
            StoreError: the backlog cannot be read.
        """
        stats = await self.refresh_metrics()
        if stats.parked:
            raise errors.TransportError(f"{stats.parked} outbox message(s) parked; see `conveyor outbox list --parked`")
        if stats.oldest_age > self.options.stall_after:
            raise errors.TransportError(
                f"the oldest due outbox message has waited {stats.oldest_age:.0f}s "
                f"(more than {self.options.stall_after:.0f}s): the relay is stalled or behind"
            )

    async def refresh_metrics(self) -> stores.OutboxStats:
        """Update the backlog gauges from the store; return the figures.

        Raises:
            StoreError: the database failed.
        """
        stats = await self.store.stats()
        self.stats = stats
        OUTBOX_BACKLOG.set(stats.backlog)
        OUTBOX_OLDEST_AGE.set(stats.oldest_age)
        OUTBOX_PARKED.set(stats.parked)
        OUTBOX_DUE.set(stats.due)
        OUTBOX_SCHEDULED.set(stats.scheduled)
        return stats
