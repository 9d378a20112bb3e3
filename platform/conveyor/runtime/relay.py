"""The outbox relay: publishes committed outbox rows with broker confirmation, then marks them sent.

Each round claims a batch from the :class:`~conveyor.ports.OutboxStore`,
publishes it and settles it:

* rows of one key are published one after another in outbox order, and a
  failure stops that key for the round (its later rows wait, so order holds);
  keyless rows and different keys are published concurrently (bounded);
* a message is marked sent only after the broker confirmed it. A relay that
  dies in between publishes it again after restart with the same message id
  (at-least-once; the consumers' inbox drops the duplicate). The crash point
  ``relay.after-publish`` (:func:`conveyor.crash.maybe_crash`) reproduces that;
* a failed publish records the error and makes the row due again after an
  exponential backoff; when the broker or the database is down the relay
  itself backs off (up to ``max_backoff``) instead of spinning.

Between rounds the relay sleeps until the store signals a commit (PostgreSQL
``LISTEN/NOTIFY``, or a commit in this process), the next delayed row is due,
or ``poll_interval`` passed, whichever comes first. It also refreshes the
backlog gauges and purges rows sent longer ago than ``retention``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass
from datetime import timedelta

from prometheus_client import Counter, Gauge

from conveyor import envelope, errors, ports
from conveyor.crash import maybe_crash

log = logging.getLogger("conveyor.relay")

OUTBOX_BACKLOG = Gauge("conveyor_outbox_backlog", "Unsent outbox rows (due or delayed).")
OUTBOX_OLDEST_AGE = Gauge("conveyor_outbox_oldest_age_seconds", "Age of the oldest due, unsent outbox row.")
RELAY_PUBLISHED = Counter("conveyor_relay_published", "Outbox messages published and confirmed by the broker.")
RELAY_FAILURES = Counter("conveyor_relay_publish_failures", "Outbox publishes that failed (retried later).")

_STORED_PREFIX = envelope.HTTP_PREFIX


@dataclass(frozen=True, slots=True)
class RelayOptions:
    """How the relay paces itself.

    Attributes:
        batch_size: rows claimed per round.
        max_in_flight: publishes awaiting broker confirmation at once.
        poll_interval: longest idle sleep without a notification (seconds).
        retry_base: backoff of a row after its first failed publish (seconds).
        retry_max: longest backoff of a row (seconds).
        max_backoff: longest pause of the whole relay while the broker or
            database is failing (seconds).
        retention: sent rows older than this are deleted.
        purge_interval: seconds between purges.
        metrics_interval: seconds between backlog gauge refreshes.
    """

    batch_size: int = 100
    max_in_flight: int = 64
    poll_interval: float = 1.0
    retry_base: float = 1.0
    retry_max: float = 300.0
    max_backoff: float = 30.0
    retention: timedelta = timedelta(days=7)
    purge_interval: float = 300.0
    metrics_interval: float = 5.0


@dataclass(frozen=True, slots=True)
class RoundResult:
    """What one round did."""

    claimed: int
    published: int
    failed: int


def wire_message(message: ports.OutboxMessage, prefix: str) -> envelope.WireMessage:
    """The broker message for an outbox row, in the transport's binary binding.

    Rows store the event as HTTP-binding headers (``ce-*``); only the prefix
    changes, so no decoding is needed.
    """
    headers = message.headers
    if prefix != _STORED_PREFIX:
        cut = len(_STORED_PREFIX)
        headers = {(prefix + k[cut:] if k.startswith(_STORED_PREFIX) else k): v for k, v in headers.items()}
    return envelope.WireMessage(
        body=message.body, headers=dict(headers), key=message.key, message_id=message.message_id
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
        store: ports.OutboxStore,
        transport: ports.Transport,
        *,
        options: RelayOptions | None = None,
    ) -> None:
        self.store = store
        self.transport = transport
        self.options = options or RelayOptions()
        self._prefix = transport.binary_prefix
        self._limit = asyncio.Semaphore(self.options.max_in_flight)
        self._next_metrics = 0.0
        self._next_purge = time.monotonic() + self.options.purge_interval

    def retry_delay(self, attempts: int) -> float:
        """Backoff before a row that failed ``attempts + 1`` times is due again (with jitter)."""
        base = min(self.options.retry_base * 2.0 ** min(attempts, 30), self.options.retry_max)
        return base * random.uniform(0.8, 1.0)

    async def run_once(self) -> RoundResult:
        """Claim one batch, publish it, settle it.

        Raises:
            StoreError: the database failed (nothing of this round was marked
                unless published before the failure).
        """
        async with self.store.claim(self.options.batch_size) as batch:
            messages = batch.messages
            if not messages:
                return RoundResult(0, 0, 0)
            lanes: dict[str | None, list[ports.OutboxMessage]] = {}
            singles: list[list[ports.OutboxMessage]] = []
            for message in messages:
                if message.key is None:
                    singles.append([message])
                else:
                    lanes.setdefault(message.key, []).append(message)
            outcomes = await asyncio.gather(*(self._send_lane(batch, lane) for lane in (*lanes.values(), *singles)))
        published = sum(sent for sent, _ in outcomes)
        failed = sum(failures for _, failures in outcomes)
        return RoundResult(len(messages), published, failed)

    async def _send_lane(self, batch: ports.OutboxBatch, lane: list[ports.OutboxMessage]) -> tuple[int, int]:
        sent = 0
        for message in lane:
            async with self._limit:
                try:
                    await self.transport.publish(message.topic, wire_message(message, self._prefix))
                except errors.TransportError as exc:
                    batch.failed(message, f"{type(exc).__name__}: {exc}", self.retry_delay(message.attempts))
                    RELAY_FAILURES.inc()
                    log.warning(
                        "could not publish outbox message %s to %s: %s",
                        message.message_id,
                        message.topic,
                        exc,
                    )
                    RELAY_PUBLISHED.inc(sent)
                    return sent, 1  # later rows of this key wait: order is kept
            maybe_crash("relay.after-publish")
            batch.sent(message)
            sent += 1
        RELAY_PUBLISHED.inc(sent)
        return sent, 0

    async def run(self, stop: asyncio.Event) -> None:
        """Relay until ``stop`` is set; the round in progress is finished first. Never raises."""
        backoff = 0.0
        while not stop.is_set():
            try:
                result = await self.run_once()
            except errors.StoreError as exc:
                backoff = self._next_backoff(backoff)
                log.warning("outbox relay: database failed (%s); retrying in %.1fs", exc, backoff)
                await self._sleep(stop, backoff)
                continue
            await self._housekeeping()
            if result.failed:
                backoff = self._next_backoff(backoff)
                await self._sleep(stop, backoff)
                continue
            backoff = 0.0
            if result.claimed:
                continue  # there may be more
            await self._idle(stop)

    def _next_backoff(self, current: float) -> float:
        return min(max(current * 2, 0.1), self.options.max_backoff)

    async def _idle(self, stop: asyncio.Event) -> None:
        timeout = self.options.poll_interval
        try:
            due = await self.store.next_due_in()
        except errors.StoreError:
            due = None
        if due is not None:
            timeout = min(timeout, due)
        if timeout <= 0:
            return
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

    async def _housekeeping(self) -> None:
        now = time.monotonic()
        try:
            if now >= self._next_metrics:
                self._next_metrics = now + self.options.metrics_interval
                await self.refresh_metrics()
            if now >= self._next_purge:
                self._next_purge = now + self.options.purge_interval
                purged = await self.store.purge(self.options.retention)
                if purged:
                    log.info("outbox relay purged %d sent rows", purged)
        except errors.StoreError as exc:
            log.warning("outbox relay housekeeping failed: %s", exc)

    async def refresh_metrics(self) -> ports.OutboxStats:
        """Update the backlog gauges from the store; return the figures.

        Raises:
            StoreError: the database failed.
        """
        stats = await self.store.stats()
        OUTBOX_BACKLOG.set(stats.backlog)
        OUTBOX_OLDEST_AGE.set(stats.oldest_age)
        return stats
