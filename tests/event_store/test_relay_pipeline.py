"""The relay overlaps database round trips with broker confirms, keeping every outbox guarantee.

While batch N is being published, the relay has already claimed batch N+1 and
marks batch N-1. These tests hold a batch's publish (or its mark) open with a
gate and look at what the relay did meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

import sqlalchemy as sa
from conveyor import envelope, errors, stores
from conveyor.runtime.relay import Relay, RelayOptions
from conveyor.testing import wait_for
from relay_helpers import Broker, PublishEach, Relays, add, connected, unsent, wait_until

from event_store import Database, SqlOutboxStore, models
from event_store.outbox_store import SqlOutboxBatch


class RecordingStore(SqlOutboxStore):
    """Records every non-empty claim's rows; ``hold_marks`` makes a claim's mark wait for ``marks_open``."""

    def __init__(self, db: Database, **kwargs: object) -> None:
        super().__init__(db, listen=False, **kwargs)  # type: ignore[arg-type]
        self.claims: list[list[stores.OutboxMessage]] = []
        self.hold_marks = False
        self.marks_open = asyncio.Event()
        self.marks_waiting = 0
        self.ended = 0  # claims (empty ones too) whose transaction ended

    @contextlib.asynccontextmanager
    async def claim(self, limit: int) -> AsyncIterator[SqlOutboxBatch]:
        try:
            async with super().claim(limit) as batch:
                if batch.messages:
                    self.claims.append(list(batch.messages))
                yield batch
                if self.hold_marks and batch.recorded:
                    self.marks_waiting += 1
                    await self.marks_open.wait()
        finally:
            self.ended += 1


class Gated(PublishEach):
    """Confirms the first ``open_calls`` ``publish_many`` calls; later ones publish, then wait for ``gate``.

    So the broker has a held call's messages, but the relay has no
    confirmation for them until the test opens the gate. Messages whose
    ``n`` is in ``refused`` are refused (not transient).
    """

    def __init__(self, url: str, *, open_calls: int = 0, refused: frozenset[int] = frozenset()) -> None:
        super().__init__(url)
        self.gate = asyncio.Event()
        self.calls = 0
        self.open_calls = open_calls
        self.refused = refused

    async def publish_many(self, messages: Sequence[tuple[str, envelope.WireMessage]]) -> list[Exception | None]:
        self.calls += 1
        held = self.calls > self.open_calls
        results = await super().publish_many(messages)
        if held:
            await self.gate.wait()
        return results

    async def publish(self, topic: str, message: envelope.WireMessage) -> None:
        if envelope.decode(message).json()["n"] in self.refused:
            raise errors.TransportError("the broker refused it")
        await super().publish(topic, message)


def _keys(messages: Sequence[stores.OutboxMessage]) -> set[str]:
    return {m.key for m in messages if m.key is not None}


async def _backlog(db: Database) -> None:
    """20 rows of key a, 10 keyless rows, 5 rows of key b (in that outbox order)."""
    await add(db, 20, key="a")
    await add(db, 10, start=100)
    await add(db, 5, key="b", start=200)


async def test_relay_claims_next_batch_while_publish_held_without_keys_in_flight(
    db: Database, broker: Broker, relays: Relays
) -> None:
    await _backlog(db)
    store = RecordingStore(db)
    transport = await connected(Gated(broker.url))  # the first batch's publish is held
    relays.start(Relay(store, transport, options=RelayOptions(batch_size=20)))
    try:
        await wait_for(lambda: len(store.claims) >= 2, 10, "the next batch claimed while the first publishes")
    finally:
        transport.gate.set()  # a relay being stopped finishes its round first
    first, second = store.claims[0], store.claims[1]
    assert (_keys(first) & _keys(second), {m.id for m in first} & {m.id for m in second}) == (set(), set())


async def test_relay_pipelined_batches_publish_each_row_once_in_key_order(
    db: Database, broker: Broker, relays: Relays
) -> None:
    await _backlog(db)
    transport = await connected(Gated(broker.url, open_calls=1_000))
    relays.start(Relay(RecordingStore(db), transport, options=RelayOptions(batch_size=7)))
    await wait_until(lambda: _all_sent(db), 10, "every row marked sent")
    await broker.collector.wait(35)
    lanes = broker.by_key()
    assert (lanes["a"], sorted(lanes[""]), lanes["b"], len(broker.ids())) == (
        list(range(20)),
        list(range(100, 110)),
        list(range(200, 205)),
        35,
    )


async def _all_sent(db: Database) -> bool:
    return await unsent(db) == 0


async def _sent_ns(db: Database) -> set[int]:
    async with db.transaction(readonly=True) as session:
        query = sa.select(models.outbox.c.body).where(models.outbox.c.sent_at.is_not(None))
        return {int(body.split(b'"n":')[1].rstrip(b"}")) for body in (await session.execute(query)).scalars()}


async def test_relay_mark_of_a_batch_never_marks_an_unconfirmed_message(
    db: Database, broker: Broker, relays: Relays
) -> None:
    await _backlog(db)
    # The first batch (a0-a15, 100-103) goes in four waves, confirmed but for a3 (refused: a waits);
    # the second batch (104-109, b) is published and never confirmed.
    transport = await connected(Gated(broker.url, open_calls=4, refused=frozenset({3})))
    relays.start(Relay(RecordingStore(db), transport, options=RelayOptions(batch_size=20, retry_base=60.0)))
    try:
        await wait_for(lambda: transport.calls >= 5, 10, "the second batch's publish")
        await wait_until(lambda: _marked(db), 10, "the first batch's mark")
        marked = await _sent_ns(db)
    finally:
        transport.gate.set()
    assert marked == {0, 1, 2, 100, 101, 102, 103}


async def _marked(db: Database) -> bool:
    return bool(await _sent_ns(db))


async def test_relay_killed_with_a_mark_pending_republishes_same_ids(pg_db: Database, broker: Broker) -> None:
    # Cancellation is a crash on PostgreSQL (the claim's transaction rolls back);
    # on SQLite a cancelled relay still marks what the broker confirmed.
    db = pg_db
    ids = await add(db, 6, key="k")
    store = RecordingStore(db)
    store.hold_marks = True
    transport = await connected(Gated(broker.url, open_calls=1_000))
    task = asyncio.create_task(Relay(store, transport, options=RelayOptions(batch_size=3)).run(asyncio.Event()))
    # Batch A (k0-k2) is published and its mark held; the batch claimed ahead is empty (key k is in
    # flight) and ends; the relay then waits for A's mark, the one claim still open: the cancel lands there.
    await wait_for(lambda: store.marks_waiting >= 1 and store.ended >= 1, 10, "A's mark pending, nothing else open")
    await asyncio.sleep(0.05)
    task.cancel()  # a crash: the pending mark never commits, and no claim may stay open
    await asyncio.gather(task, return_exceptions=True)
    await store.close()
    unsent_after_crash = await unsent(db)
    await Relay(SqlOutboxStore(db, listen=False), broker.transport).run_once()
    await broker.collector.wait(len(ids) + 3)
    assert (unsent_after_crash, broker.ids()[:3], broker.ids()[3:]) == (6, ids[:3], ids)


async def test_relay_broker_outage_while_next_batch_claimed_spends_no_attempts(
    db: Database, broker: Broker, relays: Relays
) -> None:
    await _backlog(db)
    down = {"on": True}

    class Down(PublishEach):
        async def publish(self, topic: str, message: envelope.WireMessage) -> None:
            if down["on"]:
                raise errors.TransientTransportError("broker unreachable")
            await super().publish(topic, message)

        async def check(self) -> None:
            if down["on"]:
                raise errors.TransientTransportError("broker unreachable")

    options = RelayOptions(batch_size=10, max_backoff=0.05, max_attempts=2)
    store = RecordingStore(db)
    relays.start(Relay(store, await connected(Down(broker.url)), options=options))
    await wait_for(lambda: len(store.claims) >= 6, 10, "several rounds during the outage")
    down["on"] = False
    await wait_until(lambda: _all_sent(db), 10, "every row after the outage")
    async with db.transaction(readonly=True) as session:
        spent = (await session.execute(sa.select(sa.func.max(models.outbox.c.attempts)))).scalar_one()
    assert (spent, broker.by_key()["a"]) == (0, list(range(20)))


async def test_a_claim_made_while_another_is_open_looks_past_its_rows_and_keys(db: Database) -> None:
    await add(db, 10, key="a")
    keyless = await add(db, 5, start=100)
    store = SqlOutboxStore(db, listen=False, per_key=5, window=10)
    try:
        async with store.claim(20) as first, store.claim(20) as second:
            ahead = [m.message_id for m in second.messages]
        assert ([m.key for m in first.messages], ahead) == (["a"] * 5, keyless)
    finally:
        await store.close()
