"""The consuming side of the NATS transport: the pull loop and its deliveries.

One :class:`NatsConsumer` per subscription keeps pull requests outstanding on
the subscription's durable for exactly its free prefetch credit and hands the
messages out as :class:`NatsDelivery` objects (see :mod:`conveyor.transports.nats`
for the design). Also the wire mapping shared with publishing: the header
names and the translation of nats-py errors.

Deliveries given back at stop or close are naked with a delay of
:data:`GIVE_BACK_DELAY`, not at once (see :mod:`conveyor.transports.nats`).

Every delivery handed out and not yet settled is kept alive with an
in-progress acknowledgement (``+WPI``) a few times per ``ack_wait``, so time
spent waiting in a key lane, in the dispatcher's buffer or in a long handler
never makes the server redeliver it; ``ack_wait`` then only catches a worker
that died or hung (its keep-alives stop).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription

from conveyor import errors, ports
from conveyor.envelope import WireMessage, binary_partition_key

if TYPE_CHECKING:
    from conveyor.transports import nats as nats_transport

log = logging.getLogger("conveyor.transports.nats")

KEY_HEADER = "conveyor-key"
MSG_ID_HEADER = "Nats-Msg-Id"
MAX_BATCH = 100
PULL_EXPIRES = 1.0
GIVE_BACK_DELAY = PULL_EXPIRES + 0.5
_SILENCE = PULL_EXPIRES + 2.0
_NS = 1_000_000_000
_TRANSIENT = (
    nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError, nats.errors.NoServersError, nats.errors.StaleConnectionError,
    nats.js.errors.NoStreamResponseError, nats.js.errors.ServiceUnavailableError, OSError, TimeoutError,
)  # fmt: skip


DRIVER_ERRORS = (*_TRANSIENT, nats.errors.Error)


def transport_error(action: str, exc: BaseException) -> errors.TransportError:
    """Conveyor's error for a nats-py exception: transient for timeouts, lost connections and no stream.

    A JetStream API error keeps the server's code and description (its ``repr`` has neither).
    """
    detail = str(exc) if isinstance(exc, nats.js.errors.APIError) else repr(exc)
    if isinstance(exc, _TRANSIENT):
        return errors.TransientTransportError(f"NATS {action} failed: {detail}")
    return errors.TransportError(f"NATS {action} failed: {detail}")


@contextlib.contextmanager
def translated(action: str) -> Iterator[None]:
    """Turn nats-py exceptions raised in the block into Conveyor's error tree.

    Raises:
        TransientTransportError: a timeout, no responders, a lost connection or no stream.
        TransportError: any other nats-py error.
    """
    try:
        yield
    except DRIVER_ERRORS as exc:
        raise transport_error(action, exc) from exc


def _num_delivered(reply: str) -> int:
    # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<time>.<pending>, or with
    # <domain>.<account hash> after $JS.ACK (12 tokens); parsed here, as nats-py's
    # Msg.metadata costs ~6 us a message.
    tokens = reply.split(".")
    return int(tokens[4] if len(tokens) == 9 else tokens[6])


def stream_id(reply: str) -> str:
    """``<stream>/<stream sequence>`` of a JetStream delivery: the same on every redelivery of the message.

    The broker id of a message published without ``Nats-Msg-Id`` (see :mod:`conveyor.plain`).
    """
    tokens = reply.split(".")
    stream, sequence = (tokens[2], tokens[5]) if len(tokens) == 9 else (tokens[4], tokens[7])
    return f"{stream}/{sequence}"


class NatsDelivery:
    """One JetStream delivery; settling it sends ``+ACK`` or ``-NAK``."""

    __slots__ = ("_consumer", "_msg", "_settled", "attempt", "message", "topic")

    def __init__(self, consumer: NatsConsumer, msg: Msg) -> None:
        headers = msg.headers or {}
        key = headers.pop(KEY_HEADER, None) or binary_partition_key(headers)
        # A message published without Nats-Msg-Id is still one stream message: its sequence identifies it.
        message_id = headers.pop(MSG_ID_HEADER, None) or stream_id(msg.reply)
        self._consumer = consumer
        self._msg = msg
        self._settled = False
        self.topic = consumer.topic
        self.message = WireMessage(msg.data, headers, key, message_id)
        self.attempt = _num_delivered(msg.reply)

    @property
    def settled(self) -> bool:
        """True once acked or nacked."""
        return self._settled

    async def ack(self) -> None:
        """Settle as done.

        Raises:
            TransportError: already settled, or the ack could not be sent.
        """
        self._settle()
        try:
            await self._msg.ack()
        except DRIVER_ERRORS as exc:
            raise transport_error("ack", exc) from exc

    async def nack(self, delay: float) -> None:
        """Have the server redeliver after ``delay`` seconds (``num_delivered`` + 1).

        Raises:
            TransportError: already settled, or the nak could not be sent.
        """
        self._settle()
        with translated("nak"):
            await self._msg.nak(delay=max(delay, 0.0))

    async def keep_alive(self) -> None:
        """Tell the server the message is still being worked on (``+WPI``); failures are ignored.

        A lost keep-alive only risks an early redelivery, which the inbox absorbs.
        """
        with contextlib.suppress(nats.errors.Error, OSError, TimeoutError):
            await self._msg.in_progress()

    async def give_back(self) -> None:
        """Nak if still unsettled (stop/close), redelivering once our pull requests expired."""
        if not self._settled:
            with contextlib.suppress(errors.TransportError):
                await self.nack(GIVE_BACK_DELAY)

    def _settle(self) -> None:
        if self._settled:
            raise errors.TransportError("delivery already acked or nacked")
        self._settled = True
        self._consumer.settled(self)


class NatsConsumer:
    """A pull loop on one durable consumer, bounded by the subscription's prefetch."""

    def __init__(
        self,
        transport: nats_transport.NatsTransport,
        subscription: ports.Subscription,
        callback: ports.DeliveryCallback,
    ) -> None:
        self.topic = subscription.topic
        self._transport = transport
        self._subscription = subscription
        self._callback = callback
        self._next_subject = transport.pull_subject(subscription.name)
        self._prefetch = max(subscription.prefetch, 1)
        self._threshold = max(1, min(self._prefetch, MAX_BATCH) // 4)
        self._queue: deque[Msg] = deque()
        self._handed: set[NatsDelivery] = set()
        self._current: NatsDelivery | None = None
        self._requests: deque[list[float]] = deque()  # [expires at, messages still due], oldest first
        self._requested = 0
        self._last_heard = time.monotonic()
        self._healthy = False
        self._needs_check = False
        self._pause_until = 0.0
        self._wakeup = asyncio.Event()
        self._inbox = ""
        self._inbox_sub: NatsSubscription | None = None
        self._task: asyncio.Task[None] | None = None
        self._keep_alive_task: asyncio.Task[None] | None = None
        self._keep_alive_every = max(subscription.ack_wait / 3, 0.1)

    @property
    def active(self) -> bool:
        """True while the pull loop runs and the server answers it."""
        running = self._task is not None and not self._task.done()
        return running and self._healthy and self._transport.connected

    async def start(self) -> None:
        """Open the inbox and start the pull loop.

        Raises:
            TransportError: the inbox subscription failed.
        """
        nc = self._transport.client()
        self._inbox = nc.new_inbox()
        with translated("subscribe"):
            self._inbox_sub = await nc.subscribe(self._inbox, cb=self._on_message)
        self._task = asyncio.create_task(self._run(), name=f"nats-consumer:{self._subscription.name}")
        self._keep_alive_task = asyncio.create_task(
            self._keep_alive(), name=f"nats-keep-alive:{self._subscription.name}"
        )

    async def stop(self) -> None:
        """Stop pulling; give back what arrived but was not handed out."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._healthy = False
        if self._inbox_sub is not None:
            sub, self._inbox_sub = self._inbox_sub, None
            # drain() lets messages already on the wire reach the queue below;
            # with no interest left, the server drops our pending pull requests.
            with contextlib.suppress(nats.errors.Error, OSError, TimeoutError):
                await sub.drain()  # type: ignore[no-untyped-call]
        self._clear_requests()
        current, self._current = self._current, None
        if current is not None:  # cancelled inside the callback: not accepted
            await current.give_back()
        while self._queue:
            await NatsDelivery(self, self._queue.popleft()).give_back()

    async def give_back_unsettled(self) -> None:
        """Nak every handed-out delivery not yet settled (the transport is closing)."""
        if self._keep_alive_task is not None:
            self._keep_alive_task.cancel()
            await asyncio.gather(self._keep_alive_task, return_exceptions=True)
        for delivery in list(self._handed):
            await delivery.give_back()

    async def _keep_alive(self) -> None:
        """Send ``+WPI`` for every unsettled handed-out delivery, a few times per ack wait."""
        while True:
            await asyncio.sleep(self._keep_alive_every)
            for delivery in list(self._handed):
                if not delivery.settled:
                    await delivery.keep_alive()

    def settled(self, delivery: NatsDelivery) -> None:
        """Free the delivery's prefetch credit."""
        self._handed.discard(delivery)
        self._wakeup.set()

    def connection_changed(self, connected: bool) -> None:
        """Called by the transport on disconnect and reconnect."""
        self._healthy = False
        self._clear_requests()  # the server forgot them with the old connection
        self._needs_check = connected
        self._wakeup.set()

    # -- inbox ------------------------------------------------------------------

    async def _on_message(self, msg: Msg) -> None:
        self._last_heard = time.monotonic()
        if msg.reply:
            self._healthy = True
            requests = self._requests
            if requests:
                self._requested -= 1
                requests[0][1] -= 1
                if requests[0][1] <= 0:
                    requests.popleft()
            self._queue.append(msg)
        else:
            self._on_status(msg)
        self._wakeup.set()

    def _on_status(self, msg: Msg) -> None:
        headers = msg.headers or {}
        status = headers.get("Status")
        if status in ("404", "408"):  # the oldest request expired
            self._healthy = True
            if self._requests:
                self._requested -= int(self._requests.popleft()[1])
            return
        description = str(headers.get("Description", ""))
        log.debug("pull request for %s failed: %s %s", self._subscription.name, status, description)
        self._clear_requests()
        self._pause_until = time.monotonic() + PULL_EXPIRES  # no hot loop of refused requests
        if status != "409" or "deleted" in description.lower():
            self._needs_check = True

    # -- pull loop ----------------------------------------------------------------

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            try:
                await self._step()
                backoff = 0.1
            except errors.TransportError as exc:
                self._healthy = False
                log.warning("consumer %s cannot pull (%s); retrying", self._subscription.name, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _step(self) -> None:
        self._wakeup.clear()
        if self._needs_check:
            await self._transport.reconcile(self._subscription)
            self._needs_check = False
        if self._queue:
            await self._hand_out(self._queue.popleft())
        await self._pull()
        if self._queue:
            return
        try:
            async with asyncio.timeout(PULL_EXPIRES):
                await self._wakeup.wait()
        except TimeoutError:
            self._check_silence()

    async def _hand_out(self, msg: Msg) -> None:
        delivery = NatsDelivery(self, msg)
        self._handed.add(delivery)
        self._current = delivery
        await self._callback(delivery)
        self._current = None

    async def _pull(self) -> None:
        """Request as many messages as there is free prefetch credit for."""
        nc = self._transport.client()
        if not nc.is_connected:
            return
        now = time.monotonic()
        if now < self._pause_until:
            return
        self._drop_expired(now)
        free = self._prefetch - len(self._queue) - len(self._handed) - self._requested
        if free < self._threshold:
            return
        batch = min(free, MAX_BATCH)
        request = b'{"batch":%d,"expires":%d}' % (batch, int(PULL_EXPIRES * _NS))
        with translated("pull request"):
            await nc.publish(self._next_subject, request, reply=self._inbox)
            self._requests.append([now + PULL_EXPIRES, batch])
            self._requested += batch
            if not self._healthy:
                await nc.flush(timeout=self._transport.request_timeout)  # type: ignore[arg-type]
                self._last_heard = time.monotonic()
                self._healthy = True

    def _drop_expired(self, now: float) -> None:
        # A request's 408 may be lost with a connection; count it gone a little after it expired.
        while self._requests and self._requests[0][0] + 0.5 < now:
            self._requested -= int(self._requests.popleft()[1])

    def _check_silence(self) -> None:
        if self._requests and time.monotonic() - self._last_heard > _SILENCE:
            # Requests went unanswered well past their expiry: the server lost
            # them (restart) or the durable is gone.
            self._healthy = False
            self._clear_requests()
            self._needs_check = True

    def _clear_requests(self) -> None:
        self._requests.clear()
        self._requested = 0
