"""The relay degrades per key, never globally: failing keys, parked rows, broker outages, failed rounds."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from conveyor import errors
from conveyor.runtime.relay import Relay, RelayOptions
from conveyor.testing import wait_for
from relay_helpers import Broker, Flaky, Refusing, Relays, add, attempts, connected, row, wait_until

from event_store import Database, SqlOutboxStore
from event_store.outbox_store import SqlOutboxBatch

FAST = RelayOptions(poll_interval=0.2, retry_base=0.05, retry_max=0.1, max_backoff=0.1, max_attempts=1000)


def _received(broker: Broker) -> int:
    return len(broker.collector.received)


async def test_relay_failing_key_with_1000_rows_does_not_delay_other_rows(
    db: Database, broker: Broker, relays: Relays
) -> None:
    await add(db, 1000, key="bad")
    for k in range(20):
        await add(db, 50, key=f"k{k}")
    await add(db, 200)
    transport = await connected(Refusing(broker.url, {"bad"}))
    relays.start(Relay(SqlOutboxStore(db), transport, options=RelayOptions(poll_interval=0.2)))
    await wait_for(lambda: _received(broker) >= 1200, 10, "the 1,200 rows of healthy keys and no key")


async def test_relay_failing_key_rows_published_in_order_once_accepted(
    db: Database, broker: Broker, relays: Relays
) -> None:
    await add(db, 1000, key="bad")
    await add(db, 100, key="good")
    refused = {"bad"}
    transport = await connected(Refusing(broker.url, refused))
    relays.start(Relay(SqlOutboxStore(db), transport, options=FAST))
    await wait_for(lambda: _received(broker) >= 100, 30, "the rows of the healthy key")
    refused.clear()
    # One key's 1,000 rows go one at a time (its order is kept): generous on a busy machine.
    await wait_for(lambda: _received(broker) >= 1100, 60, "the rows of the recovered key")
    assert broker.by_key()["bad"] == list(range(1000))


async def _attempted(db: Database, message_id: str) -> bool:
    return await attempts(db, message_id) >= 1


class CountingStore(SqlOutboxStore):
    """A store that counts its claims (on PostgreSQL a claim bypasses SQLAlchemy's statement events)."""

    claims = 0

    @contextlib.asynccontextmanager
    async def claim(self, limit: int) -> AsyncIterator[SqlOutboxBatch]:
        self.claims += 1
        async with super().claim(limit) as batch:
            yield batch


async def test_relay_idle_with_only_backed_off_rows_claims_at_its_poll_pace(
    db: Database, broker: Broker, relays: Relays
) -> None:
    [first, *_] = await add(db, 20, key="bad")
    transport = await connected(Refusing(broker.url, {"bad"}))
    store = CountingStore(db)
    relays.start(Relay(store, transport))
    await wait_until(lambda: _attempted(db, first), 10, "the first failed publish")
    before = store.claims
    await asyncio.sleep(2.0)  # the measurement window, not a wait for a condition
    # Idle, the relay claims once per poll (1 s) and when the row's backoff ends (1 s, then 2 s):
    # about four claims in two seconds. A relay that spins on backed-off rows claims every
    # ``min_idle`` (0.1 s), twenty times.
    assert store.claims - before <= 8


async def test_relay_row_failing_max_attempts_times_is_parked(db: Database, broker: Broker) -> None:
    [message_id] = await add(db, 1, key="k")
    transport = await connected(Refusing(broker.url, {"k"}))
    relay = Relay(SqlOutboxStore(db, listen=False), transport, options=RelayOptions(max_attempts=3, retry_base=0.0))
    for _ in range(4):
        await relay.run_once()
    parked = await row(db, message_id)
    assert (parked.attempts, parked.parked_at is not None, "refused" in parked.last_error) == (3, True, True)


async def test_relay_parked_row_holds_later_rows_of_its_key(db: Database, broker: Broker) -> None:
    await add(db, 3, key="k")
    refused = {"k"}
    transport = await connected(Refusing(broker.url, refused))
    relay = Relay(SqlOutboxStore(db, listen=False), transport, options=RelayOptions(max_attempts=1))
    await relay.run_once()  # k0 is parked
    refused.clear()
    await add(db, 1, key="other", start=10)
    await relay.run_once()
    await relay.run_once()
    assert dict(broker.by_key()) == {"other": [10]}


async def test_relay_parked_keyless_row_is_not_claimed_again(db: Database, broker: Broker) -> None:
    await add(db, 1)
    transport = await connected(Flaky(broker.url, lambda _: True, lambda: errors.TransportError("refused")))
    relay = Relay(SqlOutboxStore(db, listen=False), transport, options=RelayOptions(max_attempts=1, retry_base=0.0))
    await relay.run_once()  # parked
    result = await relay.run_once()
    assert (result.claimed, transport.calls) == (0, 1)


async def test_relay_parked_keyless_row_blocks_nothing(db: Database, broker: Broker) -> None:
    await add(db, 1)
    await add(db, 2, start=1)
    transport = await connected(Flaky(broker.url, lambda m: b'"n":0' in m.body, lambda: errors.TransportError("no")))
    relay = Relay(SqlOutboxStore(db, listen=False), transport, options=RelayOptions(max_attempts=1))
    await relay.run_once()
    await relay.run_once()
    assert broker.by_key()[""] == [1, 2]


async def test_relay_retried_parked_row_published_before_later_rows_of_its_key(db: Database, broker: Broker) -> None:
    ids = await add(db, 3, key="k")
    refused = {"k"}
    store = SqlOutboxStore(db, listen=False)
    relay = Relay(store, await connected(Refusing(broker.url, refused)), options=RelayOptions(max_attempts=1))
    await relay.run_once()  # k0 is parked
    refused.clear()
    await store.retry([ids[0]])
    await relay.run_once()
    assert broker.by_key()["k"] == [0, 1, 2]


async def test_relay_broker_outage_spends_no_attempts_and_parks_nothing(
    db: Database, broker: Broker, relays: Relays
) -> None:
    ids = await add(db, 3, key="k") + await add(db, 3, start=3)
    outage = {"on": True}
    transport = await connected(
        Flaky(
            broker.url,
            lambda _: outage["on"],
            lambda: errors.TransientTransportError("broker unreachable"),
            down=lambda: outage["on"],
        )
    )
    options = RelayOptions(poll_interval=0.1, retry_base=0.01, max_backoff=0.05, max_attempts=2)
    relays.start(Relay(SqlOutboxStore(db), transport, options=options))
    await wait_for(lambda: transport.calls >= 20, 10, "20 publishes during the outage")
    outage["on"] = False
    await wait_for(lambda: _received(broker) >= 6, 10, "every row after the outage")
    lanes = broker.by_key()
    spent = [await attempts(db, message_id) for message_id in ids]
    assert (lanes["k"], sorted(lanes[""]), spent) == ([0, 1, 2], [3, 4, 5], [0] * 6)


class _Bug(Exception):
    """Not a Conveyor error: a bug in a transport or in the relay."""


async def test_relay_round_raising_after_publishing_does_not_republish_confirmed_rows(
    db: Database, broker: Broker
) -> None:
    ids = await add(db, 5, key="k")
    armed = {"on": True}

    def failing(message: Any) -> bool:
        if armed["on"] and b'"n":2' in message.body:
            armed["on"] = False
            return True
        return False

    relay = Relay(SqlOutboxStore(db, listen=False), await connected(Flaky(broker.url, failing, _Bug)))
    with pytest.raises(_Bug):
        await relay.run_once()
    await relay.run_once()
    assert broker.ids() == ids


async def test_relay_run_survives_an_unexpected_exception(db: Database, broker: Broker, relays: Relays) -> None:
    await add(db, 3)
    armed = {"on": True}

    def failing(_message: Any) -> bool:
        fail, armed["on"] = armed["on"], False
        return fail

    transport = await connected(Flaky(broker.url, failing, _Bug))
    task = relays.start(Relay(SqlOutboxStore(db), transport, options=FAST))
    await wait_for(lambda: _received(broker) >= 3 or task.done(), 10, "every row after the failed round")
    assert not task.done()
