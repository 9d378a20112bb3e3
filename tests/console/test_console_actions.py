"""Console actions and their inputs: dead letters, outbox, schedules, sagas (local access, conveyor run's rule)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from conftest import TOPIC, MakeConsole, client_for, csrf_of, dead_letter
from conveyor import persistence, ports, transports
from conveyor.runtime.worker import dead_letter_topic


async def _waiting(broker_url: str) -> int:
    transport = transports.create(broker_url)
    await transport.connect()
    kept = dead_letter_topic(TOPIC)
    backlog = await transport.backlog(ports.Subscription(name=kept, topic=kept))  # type: ignore[attr-defined]
    await transport.close()
    return int(backlog.pending + (backlog.in_flight or 0))


async def _csrf(client: httpx.AsyncClient) -> str:
    return csrf_of((await client.get("/console/schedules")).text)


async def test_console_browsing_dead_letters_leaves_every_one_in_place(
    make_console: MakeConsole, broker_url: str
) -> None:
    letters = [await dead_letter(broker_url) for _ in range(3)]
    async with client_for(await make_console(local_actions=True)) as client:
        for _ in range(2):
            await client.get(f"/console/dead-letters/{TOPIC}")
            await client.get(f"/console/dead-letters/{TOPIC}/show", params={"id": letters[0]})
        listing = (await client.get(f"/console/dead-letters/{TOPIC}")).text
    assert all(letter in listing for letter in letters)
    assert await _waiting(broker_url) == 3


async def test_console_replay_of_one_letter_republishes_only_that_one(
    make_console: MakeConsole, broker_url: str
) -> None:
    first, second = await dead_letter(broker_url), await dead_letter(broker_url)
    replayed = transports.create(broker_url)
    await replayed.connect()
    await replayed.declare([TOPIC], [ports.Subscription(name="watcher", topic=TOPIC)])
    async with client_for(await make_console(local_actions=True)) as client:
        response = await client.post(
            f"/console/dead-letters/{TOPIC}/replay", data={"csrf": await _csrf(client), "id": first}
        )
        listing = (await client.get(f"/console/dead-letters/{TOPIC}")).text
    backlog = await replayed.backlog(ports.Subscription(name="watcher", topic=TOPIC))  # type: ignore[attr-defined]
    await replayed.close()
    assert response.status_code == 303
    assert (f'value="{first}"' in listing, f'value="{second}"' in listing, backlog.pending) == (False, True, 1)


async def test_console_replay_never_publishes_to_a_topic_the_form_did_not_name(
    make_console: MakeConsole, broker_url: str
) -> None:
    crafted = await dead_letter(broker_url, topic="payments.refund")  # its headers name another topic
    async with client_for(await make_console(local_actions=True)) as client:
        response = await client.post(
            f"/console/dead-letters/{TOPIC}/replay",
            data={"csrf": await _csrf(client), "all": "yes"},
            headers={"accept": "application/json"},
        )
    assert response.json()["replayed"] == []
    assert crafted and await _waiting(broker_url) == 1


async def test_console_purge_needs_confirmation(make_console: MakeConsole, broker_url: str) -> None:
    await dead_letter(broker_url)
    async with client_for(await make_console(local_actions=True)) as client:
        csrf = await _csrf(client)
        unconfirmed = await client.post(f"/console/dead-letters/{TOPIC}/purge", data={"csrf": csrf, "all": "yes"})
        assert await _waiting(broker_url) == 1
        confirmed = await client.post(
            f"/console/dead-letters/{TOPIC}/purge", data={"csrf": csrf, "all": "yes", "confirm": "yes"}
        )
    assert (unconfirmed.status_code, confirmed.status_code) == (400, 303)
    assert await _waiting(broker_url) == 0


@pytest.mark.parametrize(
    ("path", "data", "field"),
    [
        ("/console/dead-letters/orders.*/replay", {"all": "yes"}, "topic"),
        ("/console/dead-letters/not.consumed.here/replay", {"all": "yes"}, "topic"),
        (f"/console/dead-letters/{TOPIC}/replay", {"id": "a b"}, "id"),
        (f"/console/dead-letters/{TOPIC}/replay", {"id": ["x"] * 201}, "id"),
        (f"/console/dead-letters/{TOPIC}/replay", {}, "id"),
        ("/console/schedules/reports.*/pause", {}, "name"),
        ("/console/schedules/unknown.schedule/trigger", {}, "name"),
        ("/console/outbox/retry", {"id": "../../etc"}, "id"),
        ("/console/sagas/retry", {"saga": "no such saga", "id": "o-1"}, "saga"),
    ],
)
async def test_console_action_input_is_validated(
    make_console: MakeConsole, path: str, data: dict[str, object], field: str
) -> None:
    async with client_for(await make_console(local_actions=True)) as client:
        csrf = await _csrf(client)
        response = await client.post(path, data={"csrf": csrf, **data}, headers={"accept": "application/json"})
    assert response.status_code in (400, 404), response.text
    assert response.json()["error"]["field"] == field


@pytest.mark.parametrize(
    "query", ["/console/outbox?limit=100000", "/console/outbox?status=sent", "/console/sagas?status=weird",
              "/console/sagas?saga=a*b", "/console/dead-letters/orders.placed?limit=-1"],
)  # fmt: skip
async def test_console_page_query_is_validated(make_console: MakeConsole, query: str) -> None:
    async with client_for(await make_console()) as client:
        response = await client.get(query, headers={"accept": "application/json"})
    assert response.status_code == 400


async def test_console_schedule_pause_and_resume_show_on_the_page(make_console: MakeConsole) -> None:
    async with client_for(await make_console(local_actions=True)) as client:
        csrf = await _csrf(client)
        await client.post("/console/schedules/reports.refresh/pause", data={"csrf": csrf})
        paused = (await client.get("/console/schedules")).text
        await client.post("/console/schedules/reports.refresh/resume", data={"csrf": csrf})
        resumed = (await client.get("/console/schedules")).text
    assert 'badge-paused state">paused' in paused
    assert 'badge-active state">active' in resumed


async def test_console_trigger_now_records_a_manual_run(make_console: MakeConsole) -> None:
    async with client_for(await make_console(local_actions=True)) as client:
        csrf = await _csrf(client)
        response = await client.post("/console/schedules/reports.refresh/trigger", data={"csrf": csrf})
        page = (await client.get("/console/schedules")).text
    assert response.status_code == 303
    assert "manual" in page and "triggered (run" in page


async def test_console_saga_timeline_renders_and_a_parked_saga_is_retried(
    make_console: MakeConsole, stores: persistence.Persistence
) -> None:
    from conveyor.sagas import engine

    parked = engine.Instance(saga="shop.checkout", id="o-7", state={"order_id": "o-7"}, status=engine.Status.FAILED)
    async with stores.database.transaction() as tx:
        await stores.sagas.create(tx, parked)
        await stores.sagas.log(tx, "shop.checkout", "o-7", [engine.Entry("charge", "undo failed", "gateway down")])
    board = await make_console(local_actions=True)
    board.site.sources.app.add_saga(_checkout())
    async with client_for(board) as client:
        page = (await client.get("/console/sagas/show", params={"saga": "shop.checkout", "id": "o-7"})).text
        response = await client.post(
            "/console/sagas/retry", data={"csrf": csrf_of(page), "saga": "shop.checkout", "id": "o-7"}
        )
    pending = await board.site.sources.outbox.entries(topic="sagas.shop.checkout")
    assert "gateway down" in page and "event-error" in page
    assert response.status_code == 303
    assert len(pending) == 1


def _checkout() -> Any:
    from conveyor import Saga
    from pydantic import BaseModel

    class Checkout(BaseModel):
        order_id: str

    saga: Any = Saga("shop.checkout", Checkout, id=lambda o: o.order_id)

    @saga.step(send="inventory.reserve", undo="inventory.release", timeout=60)
    def reserve(order: Checkout) -> dict[str, str]:
        return {"order_id": order.order_id}

    return saga
