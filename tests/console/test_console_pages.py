"""Each console page renders, from a browser's point of view (local access, no token)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from conftest import TOPIC, MakeConsole, client_for, dead_letter
from conveyor import heartbeats, persistence
from conveyor.sagas import engine

from event_store import models


@pytest.mark.parametrize(
    "path",
    ["/console/", "/console/overview/live", "/console/dead-letters", f"/console/dead-letters/{TOPIC}",
     "/console/outbox", "/console/schedules", "/console/sagas", "/console/workers", "/console/workers/live"],
)  # fmt: skip
async def test_console_page_renders_with_security_headers(make_console: MakeConsole, path: str) -> None:
    async with client_for(await make_console(local_actions=True)) as client:
        response = await client.get(path)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in response.headers["content-security-policy"]
    assert response.headers["x-frame-options"] == "DENY"


async def test_console_overview_lists_handlers_and_schedules(make_console: MakeConsole) -> None:
    async with client_for(await make_console()) as client:
        page = (await client.get("/console/")).text
    assert "billing.charge-order" in page
    assert "reports.refresh" in page


async def test_console_dead_letter_is_listed_and_shown(make_console: MakeConsole, broker_url: str) -> None:
    letter = await dead_letter(broker_url, error="card declined")
    async with client_for(await make_console()) as client:
        listing = (await client.get(f"/console/dead-letters/{TOPIC}")).text
        shown = (await client.get(f"/console/dead-letters/{TOPIC}/show", params={"id": letter})).text
    assert letter in listing and "card declined" in listing
    assert "&#34;order_id&#34;: &#34;o-1&#34;" in shown or '"order_id": "o-1"' in shown
    assert "conveyor-dlq-handler" in shown


async def test_console_schedules_show_the_trigger_in_words(make_console: MakeConsole) -> None:
    async with client_for(await make_console()) as client:
        page = (await client.get("/console/schedules")).text
    assert "every 5 minutes" in page


async def test_console_unknown_page_is_an_html_404(make_console: MakeConsole) -> None:
    async with client_for(await make_console()) as client:
        response = await client.get("/console/nope")
    assert response.status_code == 404
    assert "<h1>404</h1>" in response.text


async def test_console_api_error_keeps_the_json_error_shape(make_console: MakeConsole) -> None:
    async with client_for(await make_console()) as client:
        response = await client.get("/console/dead-letters/orders.*", headers={"accept": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["field"] == "topic"


async def test_console_outbox_counts_every_topic_however_deep_the_backlog(
    make_console: MakeConsole, stores: persistence.Persistence
) -> None:
    async with stores.database.transaction() as tx:
        for n in range(5_001):
            await stores.outbox.add(tx, "a.early", {"n": n})
        for n in range(3):
            await stores.outbox.add(tx, "b.late", {"n": n})
    async with client_for(await make_console()) as client:
        page = (await client.get("/console/outbox")).text
    table = page[page.index('id="outbox-topics"') : page.index("</table>", page.index('id="outbox-topics"'))]
    assert '>a.early</a></th><td class="num">5001</td>' in table, table
    assert '>b.late</a></th><td class="num">3</td>' in table, table


async def test_console_workers_lists_live_and_gone_processes(
    make_console: MakeConsole, stores: persistence.Persistence
) -> None:
    started = datetime(2026, 12, 7, 18, 0, tzinfo=UTC)
    for name, pid, in_flight in (("live", 4242, 3), ("crashed", 777, 1)):
        await stores.heartbeats.beat(
            heartbeats.Heartbeat(f"{name}:{pid}:x", "shop", f"host-{name}", pid, ("worker",), ("billing.charge-order",),
                                 in_flight, started)
        )  # fmt: skip
    table = models.worker_heartbeats
    async with stores.database.transaction() as tx:  # the crashed process missed its beats
        await tx.execute(sa.update(table).where(table.c.pid == 777).values(beat_at=started))
    async with client_for(await make_console()) as client:
        page = (await client.get("/console/workers")).text
    rows = {row.split('data-pid="')[1].split('"')[0]: row for row in page.split("<tr")[1:] if "data-pid" in row}
    assert sorted(rows) == ["4242", "777"]
    assert "host-live" in rows["4242"] and "billing.charge-order" in rows["4242"] and ">3<" in rows["4242"]
    assert "gone" in rows["777"] and "gone" not in rows["4242"]


async def test_console_outbox_shows_due_and_scheduled_rows_apart(
    make_console: MakeConsole, stores: persistence.Persistence
) -> None:
    async with stores.database.transaction() as tx:
        await stores.outbox.add(tx, "a.now", {"n": 0})
        for n in range(3):  # saga timers, delayed messages: not a stuck relay
            await stores.outbox.add(tx, "b.later", {"n": n}, delay=timedelta(minutes=5))
    async with client_for(await make_console()) as client:
        page = (await client.get("/console/outbox")).text
    assert '<dt>Due now</dt><dd id="outbox-due">1</dd>' in page, page
    assert '<dd id="outbox-scheduled">3</dd>' in page, page
    table = page[page.index('id="outbox-topics"') : page.index("</table>", page.index('id="outbox-topics"'))]
    assert '>b.later</a></th><td class="num">3</td><td class="num">0</td><td class="num">3</td>' in table, table
    listing = page[page.index('id="outbox"') :]
    assert listing.count(">scheduled<") == 3 and listing.count(">due<") == 1, listing


async def test_console_sagas_says_when_more_instances_than_shown_exist_and_explains_the_step(
    make_console: MakeConsole, stores: persistence.Persistence
) -> None:
    async with stores.database.transaction() as tx:
        why = "step 'pay' failed: declined"
        for n in range(3):
            done = engine.Status.COMPENSATED
            instance = engine.Instance("shop.order", f"o{n}", {}, done, step=-1, error=why, cause=why)
            await stores.sagas.create(tx, instance)
    async with client_for(await make_console()) as client:
        cut = (await client.get("/console/sagas", params={"limit": 2})).text
        whole = (await client.get("/console/sagas")).text
        shown = (await client.get("/console/sagas/show", params={"saga": "shop.order", "id": "o1"})).text
    assert "Showing the first 2 instances; there are more" in cut, cut
    assert "there are more" not in whole
    assert "-1 once compensated" in whole, whole
    assert "<dt>Cause</dt><dd>step &#39;pay&#39; failed: declined</dd>" in shown, shown
