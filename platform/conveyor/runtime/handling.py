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
dropped, and nothing a handler does crashes the worker. What a failure leads
to is decided by :func:`conveyor.fate.decide` alone (an outage of the database
or the broker that its probe confirms holds the message, spending no attempt,
for at most ``hold_limit`` seconds) and carried out by
:class:`~conveyor.runtime.settling.Settler`. The handler runs under its
timeout; Conveyor's commit of its unit of work under a deadline of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Sequence
from typing import Any

from opentelemetry import trace

from conveyor import context, crash, deadlines, envelope, errors, fate, persistence, plain, ports, registry, telemetry
from conveyor.runtime import settling, threads
from conveyor.runtime.failures import HandlerExit, taken_back
from conveyor.runtime.probes import Probes
from conveyor.transaction import AlreadyHandled

log = logging.getLogger("conveyor.worker")

SYNC_GRACE = 30.0
"""Least time a timed-out sync handler's thread is waited for before its message is settled anyway."""
OUTAGE_BACKOFF = fate.HOLD_PAUSES
"""First and longest pause (seconds) while a message is held through a database or broker outage."""
COMMIT_TIMEOUT = 30.0
"""Default seconds Conveyor's commit of a handler's unit of work may take (apart from the handler's timeout)."""
INBOX_QUESTIONS = 3
"""Times the inbox is asked, when it fails, whether a message about to be dead-lettered was applied already."""


class Failed(Exception):
    """An attempt failed in ``phase`` with ``error`` (the attempt's own exception, carried to the decision)."""

    def __init__(self, phase: fate.Phase, error: BaseException) -> None:
        super().__init__(f"{phase}: {type(error).__name__}: {error}")
        self.phase = phase
        self.error = error


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
        probes: probes of the database and the broker, which a hold needs;
            by default the broker's ``check`` and the units' ``check``.
        hold_limit: seconds one message may be held through outages before its
            attempts count again (``CONVEYOR_HOLD_LIMIT``).
        commit_timeout: seconds Conveyor's commit of the unit of work may take
            (``CONVEYOR_COMMIT_TIMEOUT``); the handler's own timeout does not include it.
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
        probes: Probes | None = None,
        hold_limit: float = fate.HOLD_LIMIT,
        commit_timeout: float = COMMIT_TIMEOUT,
    ) -> None:
        self.handler = handler
        self._plain = plain_messages or handler.plain
        self._transport = transport
        self._units = transactions
        self._source = source
        self._max_bytes = max_message_bytes
        self._prefix = transport.binary_prefix
        self._commit_timeout = commit_timeout
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
        if probes is None:
            probes = Probes(getattr(transactions, "check", None), transport.check)
        limits = fate.Limits(handler.retry, hold_limit=hold_limit)
        self.settler = settling.Settler(handler, transport, probes, limits, self.count, dead_letters, source)
        """Carries out the fate of failed messages: nacks, dead letters, holds."""

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

    async def dead_letter(self, delivery: ports.Delivery, attempt: int, kind: str, text: str) -> None:
        """Publish a copy to the dead-letter topic with the reason, then ack (see :class:`settling.Settler`)."""
        await self.settler.dead_letter(delivery, attempt, kind, text)

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

        Dead-lettered here: a message the transport could not read as sent
        (``WireMessage.unreadable``), one over the size limit, one delivered more
        often than ``max_attempts`` (earlier attempts died with their worker),
        and poison (not a valid CloudEvent, or a payload the annotation refuses).

        Raises:
            TransportError: the dead letter could not be published nor the delivery settled.
        """
        handler = self.handler
        if delivery.message.unreadable is not None:
            text = f"the transport could not read the message as sent: {delivery.message.unreadable}"
            await self.dead_letter(delivery, delivery.attempt, "InvalidMessage", text)
            return None
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
            # worker (a crash, an OOM kill). Running it again would only loop; but a copy whose
            # earlier attempt committed before its worker died is a duplicate, not a dead letter.
            if await self._applied_before(delivery) is True:
                await self._ack_duplicate(delivery)
                return None
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

    async def _ack_duplicate(self, delivery: ports.Delivery) -> None:
        """Acknowledge a copy the inbox shows applied, instead of dead-lettering it."""
        log.info("%s: message applied by another attempt or copy; this copy is acknowledged, not dead-lettered",
                 self.handler.name)  # fmt: skip
        await delivery.ack()
        self._outcomes["duplicate"].inc()

    async def _applied_before(self, delivery: ports.Delivery) -> bool | None:
        """Whether the inbox holds this handler's row for the delivery's message (an earlier attempt committed).

        Only a message that reads as a CloudEvent has an id to look up. A
        database failure its probe confirms is held through (bounded, like an
        attempt's); any other failure is asked again, :data:`INBOX_QUESTIONS`
        times in all, and then the answer is None: unknown.
        """
        if self._units is None:
            return False
        try:
            if self._plain:
                message = plain.read(delivery.message, self.handler.topic, self._system)
            else:
                message = envelope.decode(delivery.message)
        except errors.InvalidMessage:
            return False
        tries = fate.Tries(delivery.attempt)
        failures = 0
        while True:
            try:
                unit = await self._within_commit_deadline(self._units.begin(self.handler.name, message.scoped_id))
            except (errors.StoreError, TimeoutError) as exc:
                outcome = await self.settler.decide(fate.Phase.COMMIT, exc, tries)
                if isinstance(outcome, fate.Hold):
                    tries = await self.settler.hold(outcome, tries)
                    continue
                failures += 1
                if failures >= INBOX_QUESTIONS:
                    log.warning("%s: could not ask the inbox whether another copy applied a message (%s: %s)",
                                self.handler.name, type(exc).__name__, exc)  # fmt: skip
                    return None
                await asyncio.sleep(self.handler.retry.delay(failures))
                continue
            if unit is None:
                return True
            await unit.rollback(None)
            return False

    async def _run(self, delivery: ports.Delivery, message: envelope.Envelope, payload: Any) -> str | None:
        """Run the attempt and settle the delivery; return the failure text, if any.

        A failure is decided by :func:`conveyor.fate.decide`: a hold (an
        outage its probe confirms, a conflict) runs the attempt again in place
        without spending one of the message's attempts; a retry nacks; a dead
        letter is published before the ack.
        """
        handler = self.handler
        attempt = message.attempt
        tries = fate.Tries(attempt)
        while True:
            ctx = context.Context(message, handler.name, self._source, self._units)
            started = time.perf_counter()
            try:
                try:
                    await self._attempt(payload, ctx)
                finally:  # every outcome, so slow failures and timeouts show in the histogram too
                    self._seconds.observe(time.perf_counter() - started)
            except AlreadyHandled:
                log.debug("%s skipped duplicate message %s", handler.name, message.id)
                await delivery.ack()
                self._outcomes["duplicate"].inc()
                return None
            except asyncio.CancelledError:
                raise
            except Failed as failed:
                outcome = await self.settler.decide(failed.phase, failed.error, tries)
                if isinstance(outcome, fate.Hold):
                    tries = await self.settler.hold(outcome, tries)
                    continue
                return await self._settle(delivery, attempt, outcome)
            break
        while ctx.unit is None and ctx.outgoing:
            try:
                await self._send(ctx.outgoing)
                break
            except errors.TransportError as exc:
                outcome = await self.settler.decide(fate.Phase.PUBLISH, exc, tries)
                if isinstance(outcome, fate.Hold):
                    tries = await self.settler.hold(outcome, tries)
                    continue
                return await self._settle(delivery, attempt, outcome)
        await delivery.ack()
        self._outcomes["succeeded"].inc()
        return None

    async def settle_failure(self, delivery: ports.Delivery, attempt: int, exc: BaseException) -> str | None:
        """Settle a message the handler failed (a batch handler's, per message); return the failure text.

        ``Retry`` retries after its delay (or the backoff), ``Reject``
        dead-letters at once, anything else (a timeout included) retries with
        backoff; a retry is a dead letter once the message's attempts are spent.
        """
        return await self._settle(delivery, attempt, fate.fault(exc, attempt, self.handler.retry))

    async def _settle(
        self, delivery: ports.Delivery, attempt: int, outcome: fate.Retry | fate.DeadLetter
    ) -> str | None:
        """Carry out a retry or a dead letter; return the failure text (None: a duplicate after all).

        Before a dead letter the inbox is asked (it waits for a copy of the
        message still being committed elsewhere): a message another copy
        applied is acknowledged as a duplicate, so the dead-letter topic never
        holds a message whose effects are in the database.
        """
        if isinstance(outcome, fate.DeadLetter) and await self._applied_before(delivery) is True:
            await self._ack_duplicate(delivery)
            return None
        return await self.settler.settle(delivery, attempt, outcome)

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

    async def _attempt(self, payload: Any, ctx: context.Context) -> None:
        """Call the handler under its timeout, then commit its unit of work under the commit's own deadline.

        The unit of work (opened by ``ctx.transaction()``, by
        ``transactional=True`` or for a delayed publish) commits only here,
        after the handler returned; any failure rolls it back.

        Raises:
            AlreadyHandled: the inbox has the message (a duplicate delivery).
            Failed: the attempt failed: where (the handler's code, or
                Conveyor's own inbox claim or commit) and with what.
        """
        handler = self.handler
        args = (payload, ctx) if handler.takes_context else (payload,)
        running: asyncio.Future[Any] | None = None
        phase = fate.Phase.HANDLER
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
            except asyncio.CancelledError:
                if self.deadlines.finish(deadline):
                    raise TimeoutError(f"{handler.name} exceeded its timeout of {handler.timeout}s") from None
                raise
            except (SystemExit, KeyboardInterrupt) as exc:  # from the handler: it must not stop the worker
                raise HandlerExit(exc) from exc
            finally:
                self.deadlines.finish(deadline)
            phase = fate.Phase.COMMIT  # the handler's code is done: what remains is Conveyor's
            if ctx.unit is None and ctx.needs_outbox:
                await self._within_commit_deadline(ctx.open_transaction())
            if ctx.unit is not None:
                crash.maybe_crash("handler.before-commit")
                await self._within_commit_deadline(ctx.unit.commit(ctx.outgoing))
                crash.maybe_crash("handler.after-commit")
        except AlreadyHandled:
            if ctx.unit is not None:
                await ctx.unit.rollback(None)
            raise
        except BaseException as exc:
            if running is not None and not running.done() and isinstance(exc, TimeoutError):
                await self._outlive(running)
            if phase is fate.Phase.HANDLER and ctx.in_database:  # the inbox claim itself failed or hung
                phase = fate.Phase.COMMIT
            error: BaseException = exc
            if ctx.unit is not None:
                translated = await ctx.unit.rollback(exc)
                if translated is not None:  # the database failed a statement of the handler's
                    error = translated
            if isinstance(exc, asyncio.CancelledError):
                raise
            if not isinstance(exc, Exception):  # GeneratorExit and the like: not ours to keep
                raise
            raise Failed(phase, error) from exc

    async def _within_commit_deadline(self, step: Any) -> Any:
        """Await one of Conveyor's own database steps under the commit's deadline (a timeout blames the database)."""
        async with asyncio.timeout(self._commit_timeout):
            return await step
