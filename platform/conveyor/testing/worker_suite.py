"""The worker conformance suite: one handler API, one retry and dead-letter policy, on every transport.

Subclass :class:`WorkerConformance` with a ``make_transport`` fixture, as for
:class:`~conveyor.testing.transport_suite.TransportConformance`. Each test runs
a real :class:`~conveyor.runtime.worker.Worker` over the transport with
handlers declared on topics of their own.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Callable
from typing import Any

import orjson
import pydantic

from conveyor import Context, Reject, Retry, RetryPolicy, envelope, ports, registry
from conveyor.envelope import WireMessage
from conveyor.runtime.worker import DLQ_HEADER, Worker, dead_letter_topic
from conveyor.testing.support import Collector, unique, wait_for
from conveyor.testing.transport_suite import OpenTransport, TransportFixtures

FAST = RetryPolicy(initial_delay=0.05, max_delay=0.2, jitter=0.0)
MAX_BYTES = 64 * 1024


class Order(pydantic.BaseModel):
    """Payload of the suite's messages."""

    order_id: str
    total_cents: int


def order(order_id: str, total: int = 100, key: str | None = None) -> envelope.Envelope:
    """An envelope carrying an :class:`Order`."""
    return envelope.create("orders", Order(order_id=order_id, total_cents=total), source="suite", key=key)


class WorkerConformance(TransportFixtures):
    """Behaviour of the worker runtime that must hold on every transport."""

    async def start_worker(
        self, transport: ports.Transport, *funcs: Callable[..., Any], concurrency: int = 8
    ) -> Worker:
        worker = Worker(
            registry.Registry.of(*funcs).handlers,
            transport,
            source="suite",
            concurrency=concurrency,
            max_message_bytes=MAX_BYTES,
        )
        await worker.start()
        await self.wait_consuming(*worker.consumers)
        return worker

    async def watch(self, transport: ports.Transport, topic: str) -> Collector:
        """Collect everything published to ``topic`` from now on."""
        collector = Collector()
        sub = ports.Subscription(name=unique("watch"), topic=topic)
        await transport.declare([topic], [sub])
        await self.wait_consuming(await transport.subscribe(sub, collector))
        return collector

    async def send(self, transport: ports.Transport, topic: str, event: envelope.Envelope) -> None:
        await transport.publish(topic, envelope.to_binary(event, transport.binary_prefix))

    # -- outcomes ----------------------------------------------------------------

    async def test_handler_runs_once_per_message_and_the_message_is_acked(self, open_transport: OpenTransport) -> None:
        transport, topic = await open_transport(), unique("wk")
        handled: list[str] = []

        @registry.on(topic, name=unique("h"))
        async def record(payload: Order) -> None:
            handled.append(payload.order_id)

        worker = await self.start_worker(transport, record)
        await self.send(transport, topic, order("o-1"))
        await wait_for(lambda: handled == ["o-1"], self.timeout, "the handler")
        assert await worker.stop(timeout=5)
        await transport.close()  # an unacked message would now go back to the broker
        again = await open_transport()
        await self.start_worker(again, record)
        await self.send(again, topic, order("marker"))
        await wait_for(lambda: "marker" in handled, self.timeout, "the marker")
        assert handled == ["o-1", "marker"]

    async def test_failing_handler_is_retried_then_dead_lettered_with_reason(
        self, open_transport: OpenTransport
    ) -> None:
        transport, topic = await open_transport(), unique("wk")
        name = unique("h")
        attempts: list[int] = []

        @registry.on(topic, name=name, max_attempts=3, backoff=FAST)
        async def always_fails(payload: Order, ctx: Context) -> None:
            attempts.append(ctx.message.attempt)
            raise ValueError("card declined")

        dlq = await self.watch(transport, dead_letter_topic(topic))
        await self.start_worker(transport, always_fails)
        sent = order("o-1")
        await self.send(transport, topic, sent)
        (dead,) = await dlq.wait(1, self.timeout)
        headers = dead.message.headers
        assert attempts == [1, 2, 3]
        assert (headers[DLQ_HEADER + "handler"], headers[DLQ_HEADER + "error-type"]) == (name, "ValueError")
        assert (headers[DLQ_HEADER + "error"], headers[DLQ_HEADER + "attempts"]) == ("card declined", "3")
        assert envelope.decode(dead.message).id == sent.id
        assert dead.message.message_id != sent.id or dead.message.message_id is None

    async def test_retry_signal_redelivers_after_its_delay(self, open_transport: OpenTransport) -> None:
        transport, topic = await open_transport(), unique("wk")
        seen: list[tuple[int, float]] = []
        loop = asyncio.get_running_loop()

        @registry.on(topic, name=unique("h"), backoff=FAST)
        async def retry_once(payload: Order, ctx: Context) -> None:
            seen.append((ctx.message.attempt, loop.time()))
            if ctx.message.attempt == 1:
                raise Retry(delay=0.4, reason="not yet")

        await self.start_worker(transport, retry_once)
        await self.send(transport, topic, order("o-1"))
        await wait_for(lambda: len(seen) == 2, self.timeout, "the retry")
        assert [a for a, _ in seen] == [1, 2]
        assert seen[1][1] - seen[0][1] >= 0.35

    async def test_reject_dead_letters_at_once(self, open_transport: OpenTransport) -> None:
        transport, topic = await open_transport(), unique("wk")
        calls: list[int] = []

        @registry.on(topic, name=unique("h"), max_attempts=5, backoff=FAST)
        async def reject(payload: Order) -> None:
            calls.append(1)
            raise Reject(f"order {payload.order_id} is invalid")

        dlq = await self.watch(transport, dead_letter_topic(topic))
        await self.start_worker(transport, reject)
        await self.send(transport, topic, order("o-9"))
        (dead,) = await dlq.wait(1, self.timeout)
        headers = dead.message.headers
        assert (headers[DLQ_HEADER + "error-type"], headers[DLQ_HEADER + "attempts"]) == ("Rejected", "1")
        assert headers[DLQ_HEADER + "error"] == "order o-9 is invalid"
        assert calls == [1]

    async def test_dead_letters_are_kept_when_nobody_is_watching(self, open_transport: OpenTransport) -> None:
        transport, topic = await open_transport(), unique("wk")

        @registry.on(topic, name=unique("h"))
        async def reject(payload: Order) -> None:
            raise Reject("never valid")

        worker = await self.start_worker(transport, reject)
        sent = order("o-lost?")
        await self.send(transport, topic, sent)
        (keeper,) = worker.dead_letter_subscriptions()
        kept = Collector()
        await transport.subscribe(keeper, kept)
        (dead,) = await kept.wait(1, self.timeout)
        assert envelope.decode(dead.message).id == sent.id

    async def test_timeout_counts_as_a_failed_attempt(self, open_transport: OpenTransport) -> None:
        transport, topic = await open_transport(), unique("wk")
        attempts: list[int] = []

        @registry.on(topic, name=unique("h"), timeout=0.2, backoff=FAST)
        async def slow_first(payload: Order, ctx: Context) -> None:
            attempts.append(ctx.message.attempt)
            if ctx.message.attempt == 1:
                await asyncio.sleep(5)

        await self.start_worker(transport, slow_first)
        await self.send(transport, topic, order("o-1"))
        await wait_for(lambda: attempts == [1, 2], self.timeout, "the second attempt")

    async def test_sync_handler_runs_in_a_thread(self, open_transport: OpenTransport) -> None:
        transport, topic = await open_transport(), unique("wk")
        handled: list[str] = []

        @registry.on(topic, name=unique("h"))
        def blocking(payload: dict[str, Any]) -> None:
            handled.append(payload["order_id"])

        await self.start_worker(transport, blocking)
        await self.send(transport, topic, order("o-1"))
        await wait_for(lambda: handled == ["o-1"], self.timeout, "the sync handler")

    # -- poison -----------------------------------------------------------------

    async def test_poison_messages_are_dead_lettered_once_and_good_ones_still_handled(
        self, open_transport: OpenTransport
    ) -> None:
        transport, topic = await open_transport(), unique("wk")
        handled: list[str] = []

        @registry.on(topic, name=unique("h"), backoff=FAST)
        async def record(payload: Order) -> None:
            handled.append(payload.order_id)

        dlq = await self.watch(transport, dead_letter_topic(topic))
        await self.start_worker(transport, record)
        poisons = poison_messages(transport.binary_prefix)
        for case, message in poisons.items():
            message.headers["x-case"] = case
            await transport.publish(topic, message)
            await self.send(transport, topic, order(f"after-{case}"))
        await dlq.wait(len(poisons), self.timeout)
        await wait_for(lambda: len(handled) == len(poisons), self.timeout, "the good messages")
        cases = Counter(r.message.headers.get("x-case") for r in dlq.received)
        assert cases == Counter(list(poisons)), cases
        assert all(r.message.headers[DLQ_HEADER + "error"] for r in dlq.received)
        assert sorted(handled) == sorted(f"after-{case}" for case in poisons)

    # -- ordering, concurrency, publishing -------------------------------------

    async def test_same_key_in_order_while_keys_run_concurrently(self, open_transport: OpenTransport) -> None:
        transport, topic = await open_transport(), unique("wk")
        seen: dict[str, list[int]] = {}
        running = [0, 0]  # now, most

        @registry.on(topic, name=unique("h"), concurrency=4)
        async def record(payload: Order, ctx: Context) -> None:
            running[0] += 1
            running[1] = max(running)
            await asyncio.sleep(random.uniform(0, 0.01))
            key, _, n = payload.order_id.partition(":")
            seen.setdefault(key, []).append(int(n))
            running[0] -= 1

        await self.start_worker(transport, record)
        keys = [f"k{i}" for i in range(4)]
        for n in range(15):
            for key in keys:
                await self.send(transport, topic, order(f"{key}:{n}", key=key))
        await wait_for(lambda: sum(map(len, seen.values())) == 60, self.timeout, "60 messages")
        assert all(seen[key] == list(range(15)) for key in keys), seen
        assert running[1] > 1, "different keys should run concurrently"

    async def test_published_messages_are_sent_after_success_with_causation(
        self, open_transport: OpenTransport
    ) -> None:
        transport, topic = await open_transport(), unique("wk")
        downstream = unique("wk")

        @registry.on(topic, name=unique("h"), backoff=FAST)
        async def forward(payload: Order, ctx: Context) -> None:
            ctx.publish(downstream, {"order_id": payload.order_id}, key=payload.order_id)
            if ctx.message.attempt == 1:
                raise RuntimeError("fails after publishing: nothing may be sent")

        out = await self.watch(transport, downstream)
        await self.start_worker(transport, forward)
        sent = order("o-1")
        await self.send(transport, topic, sent)
        await out.wait(1, self.timeout)
        await self.send(transport, topic, order("marker"))
        await out.wait(2, self.timeout)
        first = envelope.decode(out.received[0].message)
        assert [orjson.loads(r.message.body)["order_id"] for r in out.received] == ["o-1", "marker"]
        assert (first.causationid, first.correlationid, first.key) == (sent.id, sent.id, "o-1")

    # -- shutdown ---------------------------------------------------------------

    async def test_drain_finishes_in_flight_work_and_acks_it(self, open_transport: OpenTransport) -> None:
        transport, topic = await open_transport(), unique("wk")
        name = unique("h")
        started: list[str] = []
        finished: list[str] = []

        @registry.on(topic, name=name)
        async def slow(payload: Order) -> None:
            started.append(payload.order_id)
            await asyncio.sleep(0.5)
            finished.append(payload.order_id)

        worker = await self.start_worker(transport, slow)
        for i in range(3):
            await self.send(transport, topic, order(f"o-{i}", key=f"k{i}"))
        await wait_for(lambda: len(started) == 3, self.timeout, "3 handlers to start")
        assert await worker.stop(timeout=10)
        assert sorted(finished) == ["o-0", "o-1", "o-2"]
        await transport.close()
        again = await open_transport()
        await self.start_worker(again, slow)
        await self.send(again, topic, order("marker"))
        await wait_for(lambda: "marker" in finished, self.timeout, "the marker")
        assert sorted(started) == ["marker", "o-0", "o-1", "o-2"]

    async def test_drain_deadline_leaves_unfinished_work_for_redelivery(self, open_transport: OpenTransport) -> None:
        transport, topic = await open_transport(), unique("wk")
        name = unique("h")
        done: list[str] = []
        stuck = asyncio.Event()

        @registry.on(topic, name=name)
        async def hangs(payload: Order) -> None:
            stuck.set()
            await asyncio.sleep(60)

        worker = await self.start_worker(transport, hangs)
        await self.send(transport, topic, order("o-1"))
        await asyncio.wait_for(stuck.wait(), self.timeout)
        assert not await worker.stop(timeout=0.2)
        await transport.close()

        @registry.on(topic, name=name)
        async def quick(payload: Order) -> None:
            done.append(payload.order_id)

        await self.start_worker(await open_transport(), quick)
        await wait_for(lambda: done == ["o-1"], self.timeout * 2, "redelivery after the drain deadline")


def poison_messages(prefix: str) -> dict[str, WireMessage]:
    """Eight kinds of message that must be dead-lettered at once, never retried."""

    def binary(body: bytes, content_type: str = envelope.JSON, **attrs: str) -> WireMessage:
        headers = {f"{prefix}{k}": v for k, v in {"specversion": "1.0", "source": "suite", "type": "orders"}.items()}
        headers[f"{prefix}id"] = envelope.new_id()
        headers.update({f"{prefix}{k}": v for k, v in attrs.items()})
        headers["content-type"] = content_type
        return WireMessage(body, headers)

    nested = b'{"specversion":"1.0","id":"x","source":"s","type":"t","data":' + b"[" * 5000 + b"]" * 5000 + b"}"
    structured = {"content-type": envelope.STRUCTURED}
    return {
        "malformed-json": binary(b'{"order_id": "o-1", "total_cents": '),
        "invalid-utf8": binary(b'{"order_id": "\xff\xfe", "total_cents": 1}'),
        "empty-body": binary(b""),
        "wrong-schema": binary(orjson.dumps({"order_id": "o-1", "total_cents": "lots"})),
        "missing-attributes": WireMessage(b"{}", {f"{prefix}id": "only-an-id", "content-type": envelope.JSON}),
        "oversized": binary(orjson.dumps({"order_id": "x" * (MAX_BYTES + 10), "total_cents": 1})),
        "deeply-nested": WireMessage(nested, dict(structured)),
        "unknown-content-type": binary(b"<order id='o-1'/>", content_type="application/xml"),
    }
