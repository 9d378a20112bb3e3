"""Page load of the operations console's overview: 50 handlers, 10,000 dead letters.

The console is built as ``conveyor run`` builds it (SQLite outbox, schedules
and sagas; the in-memory broker holding 10,000 dead letters across the 50
handlers' topics; a scaling snapshot and a sampler with history for every
handler), then ``GET /console/`` is timed, server time and the full HTML
body, in-process (ASGI) and over a loopback socket (uvicorn). The first
(cold) load reads every topic's dead-letter count from the broker; later
loads within five seconds reuse it, as the page does. The dead-letter page of
the fullest topic (a peek of 50 letters, on a connection of its own) is timed
too. Goal: overview under 200 ms.

    .venv/bin/python bench/console_load.py --loads 30
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "platform")]

from conveyor import Context, envelope, on, ports, registry, telemetry, transports  # noqa: E402
from conveyor.console import app as console_app  # noqa: E402
from conveyor.console import auth, samples, sources  # noqa: E402
from conveyor.runtime import app as runtime_app  # noqa: E402
from conveyor.runtime import http  # noqa: E402
from conveyor.runtime.worker import dead_letter_headers, dead_letter_topic  # noqa: E402

from event_store import migrate  # noqa: E402
from event_store.database import Database  # noqa: E402


def _application(handlers: int) -> registry.Registry:
    funcs = []
    for number in range(handlers):

        async def handle(data: dict[str, Any], ctx: Context) -> None: ...

        funcs.append(on(f"bench.topic-{number}", name=f"bench.handler-{number}")(handle))
    return registry.Registry.of(*funcs)


async def _dead_letters(url: str, app: registry.Registry, total: int) -> str:
    transport = transports.create(url)
    await transport.connect()
    topics = [h.topic for h in app.handlers]
    kept = [
        ports.Subscription(name=dead_letter_topic(t), topic=dead_letter_topic(t), max_deliveries=None) for t in topics
    ]
    await transport.declare([s.topic for s in kept], kept)
    fullest = topics[0]
    for number in range(total):
        topic = fullest if number < total // 2 else topics[number % len(topics)]  # half on one topic
        event = envelope.to_structured(envelope.create(topic, {"n": number, "pad": "x" * 200}, source="bench"))
        headers = {**event.headers, **dead_letter_headers("bench.handler", topic, "ValueError", "boom", 5)}
        await transport.publish(
            dead_letter_topic(topic), envelope.WireMessage(event.body, headers, None, envelope.new_id())
        )
    await transport.close()
    return fullest


def _sampler(app: registry.Registry) -> samples.Sampler:
    sampler = samples.Sampler()
    for step in range(samples.KEEP):
        for handler in app.handlers:
            telemetry.MESSAGES.labels(handler.name, "succeeded").inc(10)
            telemetry.HANDLER_SECONDS.labels(handler.name).observe(0.002 * (1 + step % 5))
        sampler.sample(at=float(step) * samples.INTERVAL)
    return sampler


def _report(name: str, timings: list[float]) -> None:
    ordered = sorted(timings)
    p95 = ordered[max(0, round(0.95 * len(ordered)) - 1)]
    print(
        f"{name:<44} n={len(ordered):<3} median {statistics.median(ordered) * 1000:7.1f} ms"
        f"   p95 {p95 * 1000:7.1f} ms   max {ordered[-1] * 1000:7.1f} ms"
    )


async def _time(client: httpx.AsyncClient, path: str, loads: int) -> tuple[list[float], int]:
    timings, size = [], 0
    for _ in range(loads):
        started = time.perf_counter()
        response = await client.get(path)
        body = response.content
        timings.append(time.perf_counter() - started)
        assert response.status_code == 200, response.text[:500]
        size = len(body)
    return timings, size


async def main(loads: int, handlers: int, dead: int) -> None:
    with tempfile.TemporaryDirectory() as directory:
        url = f"sqlite+aiosqlite:///{directory}/bench.db"
        await migrate.upgrade(url)
        app = _application(handlers)
        broker = "memory://console-bench"
        fullest = await _dead_letters(broker, app, dead)
        async with contextlib.AsyncExitStack() as stack:
            database = Database(url)
            stack.push_async_callback(database.close)
            stores = runtime_app.stores_for(database, "bench")
            outbox = stores.relay_store()
            stack.push_async_callback(outbox.close)
            transport = transports.create(broker)
            await transport.connect()
            stack.push_async_callback(transport.close)
            loads_now = {"handlers": [
                {"handler": h.name, "topic": h.topic, "capacity": 16, "in_flight": 3, "backlog": 120,
                 "oldest_age_seconds": 1.5, "error": None} for h in app.handlers
            ]}  # fmt: skip
            found = sources.Sources(
                service="bench", app=app, stores=stores, outbox=outbox,
                open_transport=lambda: transports.create(broker), scaling=lambda: loads_now, transport=transport,
            )  # fmt: skip
            board = console_app.Console(found, auth.Access(None, local_actions=True), _sampler(app))
            site = http.create_app([], console=board.routes())
            headers = {"accept": "text/html"}
            print(f"{handlers} handlers, {dead} dead letters ({dead // 2} on {fullest}), {loads} loads each\n")
            asgi = httpx.AsyncClient(
                transport=httpx.ASGITransport(app=site), base_url="http://127.0.0.1", headers=headers
            )
            async with asgi:
                cold, _ = await _time(asgi, "/console/", 1)
                warm, size = await _time(asgi, "/console/", loads)
                live, _ = await _time(asgi, "/console/overview/live", loads)
                letters, _ = await _time(asgi, f"/console/dead-letters/{fullest}", 5)
            server = http.HttpServer(site, "127.0.0.1", 0)
            await server.start()
            stack.push_async_callback(server.stop)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", headers=headers) as socket:
                over_http, _ = await _time(socket, "/console/", loads)
            _report("overview, cold (reads 50 dead-letter counts)", cold)
            _report("overview, ASGI in-process", warm)
            _report("overview, HTTP over loopback (uvicorn)", over_http)
            _report("overview live part (the 3 s refresh)", live)
            _report(f"dead letters of {fullest} (peek 50 of {dead // 2})", letters)
            print(f"\noverview HTML: {size:,} bytes")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loads", type=int, default=30)
    parser.add_argument("--handlers", type=int, default=50)
    parser.add_argument("--dead-letters", type=int, default=10_000)
    arguments = parser.parse_args()
    asyncio.run(main(max(arguments.loads, 20), arguments.handlers, arguments.dead_letters))
