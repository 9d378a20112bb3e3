"""The outbox relay: publishes committed outbox rows with broker confirmation, then marks them sent.

Each round claims a batch from the :class:`~conveyor.ports.OutboxStore`,
publishes it and settles it:

* rows of one key are published one after another in outbox order, and a
  failure stops that key for the round (its later rows wait, so order holds);
  keyless rows and different keys are published concurrently (bounded);
* a message is marked sent only after the broker confirmed it. A relay that
  dies in between publishes it again after restart with the same message id
  (at-least-once; the consumers' inbox drops the duplicate). The crash point
  ``relay.after-publish`` (:func:`conveyor.crash.maybe_crash`) reproduces that.

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
so it never spins. It also refreshes the backlog gauges and purges rows sent
longer ago than ``retention``.
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

from conveyor import envelope, errors, ports, telemetry
from conveyor.crash import maybe_crash

log = logging.getLogger("conveyor.relay")

# Database-wide figures, the same in every process that reads them: in multiprocess
# mode the live processes' maximum (a dead process's last reading is dropped).
OUTBOX_BACKLOG = Gauge("conveyor_outbox_backlog", "Unsent outbox rows (due or delayed).", multiprocess_mode="livemax")
OUTBOX_OLDEST_AGE = Gauge(
    "conveyor_outbox_oldest_age_seconds", "Age of the oldest due, unsent outbox row.", multiprocess_mode="livemax"
)
OUTBOX_PARKED = Gauge(
    "conveyor_outbox_parked",
    "Outbox rows parked after their last attempt (see conveyor outbox).",
    multiprocess_mode="livemax",
)
RELAY_PUBLISHED = Counter("conveyor_relay_published", "Outbox messages published and confirmed by the broker.")
RELAY_FAILURES = Counter(
    "conveyor_relay_publish_failures", "Outbox publishes that failed (refused, or the broker was unreachable)."
)

_STORED_PREFIX = envelope.HTTP_PREFIX


@dataclass(frozen=True, slots=True)
class RelayOptions:
    """How the relay paces itself.

    Attributes:
        batch_size: rows claimed per round.
        max_in_flight: publishes awaiting broker confirmation at once.
        poll_interval: longest idle sleep without a notification (seconds).
        min_idle: shortest idle sleep after an empty claim unless a commit is
            notified (seconds): the floor that keeps an idle relay from spinning.
        retry_base: backoff of a row after its first refused publish (seconds).
        retry_max: longest backoff of a row (seconds).
        max_attempts: refused publishes of one row before it is parked.
        max_backoff: longest pause of the whole relay while the broker or
            database is failing (seconds).
        retention: sent rows older than this are deleted.
        purge_interval: seconds between purges.
        metrics_interval: seconds between backlog gauge refreshes.
        stall_after: a due row unsent this long makes readiness degraded (seconds).
    """

    batch_size: int = 100
    max_in_flight: int = 64
    poll_interval: float = 1.0
    min_idle: float = 0.1
    retry_base: float = 1.0
    retry_max: float = 300.0
    max_attempts: int = 10
    max_backoff: float = 30.0
    retention: timedelta = timedelta(days=7)
    purge_interval: float = 300.0
    metrics_interval: float = 5.0
    stall_after: float = 60.0


@dataclass(frozen=True, slots=True)
class RoundResult:
    """What one round did.

    Attributes:
        claimed: rows claimed.
        published: rows the broker confirmed.
        failed: rows the broker refused (an attempt spent; parked ones included).
        parked: rows parked after their last attempt.
        interrupted: rows not published because the broker was unreachable.
    """

    claimed: int
    published: int
    failed: int
    parked: int = 0
    interrupted: int = 0


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
        self._system = telemetry.messaging_system(transport)
        self._limit = asyncio.Semaphore(self.options.max_in_flight)
        self._next_metrics = 0.0
        self._next_purge = time.monotonic() + self.options.purge_interval
        self.stats: ports.OutboxStats | None = None
        """The backlog as of the last metrics refresh (None before the first)."""

    def retry_delay(self, attempts: int) -> float:
        """Backoff before a row that failed ``attempts + 1`` times is due again (with jitter)."""
        base = min(self.options.retry_base * 2.0 ** min(attempts, 30), self.options.retry_max)
        return base * random.uniform(0.8, 1.0)

    async def run_once(self) -> RoundResult:
        """Claim one batch, publish it, settle it.

        Raises:
            StoreError: the database failed (nothing of this round was marked
                unless published before the failure).
            Exception: anything a publish raised other than a
                :class:`~conveyor.errors.TransportError` (a bug); the rows the
                broker confirmed in this round are marked sent first.
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
            outage = asyncio.Event()
            outcomes = await asyncio.gather(
                *(self._send_lane(batch, lane, outage) for lane in (*lanes.values(), *singles)),
                return_exceptions=True,
            )
            # Every lane has finished, so everything confirmed is recorded before a bug propagates.
            counts: list[tuple[int, int, int, int]] = []
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
                counts.append(outcome)
        published, failed, parked, interrupted = (sum(lane[i] for lane in counts) for i in range(4))
        return RoundResult(len(messages), published, failed, parked, interrupted)

    async def _send_lane(
        self, batch: ports.OutboxBatch, lane: list[ports.OutboxMessage], outage: asyncio.Event
    ) -> tuple[int, int, int, int]:
        """Publish a lane in order; return (published, failed, parked, interrupted)."""
        sent = 0
        try:
            for message in lane:
                async with self._limit:
                    if outage.is_set():
                        return sent, 0, 0, 0  # the broker is down: the rest waits for the next round
                    try:
                        await self._publish(message)
                    except errors.TransientTransportError as exc:
                        outage.set()
                        RELAY_FAILURES.inc()
                        batch.interrupted(message, f"{type(exc).__name__}: {exc}")
                        return sent, 0, 0, 1
                    except errors.TransportError as exc:
                        return sent, 1, self._refused(batch, message, exc), 0  # later rows of the key wait
                maybe_crash("relay.after-publish")
                batch.sent(message)
                sent += 1
            return sent, 0, 0, 0
        finally:
            RELAY_PUBLISHED.inc(sent)

    async def _publish(self, message: ports.OutboxMessage) -> None:
        """Publish one row under a PRODUCER span that continues the trace the row was written in."""
        wire = wire_message(message, self._prefix)
        if not telemetry.tracing():
            await self.transport.publish(message.topic, wire)
            return
        stored = message.headers.get(_STORED_PREFIX + "traceparent"), message.headers.get(_STORED_PREFIX + "tracestate")
        with telemetry.send_span(message.topic, message.message_id, self._system, parent=stored) as (parent, state):
            if parent is not None:
                wire.headers[self._prefix + "traceparent"] = parent
                if state:
                    wire.headers[self._prefix + "tracestate"] = state
            await self.transport.publish(message.topic, wire)

    def _refused(self, batch: ports.OutboxBatch, message: ports.OutboxMessage, exc: errors.TransportError) -> int:
        """Record a refused publish: a failed attempt, or the last one (park). Return 1 if parked."""
        RELAY_FAILURES.inc()
        error = f"{type(exc).__name__}: {exc}"
        attempt = message.attempts + 1
        if attempt >= self.options.max_attempts:
            batch.parked(message, error)
            waiting = "" if message.key is None else f"; later messages with key {message.key!r} wait"
            log.error(
                "parked outbox message %s to %s after %d attempts: %s%s (see `conveyor outbox list --parked`)",
                message.message_id, message.topic, attempt, exc, waiting,
            )  # fmt: skip
            return 1
        batch.failed(message, error, self.retry_delay(message.attempts))
        log.warning(
            "could not publish outbox message %s to %s (attempt %d of %d): %s",
            message.message_id, message.topic, attempt, self.options.max_attempts, exc,
        )  # fmt: skip
        return 0

    async def run(self, stop: asyncio.Event) -> None:
        """Relay until ``stop`` is set; the round in progress is finished first.

        Never raises but on cancellation: a failed round is logged and followed
        by a backoff.
        """
        backoff = 0.0
        while not stop.is_set():
            try:
                result = await self.run_once()
            except errors.StoreError as exc:
                backoff = self._next_backoff(backoff)
                log.warning("outbox relay: database failed (%s); retrying in %.1fs", exc, backoff)
                await self._sleep(stop, backoff)
                continue
            except Exception:
                backoff = self._next_backoff(backoff)
                log.exception("outbox relay round failed; retrying in %.1fs", backoff)
                await self._sleep(stop, backoff)
                continue
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
        except Exception:
            log.exception("outbox relay housekeeping failed")

    async def health(self) -> None:
        """Readiness probe (non-critical): the backlog as of the last metrics refresh.

        Raises:
            TransportError: rows are parked, or the oldest due row has waited
                longer than ``stall_after`` (the relay is stalled or far behind).
        """
        stats = self.stats
        if stats is None:
            return
        if stats.parked:
            raise errors.TransportError(f"{stats.parked} outbox message(s) parked; see `conveyor outbox list --parked`")
        if stats.oldest_age > self.options.stall_after:
            raise errors.TransportError(
                f"the oldest due outbox message has waited {stats.oldest_age:.0f}s "
                f"(more than {self.options.stall_after:.0f}s): the relay is stalled or behind"
            )

    async def refresh_metrics(self) -> ports.OutboxStats:
        """Update the backlog gauges from the store; return the figures.

        Raises:
            StoreError: the database failed.
        """
        stats = await self.store.stats()
        self.stats = stats
        OUTBOX_BACKLOG.set(stats.backlog)
        OUTBOX_OLDEST_AGE.set(stats.oldest_age)
        OUTBOX_PARKED.set(stats.parked)
        return stats
