"""The worker: subscribes every handler and runs each delivery through :mod:`conveyor.runtime.handling`.

One subscription per handler (consumer group, queue or durable, named after
the handler), one dead-letter keeper subscription per consumed topic, and a
:class:`~conveyor.runtime.dispatch.Dispatcher` per handler for concurrency with
per-key order. See :mod:`conveyor.runtime.handling` for what happens to each
delivery.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Sequence

from conveyor import errors, fate, persistence, ports, registry, telemetry
from conveyor.runtime import batching, dispatch
from conveyor.runtime.failures import DLQ_HEADER, DLQ_SUFFIX, dead_letter_headers, dead_letter_topic
from conveyor.runtime.handling import COMMIT_TIMEOUT, HandlerRunner
from conveyor.runtime.probes import Probes

ACK_WAIT = 15.0
"""Seconds before a broker with an ack timer (NATS) redelivers what a worker holds without a sign of life.

Transports that need it send keep-alives for every delivery they hold (NATS
``+WPI``, a few times per ``ack_wait``), so a slow handler or a long queue in
a key lane never expires; the timer only catches a worker that died or hung,
whose messages then go to another worker after at most this long.
"""

__all__ = [
    "ACK_WAIT",
    "DLQ_HEADER",
    "DLQ_SUFFIX",
    "HandlerRunner",
    "Worker",
    "dead_letter_headers",
    "dead_letter_topic",
]

log = logging.getLogger("conveyor.worker")


class Worker:
    """Subscribes every handler of a registry and runs them.

    Args:
        handlers: the handlers to run.
        transport: a connected transport.
        source: CloudEvents ``source`` for messages the handlers publish.
        concurrency: default per-handler concurrency (a handler's own setting wins).
        max_message_bytes: larger messages are dead-lettered unread.
        transactions: opens handler attempts' units of work (``ctx.transaction()``);
            ``None`` without a database.
        dead_letters: holds dead letters the broker refuses for good.
        plain_messages: every handler accepts messages that are not
            CloudEvents, as with ``@on(..., plain=True)`` (``CONVEYOR_PLAIN_MESSAGES``).
        stall_after: seconds a handler may have one message in hand (twice its
            timeout, if that is longer) before :meth:`stalled` names it
            (``CONVEYOR_STALL_AFTER``).
        hold_limit: seconds one message may be held through outages before
            its attempts count again (``CONVEYOR_HOLD_LIMIT``).
        commit_timeout: seconds Conveyor's commit of a unit of work may take
            (``CONVEYOR_COMMIT_TIMEOUT``).
        probes: the probes that prove an outage before a message is held; by
            default the transport's and the units' ``check``.
    """

    def __init__(
        self,
        handlers: Sequence[registry.Handler],
        transport: ports.Transport,
        *,
        source: str,
        concurrency: int = 16,
        max_message_bytes: int = 1024 * 1024,
        transactions: persistence.UnitOfWorkFactory | None = None,
        dead_letters: persistence.DeadLetterStore | None = None,
        plain_messages: bool = False,
        stall_after: float = 60.0,
        hold_limit: float = fate.HOLD_LIMIT,
        commit_timeout: float = COMMIT_TIMEOUT,
        probes: Probes | None = None,
    ) -> None:
        self._plain = plain_messages
        self._probes = probes or Probes(getattr(transactions, "check", None), transport.check)
        self._hold_limit = hold_limit
        self._commit_timeout = commit_timeout
        self._stall_after = stall_after
        self._runners: list[HandlerRunner] = []
        self._transactions = transactions
        self._held = dead_letters
        self._handlers = list(handlers)
        self._transport = transport
        self._source = source
        self._concurrency = concurrency
        self._max_bytes = max_message_bytes
        self._consumers: list[ports.Consumer] = []
        self._dispatchers: list[dispatch.Dispatcher | batching.BatchDispatcher] = []

    def subscriptions(self) -> list[ports.Subscription]:
        """One subscription per handler, sized from its concurrency and timeout."""
        subscriptions = []
        for handler in self._handlers:
            concurrency = handler.concurrency or self._concurrency
            subscriptions.append(
                ports.Subscription(
                    name=handler.name,
                    topic=handler.topic,
                    prefetch=(handler.batch or concurrency) * 2,
                    ack_wait=ACK_WAIT,
                    # A broker-side backstop only; kept constant so that changing
                    # max_attempts does not change queue arguments (RabbitMQ refuses that).
                    max_deliveries=max(handler.retry.max_attempts * 2, 50),
                )
            )
        return subscriptions

    def topics(self) -> list[str]:
        """Topics the worker consumes and their dead-letter topics."""
        consumed = dict.fromkeys(h.topic for h in self._handlers)
        return [*consumed, *(dead_letter_topic(t) for t in consumed)]

    def dead_letter_subscriptions(self) -> list[ports.Subscription]:
        """One subscription per dead-letter topic, named like the topic, that keeps dead letters.

        Without it a broker that drops unrouted messages (RabbitMQ) would lose
        them; ``conveyor dlq`` reads them from here.
        """
        consumed = dict.fromkeys(h.topic for h in self._handlers)
        return [
            ports.Subscription(name=dead_letter_topic(t), topic=dead_letter_topic(t), max_deliveries=None)
            for t in consumed
        ]

    async def declare(self) -> None:
        """Create or reconcile the topology of every handler, and the dead-letter subscriptions."""
        await self._transport.declare(self.topics(), [*self.subscriptions(), *self.dead_letter_subscriptions()])

    async def start(self) -> None:
        """Declare topology and start consuming."""
        await self.declare()
        for handler, subscription in zip(self._handlers, self.subscriptions(), strict=True):
            runner = HandlerRunner(
                handler,
                self._transport,
                source=self._source,
                max_message_bytes=self._max_bytes,
                transactions=self._transactions,
                dead_letters=self._held,
                plain_messages=self._plain,
                hold_limit=self._hold_limit,
                commit_timeout=self._commit_timeout,
                probes=self._probes,
            )
            self._runners.append(runner)
            dispatcher: dispatch.Dispatcher | batching.BatchDispatcher
            if handler.batch is not None:
                dispatcher = batching.BatchDispatcher(runner, handler.batch, handler.batch_wait)
            else:
                dispatcher = dispatch.Dispatcher(runner.process, handler.concurrency or self._concurrency)
            telemetry.IN_FLIGHT.labels(handler.name).set_function(functools.partial(_in_flight, dispatcher))
            telemetry.OLDEST_IN_HAND.labels(handler.name).set_function(runner.oldest_in_hand)
            self._dispatchers.append(dispatcher)
            self._consumers.append(await self._transport.subscribe(subscription, dispatcher.submit))
            log.info("subscribed %s to %s", handler.name, handler.topic)

    @property
    def consumers(self) -> list[ports.Consumer]:
        """The running consumers, one per handler."""
        return list(self._consumers)

    @property
    def ready(self) -> bool:
        """True when every subscription is consuming."""
        return len(self._consumers) == len(self._handlers) and all(c.active for c in self._consumers)

    async def check_subscriptions(self) -> None:
        """Readiness probe: every subscription is consuming.

        Raises:
            TransportError: one is not (the broker is unreachable, or a Kafka
                member has no partitions).
        """
        if not self.ready:
            raise errors.TransportError("not every subscription is consuming")

    async def check_progress(self) -> None:
        """Readiness probe: no handler is stalled (see :meth:`stalled`).

        Raises:
            ConveyorError: naming each stalled handler and how long it has held a message.
        """
        if stalled := self.stalled():
            raise errors.ConveyorError("; ".join(stalled))

    def oldest_in_hand(self) -> dict[str, float]:
        """Seconds each handler has had its oldest unsettled message in hand (0 when it holds none)."""
        return {runner.handler.name: runner.oldest_in_hand() for runner in self._runners}

    def stalled(self) -> list[str]:
        """Why each stalled handler is stalled: it has had a message in hand longer than it may.

        A handler may hold a message for ``stall_after`` seconds, or twice its
        timeout if that is longer. Past that, an attempt hangs (a handler
        without a timeout, or a synchronous one that ignores it), or the
        handler is waiting out an outage of the database or the broker (one
        that answers the readiness probe but takes no writes, for instance).
        """
        found = []
        for runner in self._runners:
            timeout = runner.handler.timeout
            limit = max(self._stall_after, 2 * timeout) if timeout is not None else self._stall_after
            age = runner.oldest_in_hand()
            if age > limit:
                found.append(
                    f"{runner.handler.name} has had a message in hand for {age:.0f}s (limit {limit:.0f}s): "
                    "a hung attempt, or an outage it is waiting out"
                )
        return found

    def load(self) -> list[tuple[registry.Handler, int, int]]:
        """``(handler, capacity, in_flight)`` per handler: its concurrency and what its dispatcher holds."""
        in_flight = [d.in_flight for d in self._dispatchers] + [0] * (len(self._handlers) - len(self._dispatchers))
        return [
            (h, h.batch or h.concurrency or self._concurrency, n)
            for h, n in zip(self._handlers, in_flight, strict=True)
        ]

    async def stop(self, timeout: float) -> bool:
        """Stop fetching, then let in-flight work finish for up to ``timeout`` seconds.

        Returns:
            True if all in-flight work finished; unfinished work is left
            unacknowledged and will be redelivered.
        """
        for consumer in self._consumers:
            await consumer.stop()
        results = await asyncio.gather(*(d.drain(timeout) for d in self._dispatchers))
        finished = all(results)
        if not finished:
            log.warning("drain deadline of %.1fs reached; unfinished messages will be redelivered", timeout)
        return finished


def _in_flight(dispatcher: dispatch.Dispatcher | batching.BatchDispatcher) -> float:
    return dispatcher.in_flight
