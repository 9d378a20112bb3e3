"""One handler's deliveries, each to the end: the policy that is the same on every broker.

For each delivery: decode the CloudEvent and the payload (a message that fails
either is *poison*: dead-lettered at once with the reason; a handler that takes
plain messages gets an envelope synthesised for one that is no CloudEvent at
all, see :mod:`conveyor.plain`), run the handler under its timeout, then

* success: send what the handler published, then ack;
* ``Retry`` or an exception: nack with the backoff delay, or dead-letter once
  ``max_attempts`` is reached;
* ``Reject``: dead-letter at once.

A dead-lettered copy goes to ``<topic>.dlq`` with the original body and
headers plus ``conveyor-dlq-*`` headers (handler, error type, error, attempts,
time); only after the broker confirmed it is the original acked. Nothing is
dropped, and nothing a handler does crashes the worker. An outage of the
database or the broker holds the message instead (no attempt is spent).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
from collections.abc import Sequence
from typing import Any

from opentelemetry import trace

from conveyor import context, crash, deadlines, envelope, errors, persistence, plain, ports, registry, telemetry
from conveyor.runtime import threads
from conveyor.runtime.failures import HandlerExit, dead_letter_headers, dead_letter_topic, taken_back
from conveyor.transaction import AlreadyHandled

log = logging.getLogger("conveyor.worker")

SYNC_GRACE = 30.0
"""Least time a timed-out sync handler's thread is waited for before its message is settled anyway."""
OUTAGE_BACKOFF = (0.5, 30.0)
"""First and longest pause (seconds) while a message is held through a database or broker outage."""


class HandlerRunner:
    """Runs one handler for the deliveries of its subscription.

    Args:
        handler: the handler.
        transport: where to publish outgoing messages and dead letters.
        source: CloudEvents ``source`` of messages the handler publishes.
        max_message_bytes: larger messages are dead-lettered unread.
        transactions: opens handler attempts' units of work (``ctx.transaction()``);
            ``None`` without a database.
        dead_letters: holds dead letters the broker refuses for good; ``None``
            without a database (they are then redelivered until accepted).
        plain_messages: accept messages that are not CloudEvents even if the
            handler does not say ``plain=True`` (``CONVEYOR_PLAIN_MESSAGES``).
    """

    def __init__(
        self,
        handler: registry.Handler,
        transport: ports.Transport,
        *,
        source: str,
        max_message_bytes: int,
        transactions: persistence.UnitOfWorkFactory | None = None,
        dead_letters: persistence.DeadLetterStore | None = None,
        plain_messages: bool = False,
    ) -> None:
        self.handler = handler
        self._plain = plain_messages or handler.plain
        self._transport = transport
        self._units = transactions
        self._held = dead_letters
        self._source = source
        self._max_bytes = max_message_bytes
        self._prefix = transport.binary_prefix
        self._dlq_topic = dead_letter_topic(handler.topic)
        self._system = telemetry.messaging_system(transport)
        self._seconds = telemetry.HANDLER_SECONDS.labels(handler.name)
        self.deadlines = deadlines.Deadlines(handler.timeout)
        """The deadlines of this handler's running attempts."""
        self._outcomes = {
            outcome: telemetry.MESSAGES.labels(handler.name, outcome)
            for outcome in ("succeeded", "retried", "dead_lettered", "duplicate")
        }
        self._in_hand: dict[int, float] = {}  # token -> monotonic start, oldest first
        self._tokens = itertools.count()

    def took(self) -> int:
        """A message (or batch) is in hand from now until :meth:`let_go`; returns its token."""
        token = next(self._tokens)
        self._in_hand[token] = time.monotonic()
        return token

    def let_go(self, token: int) -> None:
        """The message (or batch) of ``token`` is settled, or left for redelivery."""
        self._in_hand.pop(token, None)

    def oldest_in_hand(self) -> float:
        """Seconds the oldest message in hand has been so: an attempt running, or one held through an outage."""
        for started in self._in_hand.values():
            return time.monotonic() - started
        return 0.0

    def observe(self, seconds: float) -> None:
        """Record an attempt's duration."""
        self._seconds.observe(seconds)

    def count(self, outcome: str) -> None:
        """Count a message's outcome (``succeeded``, ``retried``, ``dead_lettered``, ``duplicate``)."""
        self._outcomes[outcome].inc()

    async def process(self, delivery: ports.Delivery) -> None:
        """Handle one delivery to the end: ack, nack or dead-letter. Never raises.

        A delivery may have an optional ``claim() -> bool`` method (the Kafka
        transport's do): it is called right before anything else, and False
        means the delivery is no longer this member's to run (its partition was
        revoked while it waited in a lane or the buffer). It is then skipped
        without being settled; the partition's new owner runs it.
        """
        claim = getattr(delivery, "claim", None)
        if claim is not None and not claim():
            log.debug("%s skipped a delivery this worker no longer owns", self.handler.name)
            return
        token = self.took()
        try:
            await self._process(delivery)
        except asyncio.CancelledError:
            if not taken_back(delivery):
                raise  # drain deadline: leave the delivery unsettled for redelivery
            log.warning("%s: an attempt was cancelled by the transport (the message is no longer this "
                        "worker's: its partition went to another member)", self.handler.name)  # fmt: skip
        except errors.TransportError:
            # The broker refused the ack or nack itself: it redelivers the message.
            log.exception("could not settle a delivery of %s; the broker will redeliver it", self.handler.name)
        except Exception as exc:
            # Deciding this message's fate failed: a message no code path could settle would be
            # redelivered forever and, once enough of them fill the prefetch, stop the subscription.
            log.exception("could not decide the fate of a message of %s; dead-lettering it", self.handler.name)
            await self.last_resort(delivery, exc)
        finally:
            self.let_go(token)

    async def last_resort(self, delivery: ports.Delivery, exc: Exception) -> None:
        """Dead-letter a delivery whose handling failed unexpectedly; nack it if even that fails."""
        text = f"could not decide the fate of this message: {type(exc).__name__}: {exc}"
        try:
            await self.dead_letter(delivery, delivery.attempt, "InternalError", text)
        except Exception:
            log.exception("could not dead-letter a message of %s; nacking it", self.handler.name)
            with contextlib.suppress(Exception):
                await delivery.nack(self.handler.retry.max_delay)

    async def _process(self, delivery: ports.Delivery) -> None:
        admitted = await self.admit(delivery)
        if admitted is None:
            return
        message, payload = admitted
        if not telemetry.tracing():
            await self._run(delivery, message, payload)
            return
        with telemetry.consumer_span(delivery.topic, self.handler.name, message, self._system) as span:
            failure = await self._run(delivery, message, payload)
            if failure is not None:
                span.set_status(trace.Status(trace.StatusCode.ERROR, failure))

    async def admit(self, delivery: ports.Delivery) -> tuple[envelope.Envelope, Any] | None:
        """Decode a delivery for the handler, or dead-letter it and return None.

        Dead-lettered here: a message over the size limit, one delivered more
        often than ``max_attempts`` (earlier attempts died with their worker),
        and poison (not a valid CloudEvent, or a payload the annotation refuses).

        Raises:
            TransportError: the dead letter could not be published nor the delivery settled.
        """
        handler = self.handler
        size = len(delivery.message.body)
        if size > self._max_bytes:
            await self.dead_letter(
                delivery,
                delivery.attempt,
                "MessageTooLarge",
                f"message of {size} bytes exceeds the limit of {self._max_bytes} bytes",
            )
            return None
        if delivery.attempt > handler.retry.max_attempts:
            # Delivered again without ever being settled: each earlier attempt died with its
            # worker (a crash, an OOM kill). Running it again would only loop.
            text = (
                f"delivered {delivery.attempt} times, more than max_attempts={handler.retry.max_attempts}: "
                "earlier attempts never finished (the worker crashed or was stopped with it)"
            )
            await self.dead_letter(delivery, delivery.attempt, "TooManyDeliveries", text)
            return None
        try:
            if self._plain:  # a CloudEvent is decoded (and validated) all the same
                message = plain.read(delivery.message, handler.topic, self._system)
            else:
                message = envelope.decode(delivery.message)
            payload = handler.decode(message)
        except errors.InvalidMessage as exc:
            await self.dead_letter(delivery, delivery.attempt, "InvalidMessage", str(exc))
            return None
        # The broker's count (or our own retry header) decides, never the producer's ``attempt``
        # attribute: a producer claiming attempt 5 would otherwise skip every retry.
        message.attempt = delivery.attempt
        return message, payload

    async def _run(self, delivery: ports.Delivery, message: envelope.Envelope, payload: Any) -> str | None:
        """Run the attempt and settle the delivery; return the failure text, if any.

        An outage of the service's own infrastructure (the database or the
        broker unreachable) is not the message's fault: the delivery is held
        and the attempt run again after a capped backoff, without spending one
        of the message's attempts, until the outage ends or the worker drains.
        """
        handler = self.handler
        attempt = message.attempt
        pause = OUTAGE_BACKOFF[0]
        while True:
            ctx = context.Context(message, handler.name, self._source, self._units)
            started = time.perf_counter()
            try:
                try:
                    await self._attempt(payload, ctx)
                finally:  # every outcome, so slow failures and timeouts show in the histogram too
                    self._seconds.observe(time.perf_counter() - started)
            except (errors.StoreUnavailable, errors.TransientTransportError) as exc:
                pause = await self.hold(exc, pause)
                continue
            except AlreadyHandled:
                log.debug("%s skipped duplicate message %s", handler.name, message.id)
                await delivery.ack()
                self._outcomes["duplicate"].inc()
                return None
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Retry, Reject, a timeout or the handler's own error
                return await self.settle_failure(delivery, attempt, exc)
            break
        while ctx.unit is None and ctx.outgoing:
            try:
                await self._send(ctx.outgoing)
                break
            except errors.TransientTransportError as exc:
                pause = await self.hold(exc, pause)
            except errors.TransportError as exc:
                text = f"could not publish the handler's messages: {exc}"
                await self.failed(delivery, attempt, handler.retry.delay(attempt), "TransportError", text)
                return text
        await delivery.ack()
        self._outcomes["succeeded"].inc()
        return None

    async def settle_failure(self, delivery: ports.Delivery, attempt: int, exc: BaseException) -> str:
        """Settle a failed attempt by what it raised; return the failure text.

        ``Retry`` retries after its delay (or the backoff), ``Reject``
        dead-letters at once, anything else (a timeout included) retries with
        backoff; a retry is a dead letter once the message's attempts are spent.
        """
        retry = self.handler.retry
        if isinstance(exc, errors.Retry):
            delay = exc.delay if exc.delay is not None else retry.delay(attempt)
            await self.failed(delivery, attempt, delay, "Retry", exc.reason)
            return f"Retry: {exc.reason}"
        if isinstance(exc, errors.Reject):
            await self.dead_letter(delivery, attempt, "Rejected", exc.reason)
            return f"Rejected: {exc.reason}"
        if isinstance(exc, TimeoutError):
            reason = f"attempt exceeded the handler timeout of {self.handler.timeout}s"
            await self.failed(delivery, attempt, retry.delay(attempt), "TimeoutError", reason)
            return reason
        await self.failed(delivery, attempt, retry.delay(attempt), type(exc).__name__, str(exc))
        return f"{type(exc).__name__}: {exc}"

    async def _keep_refused(self, copy: envelope.WireMessage, refusal: errors.TransportError) -> bool:
        """Keep a dead letter the broker refused for good in the database; return whether it is kept."""
        if self._held is None:
            return False
        try:
            await self._held.hold(self._dlq_topic, copy)
        except errors.StoreError as exc:
            log.error("%s: could not hold a refused dead letter in the database either: %s", self.handler.name, exc)
            return False
        log.error(
            "%s: the broker refused a dead letter for %s (%s); it is held in the database (conveyor dlq list %s)",
            self.handler.name, self._dlq_topic, refusal, self.handler.topic,
        )  # fmt: skip
        return True

    async def _outlive(self, running: asyncio.Future[Any]) -> None:
        """Wait (bounded) for a timed-out sync handler's thread, which cannot be interrupted.

        Settling the message first would let its retry, or the next message of
        its key, run while the old attempt is still writing; so the attempt
        ends only when the thread does, up to a generous bound.
        """
        grace = max(10 * (self.handler.timeout or 0.0), SYNC_GRACE)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await asyncio.shield(running)
        if not running.done():
            log.error(
                "%s: a timed-out sync attempt is still running after %.0fs more; its retry may overlap it",
                self.handler.name, grace,
            )  # fmt: skip

    async def _send(self, outgoing: Sequence[persistence.Outgoing]) -> None:
        """Publish what a handler without a transaction published, in order (ids are deterministic)."""
        for message in outgoing:
            with telemetry.producer_span(message.topic, message.envelope, self._system):
                await self._transport.publish(message.topic, envelope.to_binary(message.envelope, self._prefix))

    async def hold(self, exc: errors.ConveyorError, pause: float) -> float:
        """Wait out an infrastructure outage before the next try; return the next pause."""
        what = "database" if isinstance(exc, errors.StoreError) else "broker"
        log.warning(
            "%s: the %s is unavailable (%s); holding the message for %.1fs without spending an attempt",
            self.handler.name, what, exc, pause,
        )  # fmt: skip
        telemetry.OUTAGE_WAITS.labels(self.handler.name, what).inc()
        await asyncio.sleep(pause * random.uniform(0.8, 1.0))
        return min(pause * 2, OUTAGE_BACKOFF[1])

    async def _attempt(self, payload: Any, ctx: context.Context) -> None:
        """Call the handler and commit its unit of work, all under the handler's timeout.

        The unit of work (opened by ``ctx.transaction()``, by
        ``transactional=True`` or for a delayed publish) commits only here,
        after the handler returned; any failure rolls it back.

        Raises:
            AlreadyHandled: the inbox has the message (a duplicate delivery).
            Exception: whatever the handler or the commit raised.
        """
        handler = self.handler
        args = (payload, ctx) if handler.takes_context else (payload,)
        running: asyncio.Future[Any] | None = None
        deadline = self.deadlines.start()
        try:
            try:
                if handler.transactional:
                    await ctx.open_transaction()
                if handler.is_async:
                    await handler.func(*args)
                else:
                    running = threads.run(handler.func, *args)
                    await asyncio.shield(running)
                if ctx.duplicate:  # the handler caught AlreadyHandled: it still is a duplicate
                    raise AlreadyHandled(f"{handler.name} already handled message {ctx.message.id}")
                if ctx.unit is None and ctx.needs_outbox:
                    await ctx.open_transaction()
                if ctx.unit is not None:
                    crash.maybe_crash("handler.before-commit")
                    ctx.in_database = True
                    await ctx.unit.commit(ctx.outgoing)
                    ctx.in_database = False
                    crash.maybe_crash("handler.after-commit")
            except asyncio.CancelledError:
                if self.deadlines.finish(deadline):
                    raise TimeoutError(f"{handler.name} exceeded its timeout of {handler.timeout}s") from None
                raise
            except (SystemExit, KeyboardInterrupt) as exc:  # from the handler: it must not stop the worker
                raise HandlerExit(exc) from exc
            finally:
                self.deadlines.finish(deadline)
        except BaseException as exc:
            if running is not None and not running.done() and isinstance(exc, TimeoutError):
                await self._outlive(running)
            if ctx.unit is not None:
                translated = await ctx.unit.rollback(exc)
                if translated is not None:  # the database failed a statement of the handler's
                    raise translated from exc
            if isinstance(exc, TimeoutError) and ctx.in_database:  # the database hangs: not the message's fault
                raise errors.StoreUnavailable(
                    f"the database did not answer Conveyor's inbox claim or commit within the handler timeout "
                    f"of {handler.timeout}s"
                ) from exc
            raise

    async def failed(self, delivery: ports.Delivery, attempt: int, delay: float, kind: str, text: str) -> None:
        """An attempt failed: nack for a retry after ``delay``, or dead-letter once attempts are spent."""
        if self.handler.retry.exhausted(attempt):
            await self.dead_letter(delivery, attempt, kind, text)
            return
        log.warning(
            "%s failed attempt %d/%d (%s: %s); retrying in %.2fs",
            self.handler.name,
            attempt,
            self.handler.retry.max_attempts,
            kind,
            text,
            delay,
        )
        await delivery.nack(delay)
        self._outcomes["retried"].inc()

    async def dead_letter(self, delivery: ports.Delivery, attempt: int, kind: str, text: str) -> None:
        """Publish a copy to the dead-letter topic with the reason, then ack (nack if the copy is refused)."""
        original = delivery.message
        headers = dict(original.headers)
        headers.update(dead_letter_headers(self.handler.name, delivery.topic, kind, text, attempt))
        copy = envelope.WireMessage(body=original.body, headers=headers, key=original.key, message_id=envelope.new_id())
        pause = OUTAGE_BACKOFF[0]
        while True:
            try:
                with telemetry.send_span(self._dlq_topic, copy.message_id, self._system):
                    await self._transport.publish(self._dlq_topic, copy)
            except errors.TransientTransportError as exc:  # an outage: held, no attempt spent, the reason kept
                pause = await self.hold(exc, pause)
                continue
            except errors.TransportError as exc:
                if exc.retryable or not await self._keep_refused(copy, exc):
                    log.error("could not dead-letter a message of %s (%s); it will be redelivered",
                              self.handler.name, exc)  # fmt: skip
                    await delivery.nack(self.handler.retry.delay(attempt))
                    return
            break
        await delivery.ack()
        self._outcomes["dead_lettered"].inc()
        log.error(
            "%s dead-lettered a message to %s after %d attempt(s): %s: %s",
            self.handler.name,
            self._dlq_topic,
            attempt,
            kind,
            text,
        )
