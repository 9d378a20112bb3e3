"""Publishing one claimed outbox batch in waves that keep per-key order (the relay's broker side).

A wave holds every keyless row and the next row of each key; it is sent
pipelined (``Transport.publish_many``, at most ``max_in_flight`` at once). A
key's next row joins the next wave only once the broker confirmed the row
before it, so a refused row stops its key for the batch and per-key order
holds whatever the broker does with the rest of the wave. A failed publish's
fate is :func:`conveyor.fate.decide`'s: an outage that the broker's probe
confirms spends no attempt (for at most ``hold_limit`` seconds per row) and
ends the batch after the wave; a refusal spends one; the last one parks the
row. :mod:`conveyor.runtime.relay` claims the batches, runs this and paces itself.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from prometheus_client import Counter

from conveyor import envelope, errors, fate, ports, retry, stores, telemetry
from conveyor.crash import maybe_crash
from conveyor.runtime.probes import Probes

log = logging.getLogger("conveyor.relay")

RELAY_PUBLISHED = Counter("conveyor_relay_published", "Outbox messages published and confirmed by the broker.")
RELAY_FAILURES = Counter(
    "conveyor_relay_publish_failures", "Outbox publishes that failed (refused, or the broker was unreachable)."
)

_STORED_PREFIX = envelope.HTTP_PREFIX
_MAX_TRACKED_HOLDS = 100_000


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
        hold_limit: seconds one row may be held through broker outages (no
            attempt spent) before its failed publishes spend attempts.
    """

    batch_size: int = 1000
    max_in_flight: int = 256
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
    hold_limit: float = fate.HOLD_LIMIT


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


def wire_message(message: stores.OutboxMessage, prefix: str) -> envelope.WireMessage:
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


class WavePublisher:
    """Publishes claimed batches in waves and records each row's fate in its batch.

    Args:
        transport: a connected transport.
        options: the relay's options (``max_in_flight``, the retry and parking policy).
    """

    def __init__(self, transport: ports.Transport, options: RelayOptions) -> None:
        self.transport = transport
        self.options = options
        self._prefix = transport.binary_prefix
        self._system = telemetry.messaging_system(transport)
        self._probes = Probes(None, transport.check)
        policy = retry.RetryPolicy(max_attempts=options.max_attempts, initial_delay=options.retry_base,
                                   max_delay=options.retry_max, jitter=0)  # fmt: skip
        self._limits = fate.Limits(policy, hold_limit=options.hold_limit)
        self._held: dict[int, tuple[float, bool]] = {}  # row id -> (when its first hold began, rechecked)

    def retry_delay(self, attempts: int) -> float:
        """Backoff before a row that failed ``attempts + 1`` times is due again (with jitter)."""
        base = min(self.options.retry_base * 2.0 ** min(attempts, 30), self.options.retry_max)
        return base * random.uniform(0.8, 1.0)

    async def publish(self, batch: stores.OutboxBatch) -> RoundResult:
        """Publish ``batch`` in waves; record in it what the broker confirmed, refused or missed.

        A message is recorded sent only after the broker confirmed it; the
        crash point ``relay.after-publish`` sits between the two.

        Raises:
            Exception: anything a publish raised other than a
                :class:`~conveyor.errors.TransportError` (a bug); what was
                confirmed before is recorded.
        """
        messages = batch.messages
        if not messages:
            return RoundResult(0, 0, 0)
        lanes: dict[str, collections.deque[stores.OutboxMessage]] = {}
        wave: list[stores.OutboxMessage] = []
        for message in messages:
            if message.key is None:
                wave.append(message)
            elif message.key in lanes:
                lanes[message.key].append(message)
            else:
                lanes[message.key] = collections.deque()
                wave.append(message)
        published = failed = parked = interrupted = 0
        while wave:
            results = await self._publish_wave(wave)
            following: list[stores.OutboxMessage] = []
            outage = False
            for message, result in zip(wave, results, strict=True):
                if result is None:
                    maybe_crash("relay.after-publish")
                    batch.sent(message)
                    if self._held:
                        self._held.pop(message.id, None)
                    published += 1
                    lane = lanes.get(message.key) if message.key is not None else None
                    if lane:
                        following.append(lane.popleft())
                elif isinstance(result, errors.TransportError):
                    RELAY_FAILURES.inc()
                    outcome = await self._decide(message, result)
                    if isinstance(outcome, fate.Hold):  # the broker is down: no attempt spent
                        outage = True
                        batch.interrupted(message, f"{type(result).__name__}: {result}")
                        interrupted += 1
                    else:
                        failed += 1
                        parked += self._refused(batch, message, result, outcome)  # later rows of the key wait
                else:  # pragma: no cover - publish_many returns transport errors only
                    raise result
            RELAY_PUBLISHED.inc(sum(1 for result in results if result is None))
            if outage:
                break  # the broker is down: the rest waits for the next round
            wave = following
        return RoundResult(len(messages), published, failed, parked, interrupted)

    async def _publish_wave(self, wave: Sequence[stores.OutboxMessage]) -> list[Exception | None]:
        """``publish_many`` in chunks of ``max_in_flight``; each row under a PRODUCER span when tracing."""
        results: list[Exception | None] = []
        step = max(self.options.max_in_flight, 1)
        for start in range(0, len(wave), step):
            chunk = wave[start : start + step]
            with contextlib.ExitStack() as spans:
                pairs = [(m.topic, self._wire(m, spans)) for m in chunk]
                results.extend(await self.transport.publish_many(pairs))
        return results

    def _wire(self, message: stores.OutboxMessage, spans: contextlib.ExitStack) -> envelope.WireMessage:
        """The row's wire message; with tracing, a PRODUCER span continuing the trace the row was written in."""
        wire = wire_message(message, self._prefix)
        if not telemetry.tracing():
            return wire
        stored = message.headers.get(_STORED_PREFIX + "traceparent"), message.headers.get(_STORED_PREFIX + "tracestate")
        span = telemetry.send_span(message.topic, message.message_id, self._system, parent=stored)
        parent, state = spans.enter_context(span)
        if parent is not None:
            wire.headers[self._prefix + "traceparent"] = parent
            if state:
                wire.headers[self._prefix + "tracestate"] = state
        return wire

    async def _decide(self, message: stores.OutboxMessage, error: errors.TransportError) -> fate.Outcome:
        """A failed publish's fate (:func:`conveyor.fate.decide`), with the row's holds bounded by ``hold_limit``."""
        now = asyncio.get_running_loop().time()
        since, rechecked = self._held.get(message.id, (now, False))
        tries = fate.Tries(message.attempts + 1, held_for=now - since, rechecked=rechecked)
        healthy = await self._probes.healthy(fate.blamed(fate.Phase.PUBLISH, error), since=now)
        outcome = fate.decide(fate.Phase.PUBLISH, error, tries, self._limits, healthy)
        if isinstance(outcome, fate.Hold):
            if len(self._held) >= _MAX_TRACKED_HOLDS:  # rows another relay took since: start afresh
                self._held.clear()
            self._held[message.id] = (since, rechecked or outcome.recheck)
        else:
            self._held.pop(message.id, None)
        return outcome

    def _refused(
        self,
        batch: stores.OutboxBatch,
        message: stores.OutboxMessage,
        exc: errors.TransportError,
        outcome: fate.Retry | fate.DeadLetter,
    ) -> int:
        """Record a failed publish that spends an attempt: a retry, or the last one (park). Return 1 if parked."""
        error = f"{type(exc).__name__}: {exc}"
        attempt = message.attempts + 1
        if isinstance(outcome, fate.DeadLetter):
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
