"""The consuming side of the RabbitMQ transport: one consumer per subscription queue.

A :class:`RabbitConsumer` consumes its quorum queue on a channel of its own,
hands deliveries out one at a time, sends nacked copies through a delay tier
and re-attaches after a lost channel (see :mod:`conveyor.transports.rabbit`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, cast

import aiormq
import aiormq.abc
from aio_pika.abc import AbstractChannel

from conveyor import errors, ports
from conveyor.envelope import WireMessage
from conveyor.transports import rabbit_wire

if TYPE_CHECKING:
    from conveyor.transports import rabbit

log = logging.getLogger("conveyor.transports.rabbit")


class RabbitDelivery:
    """A delivery from a quorum queue; settled on the channel it came from."""

    __slots__ = ("_consumer", "_raw", "_settled", "attempt", "message", "topic")

    def __init__(
        self,
        consumer: RabbitConsumer,
        raw: aiormq.abc.DeliveredMessage,
        message: WireMessage,
        attempt: int,
    ):
        self._consumer = consumer
        self._raw = raw
        self._settled = False
        self.topic = consumer.topic
        self.message = message
        self.attempt = attempt

    async def ack(self) -> None:
        """Settle as done.

        Raises:
            TransportError: the channel is gone; the broker redelivers the message.
        """
        self._settle()
        try:
            await self._raw.channel.basic_ack(self._raw.delivery_tag or 0)
        except rabbit_wire.DRIVER_ERRORS as exc:
            raise rabbit_wire.transport_error("ack", exc) from exc

    async def nack(self, delay: float) -> None:
        """Redeliver after ``delay`` seconds (rounded up to a delay tier) with attempt + 1.

        Raises:
            TransportError: the copy was not confirmed; the original is requeued.
        """
        self._settle()
        await self._consumer.postpone(self._raw, self.attempt + 1, delay)

    def _settle(self) -> None:
        if self._settled:
            raise errors.TransportError("delivery already acked or nacked")
        self._settled = True


class RabbitConsumer:
    """Consumes one subscription's queue on a channel of its own, re-attaching after losses."""

    def __init__(
        self,
        transport: rabbit.RabbitTransport,
        subscription: ports.Subscription,
        callback: ports.DeliveryCallback,
    ):
        self.topic = subscription.topic
        self._transport = transport
        self._queue = transport.queue_name(subscription.name)
        self._prefetch = max(subscription.prefetch, 1)
        self._callback = callback
        self._channel: AbstractChannel | None = None
        self._underlay: aiormq.abc.AbstractChannel | None = None
        self._tag: str | None = None
        self._buffer: asyncio.Queue[aiormq.abc.DeliveredMessage | None] = asyncio.Queue()
        self._offered: aiormq.abc.DeliveredMessage | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def active(self) -> bool:
        """True while registered as a consumer on an open channel."""
        underlay = self._underlay
        if underlay is None or underlay.is_closed:
            return False
        return self._tag in cast(aiormq.Channel, underlay).consumers  # not cancelled by the broker

    async def start(self) -> None:
        """Attach once (errors propagate), then keep consuming in a task."""
        await self._attach()
        self._task = asyncio.create_task(self._run(), name=f"rabbit-consumer:{self._queue}")

    async def _attach(self) -> None:
        connection = await self._transport.wait_connected()
        try:
            channel = await connection.channel(publisher_confirms=False)
            await channel.set_qos(prefetch_count=self._prefetch)
            underlay = await channel.get_underlay_channel()
            buffer: asyncio.Queue[aiormq.abc.DeliveredMessage | None] = asyncio.Queue()
            underlay.closing.add_done_callback(lambda _: buffer.put_nowait(None))

            async def receive(raw: aiormq.abc.DeliveredMessage) -> None:
                buffer.put_nowait(raw)  # bounded by the prefetch

            consume = await underlay.basic_consume(self._queue, receive, no_ack=False)
        except rabbit_wire.DRIVER_ERRORS as exc:
            raise rabbit_wire.transport_error(f"consuming queue {self._queue!r}", exc) from exc
        self._channel, self._underlay, self._buffer = channel, underlay, buffer
        self._tag = consume.consumer_tag

    async def _run(self) -> None:
        backoff = self._transport.backoff_min
        while True:
            await self._pump()
            self._tag = None
            while self._tag is None:  # the channel is gone: a new one, with backoff
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._transport.backoff_max)
                try:
                    await self._attach()
                except errors.TransportError as exc:
                    log.warning("cannot consume %s yet (%s)", self._queue, exc)
            log.info("consuming %s again", self._queue)
            backoff = self._transport.backoff_min

    async def _pump(self) -> None:
        """Hand out deliveries one at a time until the channel closes."""
        buffer, underlay = self._buffer, self._underlay
        assert underlay is not None
        while (raw := await buffer.get()) is not None and not underlay.is_closed:
            trusted = getattr(raw.delivery, "exchange", None) != self._transport.exchange
            message, attempt, due = rabbit_wire.incoming(raw, trusted=trusted)
            if due is not None and due > time.time() * 1000:
                await self._hop(raw, attempt, due)
                continue
            self._offered = raw
            try:
                await self._callback(RabbitDelivery(self, raw, message, attempt))
            except Exception:  # a broken callback must not kill the consumer; the broker redelivers
                log.exception("delivery callback of %s failed", self._queue)
            self._offered = None

    async def _hop(self, raw: aiormq.abc.DeliveredMessage, attempt: int, due: int) -> None:
        # A delay longer than the largest tier: another round, same attempt.
        try:
            await self.postpone(raw, attempt, (due - time.time() * 1000) / 1000, due=due)
        except errors.TransportError as exc:
            log.warning("could not delay a message of %s again (%s); requeued", self._queue, exc)

    async def postpone(
        self, raw: aiormq.abc.DeliveredMessage, attempt: int, delay: float, due: int | None = None
    ) -> None:
        """Send a copy through a delay tier back to this queue, then ack the original.

        Raises:
            TransportError: the copy was not confirmed; the original is requeued at once.
        """
        if due is None and delay > self._transport.tiers[-1]:
            due = int((time.time() + delay) * 1000)
        try:
            await self._transport.send_delayed(
                self._queue, raw.body, rabbit_wire.copy_properties(raw, attempt, due), delay
            )
            await raw.channel.basic_ack(raw.delivery_tag or 0)
        except (errors.TransportError, *rabbit_wire.DRIVER_ERRORS) as exc:
            with contextlib.suppress(*rabbit_wire.DRIVER_ERRORS):
                await raw.channel.basic_reject(raw.delivery_tag or 0, requeue=True)
            if isinstance(exc, errors.TransportError):
                raise
            raise rabbit_wire.transport_error("nack", exc) from exc

    async def stop(self) -> None:
        """Stop fetching; deliveries buffered but not handed out go back to the queue."""
        await self.halt()
        underlay, tag = self._underlay, self._tag
        self._tag = None
        if underlay is None or underlay.is_closed:
            return
        leftovers = [self._offered] if self._offered is not None else []
        while not self._buffer.empty():
            if (raw := self._buffer.get_nowait()) is not None:
                leftovers.append(raw)
        self._offered = None
        with contextlib.suppress(*rabbit_wire.DRIVER_ERRORS):  # if the channel is gone, so are its deliveries
            if tag is not None:
                await underlay.basic_cancel(tag)
            for raw in leftovers:
                await underlay.basic_reject(raw.delivery_tag or 0, requeue=True)

    async def halt(self) -> None:
        """Cancel the consuming task (the transport closes the channel)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
