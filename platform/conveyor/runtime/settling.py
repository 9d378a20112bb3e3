"""Carrying out a failed message's fate (:mod:`conveyor.fate`): a nack for a retry, or a dead letter.

A dead-lettered copy goes to ``<topic>.dlq`` with the original body and
headers plus ``conveyor-dlq-*`` headers (handler, error type, error, attempts,
time); only after the broker confirmed it is the original acked. A broker that
does not answer holds the message (the same bounded, probed hold as an
attempt's); a broker that refuses the copy for good has it kept in the
database, or, without one, the original is nacked for redelivery.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections.abc import Callable

from conveyor import envelope, errors, fate, ports, registry, telemetry
from conveyor.dead_letter import one_line
from conveyor.persistence import DeadLetterStore
from conveyor.runtime.failures import dead_letter_headers, dead_letter_topic
from conveyor.runtime.probes import Probes
from conveyor.sagas import dead_letters as saga_dead_letters

log = logging.getLogger("conveyor.worker")

Count = Callable[[str], None]


class Settler:
    """Settles one handler's failed deliveries.

    Args:
        handler: the handler.
        transport: where dead letters go.
        probes: probes of the dependencies a hold blames.
        limits: the bounds of holds and retries.
        count: counts an outcome (``retried``, ``dead_lettered``).
        held: keeps dead letters the broker refuses for good; None without a database.
        source: CloudEvents ``source`` of what the worker publishes (a saga's dead-letter notice).
    """

    def __init__(
        self,
        handler: registry.Handler,
        transport: ports.Transport,
        probes: Probes,
        limits: fate.Limits,
        count: Count,
        held: DeadLetterStore | None,
        source: str,
    ) -> None:
        self._handler = handler
        self._source = source
        self._transport = transport
        self._probes = probes
        self.limits = limits
        self._count = count
        self._held = held
        self._dlq_topic = dead_letter_topic(handler.topic)
        self._system = telemetry.messaging_system(transport)

    async def decide(self, phase: fate.Phase, error: BaseException, tries: fate.Tries) -> fate.Outcome:
        """Probe the dependency ``error`` blames (if any), after the failure, and decide the message's fate."""
        failed_at = asyncio.get_running_loop().time()
        healthy = await self._probes.healthy(fate.blamed(phase, error), since=failed_at)
        return fate.decide(phase, error, tries, self.limits, healthy)

    async def hold(self, outcome: fate.Hold, tries: fate.Tries) -> fate.Tries:
        """Wait out a hold; return the delivery's tries with it counted."""
        handler = self._handler.name
        what = outcome.dependency.value if outcome.dependency is not None else "conflict"
        if outcome.dependency is None:
            log.info("%s: %s; running the attempt again", handler, outcome.reason)
        else:
            log.warning(
                "%s: %s; holding the message for %.1fs without spending an attempt (held %.0fs so far)",
                handler, outcome.reason, outcome.pause, tries.held_for,
            )  # fmt: skip
            telemetry.OUTAGE_WAITS.labels(handler, what).inc()
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.sleep(outcome.pause * random.uniform(0.8, 1.0))
        spent = loop.time() - started
        if outcome.dependency is None:
            return dataclasses.replace(tries, conflicts=tries.conflicts + 1)
        return dataclasses.replace(
            tries, held_for=tries.held_for + spent, holds=tries.holds + 1, rechecked=tries.rechecked or outcome.recheck
        )

    async def settle(self, delivery: ports.Delivery, attempt: int, outcome: fate.Retry | fate.DeadLetter) -> str:
        """Nack for a retry, or dead-letter; return the failure text."""
        if isinstance(outcome, fate.DeadLetter):
            await self.dead_letter(delivery, attempt, outcome.kind, outcome.reason)
            return f"{outcome.kind}: {outcome.reason}"
        log.warning(
            "%s failed attempt %d/%d (%s: %s); retrying in %.2fs",
            self._handler.name, attempt, self._handler.retry.max_attempts, outcome.kind, outcome.reason, outcome.delay,
        )  # fmt: skip
        await delivery.nack(outcome.delay)
        self._count("retried")
        return f"{outcome.kind}: {outcome.reason}"

    async def dead_letter(self, delivery: ports.Delivery, attempt: int, kind: str, text: str) -> None:
        """Publish a copy to the dead-letter topic with the reason, then ack (nack if the copy is refused)."""
        original = delivery.message
        headers = dict(original.headers)
        headers.update(dead_letter_headers(self._handler.name, delivery.topic, kind, text, attempt))
        copy = envelope.WireMessage(body=original.body, headers=headers, key=original.key, message_id=envelope.new_id())
        tries = fate.Tries(attempt)
        while True:
            try:
                with telemetry.send_span(self._dlq_topic, copy.message_id, self._system):
                    await self._transport.publish(self._dlq_topic, copy)
            except errors.TransportError as exc:
                outcome = await self.decide(fate.Phase.PUBLISH, exc, tries)
                if isinstance(outcome, fate.Hold):  # the broker is down: held, no attempt spent, the reason kept
                    tries = await self.hold(outcome, tries)
                    continue
                if not await self._keep_refused(copy, exc):
                    log.error("could not dead-letter a message of %s (%s); it will be redelivered",
                              self._handler.name, exc)  # fmt: skip
                    await delivery.nack(self._handler.retry.delay(attempt))
                    return
            break
        reason = f"{kind}: {text}"
        await saga_dead_letters.tell_saga(self._transport, original, self._handler.name, self._source, reason)
        await delivery.ack()
        self._count("dead_lettered")
        log.error(
            "%s dead-lettered a message to %s after %d attempt(s) (event %s): %s: %s",
            self._handler.name, self._dlq_topic, attempt, _event_id(original), kind, one_line(text, 500),
        )  # fmt: skip

    async def _keep_refused(self, copy: envelope.WireMessage, refusal: errors.TransportError) -> bool:
        """Keep a dead letter the broker refused for good in the database; return whether it is kept."""
        if self._held is None or refusal.retryable:
            return False
        try:
            await self._held.hold(self._dlq_topic, copy)
        except errors.StoreError as exc:
            log.error("%s: could not hold a refused dead letter in the database either: %s", self._handler.name, exc)
            return False
        log.error(
            "%s: the broker refused a dead letter for %s (%s); it is held in the database (conveyor dlq list %s)",
            self._handler.name, self._dlq_topic, refusal, self._handler.topic,
        )  # fmt: skip
        return True


def _event_id(message: envelope.WireMessage) -> str:
    """The CloudEvent id a message carries, for logs (``?`` when it has none)."""
    for name in ("ce-id", "ce_id", "cloudEvents_id", "cloudEvents:id"):
        value = message.headers.get(name)
        if value:
            return value[:200]
    return message.message_id or "?"
