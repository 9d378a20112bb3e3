"""HTTP ingest abuse against a real ``conveyor serve``: refused requests get a JSON 4xx and do nothing.

Topology: ``conveyor serve`` (ingest into the outbox, bearer token required),
``conveyor relay`` and a ``conveyor worker`` running ``faultapp``, on NATS and
PostgreSQL. The abuse: oversized bodies (declared and streamed), wrong or absent
content types, invalid and 10,000-deep JSON, missing or wrong credentials (a
lower-case ``bearer`` scheme must be accepted), hostile topic names (path
traversal, unicode, NUL, over-long), a burst of concurrent posts, sockets that
send part of a request and stop, and idempotent resubmissions. Every accepted
event must take effect exactly once (ledger); every refused one must be a 4xx
with a JSON ``error`` and leave no trace in the outbox or the ledger; the server
must answer throughout (never a 5xx) and stay ready.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import databases
import httpx
import ledger
import orjson
import sqlalchemy as sa
from cli import Process, free_port
from conveyor.testing import unique

from event_store.database import normalize_url

TOKEN = "s3cret-token"
MAX_BYTES = 64 * 1024
REFUSED_BASE = 100_000
BURST = 100
DRAIN_S = 5.0
"""``CONVEYOR_DRAIN_TIMEOUT``: how long SIGTERM may wait for requests under way."""
LIMIT_S = 10.0
"""Longest a well-formed request may wait for its answer. Each accepted post is one short PostgreSQL
transaction (a few ms), so even the burst of 100 concurrent posts queues for a second or two on this
2-core machine; stalled sockets hold nothing (uvicorn serves each connection on its own). Beyond 10 s a
client would have timed out: as bad as a refusal."""


@dataclass
class Call:
    """One request of the abuse and what must come of it."""

    name: str
    path: str
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    status: int | tuple[int, ...] = 202
    """The answer required (any of a tuple: a path no route matches may be a 404 rather than a 400)."""
    n: int | None = None
    """The event's ``n`` when accepted (202), checked in the ledger."""
    auth: str | None = f"Bearer {TOKEN}"


def event(n: int, **changes: object) -> dict[str, object]:
    base = {"specversion": "1.0", "id": f"e-{uuid.uuid4().hex[:16]}", "source": "abuse", "type": "fault"}
    return {**base, "data": {"n": n}, **changes}


STRUCTURED = {"content-type": "application/cloudevents+json"}


def binary(event_id: str | None = None) -> dict[str, str]:
    headers = {"content-type": "application/json", "ce-specversion": "1.0", "ce-source": "abuse", "ce-type": "fault"}
    if event_id is not None:
        headers["ce-id"] = event_id
    return headers


def calls(topic: str) -> list[Call]:
    """The sequential part of the abuse: ``n`` below :data:`REFUSED_BASE` for accepted events."""
    path = f"/events/{topic}"
    ok = iter(range(REFUSED_BASE))
    bad = iter(range(REFUSED_BASE, 2 * REFUSED_BASE))

    def good(name: str, auth: str = f"Bearer {TOKEN}") -> Call:
        n = next(ok)
        return Call(name, path, orjson.dumps(event(n)), STRUCTURED, 202, n, auth)

    def refused(name: str, status: int | tuple[int, ...], to: str = path, **changes: object) -> Call:
        return Call(name, to, orjson.dumps(event(next(bad), **changes)), STRUCTURED, status)

    twice, reused = event(next(ok)), event(next(ok))
    key, keyed_n = f"idem-{uuid.uuid4().hex[:12]}", next(ok)
    keyed = {**binary(), "idempotency-key": key}
    deep = orjson.dumps(event(next(bad)))[:-1] + b',"deep":' + b"[" * 10_000 + b"]" * 10_000 + b"}"
    no_id = {k: v for k, v in event(next(bad)).items() if k != "id"}
    bad_utf8 = orjson.dumps(event(next(bad)))[:-1] + b',"note":"\xff\xfe"}'
    intruder = {**reused, "source": "intruder", "data": {"n": next(bad)}}
    return [
        good("structured"),
        Call("binary", path, orjson.dumps({"n": (n := next(ok))}), binary(f"b-{uuid.uuid4().hex}"), 202, n),
        good("lower-case bearer", f"bearer {TOKEN}"),
        good("upper-case BEARER", f"BEARER {TOKEN}"),
        *(Call(f"same event #{i}", path, orjson.dumps(twice), STRUCTURED, 202, twice["data"]["n"]) for i in range(3)),  # type: ignore[index]
        *(Call(f"idempotency key #{i}", path, orjson.dumps({"n": keyed_n}), keyed, 202, keyed_n) for i in range(2)),
        Call("first use of an id", path, orjson.dumps(reused), STRUCTURED, 202, reused["data"]["n"]),  # type: ignore[index]
        Call("same id, other source", path, orjson.dumps(intruder), STRUCTURED, 409),
        Call("no credentials", path, orjson.dumps(event(next(bad))), STRUCTURED, 401, auth=None),
        Call("wrong token", path, orjson.dumps(event(next(bad))), STRUCTURED, 401, auth="Bearer not-the-token"),
        Call("token prefix", path, orjson.dumps(event(next(bad))), STRUCTURED, 401, auth=f"Bearer {TOKEN[:-1]}"),
        Call("basic scheme", path, orjson.dumps(event(next(bad))), STRUCTURED, 401, auth=f"Basic {TOKEN}"),
        Call("token without scheme", path, orjson.dumps(event(next(bad))), STRUCTURED, 401, auth=TOKEN),
        refused("oversized body", 413, pad="x" * (2 * MAX_BYTES)),
        Call("no content type", path, orjson.dumps(event(next(bad))), {}, 415),
        Call("text/plain", path, orjson.dumps(event(next(bad))), {"content-type": "text/plain"}, 415),
        Call("form post", path, b"n=1", {"content-type": "application/x-www-form-urlencoded"}, 415),
        Call("invalid json", path, b'{"specversion": "1.0", "id": ', STRUCTURED, 400),
        Call("json array", path, b"[1, 2]", STRUCTURED, 400),
        Call("10000-deep json", path, deep, STRUCTURED, 400),
        Call("binary data not json", path, b"{n: 1", binary(f"b-{uuid.uuid4().hex}"), 400),
        Call("missing id", path, orjson.dumps(no_id), STRUCTURED, 400),
        refused("numeric source", 400, source=5),
        Call("invalid utf-8", path, bad_utf8, STRUCTURED, 400),
        Call("key differs from ce-id", path, b"{}", {**binary("one-id"), "idempotency-key": "other-id"}, 400),
        refused("path traversal", (400, 404), "/events/..%2F..%2Fetc%2Fpasswd"),
        refused("dot-dot topic", (400, 404), "/events/.."),
        refused("unicode topic", 400, "/events/ord%C3%A9rs"),
        refused("NUL in topic", 400, "/events/a%00b"),
        refused("over-long topic", 400, "/events/" + "t" * 300),
        refused("upper-case topic", 400, "/events/Orders"),
    ]


def answer(client: httpx.Client, call: Call) -> httpx.Response:
    headers = dict(call.headers)
    if call.auth is not None:
        headers["authorization"] = call.auth
    return client.post(call.path, content=call.body, headers=headers)


def streamed_oversize(base: str, path: str) -> httpx.Response:
    """A chunked body with no Content-Length that grows past the limit."""

    def chunks() -> object:
        yield orjson.dumps(event(REFUSED_BASE - 1))[:-1] + b', "pad": "'
        for _ in range(2 * MAX_BYTES // 4096):
            yield b"x" * 4096
        yield b'"}'

    headers = {**STRUCTURED, "authorization": f"Bearer {TOKEN}"}
    return httpx.post(base + path, content=chunks(), headers=headers, timeout=30)  # type: ignore[arg-type]


def stalled_sockets(port: int, path: str) -> list[socket.socket]:
    """Connections that send part of a request and stop: half a header block, and headers without the body."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        "Content-Type: application/cloudevents+json\r\nContent-Length: 500\r\n\r\n"
    ).encode()
    sockets = []
    for part in (head[:40], head, head + b'{"specversion": "1.0", "id": "stalled-'):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(part)
        sockets.append(sock)
    return sockets


async def burst(base: str, path: str, first_n: int) -> tuple[list[int], float]:
    """``BURST`` concurrent posts of distinct events plus 10 of one event: statuses and the slowest answer."""
    shared = event(first_n + BURST)
    bodies = [orjson.dumps(event(first_n + i)) for i in range(BURST)] + [orjson.dumps(shared)] * 10
    headers = {**STRUCTURED, "authorization": f"Bearer {TOKEN}"}
    limits = httpx.Limits(max_connections=BURST)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:

        async def post(body: bytes) -> tuple[int, float]:
            started = time.monotonic()
            response = await client.post(path, content=body, headers=headers)
            return response.status_code, time.monotonic() - started

        answers = await asyncio.gather(*(post(body) for body in bodies))
    return [status for status, _ in answers], max(seconds for _, seconds in answers)


def count(url: str, sql: str) -> int:
    engine = sa.create_engine(normalize_url(url, sync=True))
    try:
        with engine.connect() as connection:
            return int(connection.execute(sa.text(sql)).scalar_one())
    finally:
        engine.dispose()


def test_ingest_abuse_is_refused_with_json_4xx_and_accepted_events_apply_once(
    postgres_url: str, nats_url: str, tmp_path: Path
) -> None:
    url = databases.create("postgres")
    ledger.create_ledger(url)
    topic, handler = unique("ingest"), unique("ingest")
    env = {
        **ledger.write_app(tmp_path), "CONVEYOR_DATABASE_URL": url, "CONVEYOR_BROKER_URL": nats_url,
        "FAULT_TOPIC": topic, "FAULT_HANDLER": handler, "CONVEYOR_INGEST_TOKEN": TOKEN,
        "CONVEYOR_MAX_MESSAGE_BYTES": str(MAX_BYTES), "CONVEYOR_DRAIN_TIMEOUT": str(DRAIN_S),
    }  # fmt: skip
    web, port = free_port(), free_port()
    base = f"http://127.0.0.1:{web}"
    server = Process(["serve", "--port", str(web)], tmp_path / "serve.log", cwd=tmp_path, **env)
    worker = Process(["worker", "--port", str(port)], tmp_path / "worker.log", cwd=tmp_path, **env)
    relay = Process(["relay", "--port", "0"], tmp_path / "relay.log", cwd=tmp_path, **env)
    problems: list[str] = []
    accepted: set[int] = set()
    slowest = 0.0
    sockets: list[socket.socket] = []
    try:
        server.wait_ready(web, timeout=60)
        worker.wait_ready(port, timeout=60)
        sockets = stalled_sockets(web, f"/events/{topic}")  # held open through everything below
        with httpx.Client(base_url=base, timeout=30) as client:
            for call in calls(topic):
                started = time.monotonic()
                response = answer(client, call)
                slowest = max(slowest, time.monotonic() - started)
                wanted = call.status if isinstance(call.status, tuple) else (call.status,)
                if response.status_code not in wanted:
                    problems.append(
                        f"{call.name}: {response.status_code} {response.text[:200]!r}, expected {call.status}"
                    )
                elif response.status_code >= 400 and not _json_error(response):
                    problems.append(f"{call.name}: {call.status} without a JSON error: {response.text[:200]!r}")
                elif call.n is not None:
                    accepted.add(call.n)
        response = streamed_oversize(base, f"/events/{topic}")
        if response.status_code != 413 or not _json_error(response):
            problems.append(f"streamed oversize: {response.status_code} {response.text[:200]!r}")
        statuses, burst_slowest = asyncio.run(burst(base, f"/events/{topic}", 1_000))
        slowest = max(slowest, burst_slowest)
        if set(statuses) != {202}:
            problems.append(f"burst: statuses {sorted(set(statuses))}")
        accepted |= set(range(1_000, 1_000 + BURST + 1))
        ready = httpx.get(f"{base}/readyz", timeout=10)
        if ready.status_code != 200:
            problems.append(f"/readyz {ready.status_code} with stalled sockets open: {ready.text[:200]}")
        deadline = time.monotonic() + 60
        while not accepted <= {n for n, _ in ledger.effects(url)} and time.monotonic() < deadline:
            assert worker.popen.poll() is None and relay.popen.poll() is None, worker.text() + relay.text()
            time.sleep(0.2)
        time.sleep(0.5)  # a late duplicate would land now
        rows = ledger.effects(url)
        stored = count(url, "SELECT count(*) FROM outbox")
        for process in (server, relay, worker):
            assert process.popen.poll() is None, f"a process died:\n{process.text()}"
        for process in (relay, worker):
            assert process.terminate() == 0, process.text()
        # SIGTERM with the stalled requests still open: the drain deadline bounds the wait for them.
        server.popen.send_signal(signal.SIGTERM)
        try:
            code = server.popen.wait(DRAIN_S + 5)
        except subprocess.TimeoutExpired:
            problems.append(
                f"SIGTERM did not stop `conveyor serve` within {DRAIN_S + 5:.0f} s (drain timeout {DRAIN_S:.0f} s) "
                "while a client held a request with an unfinished body open"
            )
            for sock in sockets:
                sock.close()
            code = server.popen.wait(20)
        if code != 0:
            problems.append(f"`conveyor serve` exited {code}:\n{server.text()[-2000:]}")
    finally:
        for sock in sockets:
            sock.close()
        for process in (server, relay, worker):
            process.close()
        databases.drop(url)
    tally = ledger.tally(rows, accepted)
    refused_effects = [n for n, _ in rows if n not in accepted]
    result = ledger.report(
        ledger.Result(
            scenario="HTTP ingest abuse", broker="nats", load=len(accepted), faults=len(sockets),
            bad_inputs=sum(1 for c in calls(topic) if c.n is None) + 1 + len(sockets), lost=tally.lost,
            doubled=tally.doubled, stalled_s=slowest, limit_s=LIMIT_S,
        )
    )  # fmt: skip
    assert not problems, "\n".join(problems)
    assert stored == len(accepted), f"{stored} outbox rows for {len(accepted)} accepted events"
    assert not refused_effects, f"refused events took effect: {refused_effects}"
    assert result.ok, result


def _json_error(response: httpx.Response) -> bool:
    """A JSON object with an ``error``: a message, or an object with one (``{"code", "message", "field"}``)."""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        return False
    return isinstance(error, str) or (isinstance(error, dict) and isinstance(error.get("message"), str))
