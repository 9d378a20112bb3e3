"""A hostile producer against a real ``conveyor worker``: every bad message dead-lettered or harmless, good ones once.

The producer is not Conveyor: the raw client of each broker (aio-pika, nats-py,
aiokafka) sends the corpus of :mod:`corpus`, each bad message followed by a good
``{"n": i}``. The worker runs ``faultapp`` (ledger row inside the handler's
transaction). Then every good message and every harmless bad one must have
exactly one ledger row, every poison message must be in the topic's dead-letter
subscription (found by its ``fault-kind`` header) and in the ledger never, the
good effects must never stall, ``/readyz`` must answer 200 throughout and the
worker must drain and exit 0.
"""

from __future__ import annotations

import asyncio
import struct
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aio_pika
import corpus
import databases
import httpx
import kafka_raw
import ledger
import nats
import orjson
import pytest
from aiokafka import AIOKafkaProducer
from cli import Process, free_port
from conveyor import transports
from conveyor.runtime import dead_letters
from conveyor.testing import unique
from raw_names import RawName

BAD_BASE = 100_000
MAX_BYTES = 512 * 1024
"""The worker's ``CONVEYOR_MAX_MESSAGE_BYTES``: the corpus's huge body (900 kB) is over it and under
every broker's limit (NATS's and Kafka's 1 MiB), so Conveyor, not the broker, must refuse it."""
LIMIT_S = 10.0
"""Longest gap allowed between good effects. A poison message is dead-lettered at once and a failing
one waits for its retry in the broker (NATS NAK delay, RabbitMQ delay tier, Kafka retry topic), not in
the handler's lanes, so nothing in the retry policy holds a good message back; the largest single cost
is dead-lettering the 900 kB body (a confirmed publish of it) and a few seconds of scheduling noise on a
busy 2-core machine."""
FEATURES = {
    "rabbit": {corpus.TYPED, corpus.NAME_CRLF, corpus.DELIVERY_COUNT, corpus.RAW_NAME},
    "kafka": {corpus.TYPED, corpus.NAME_CRLF, corpus.RAW_NAME},
    "nats": {corpus.CONTROL},
}


class Producer:
    """A raw client of one broker, publishing broker-neutral samples in that broker's binding."""

    def __init__(self, broker: str, url: str, topic: str) -> None:
        self.broker, self.url, self.topic = broker, url, topic
        self._client: Any = None
        self._target: Any = None
        self._last_seq = 0

    async def __aenter__(self) -> Producer:
        if self.broker == "rabbit":
            self._client = await aio_pika.connect(self.url)
            channel = await self._client.channel(publisher_confirms=True)
            self._target = await channel.get_exchange("conveyor")
        elif self.broker == "nats":
            self._client = await nats.connect(self.url)
            self._target = self._client.jetstream()
        else:
            bootstrap = self.url.removeprefix("kafka://").split("?", 1)[0]
            self._client = AIOKafkaProducer(bootstrap_servers=bootstrap, max_request_size=2 * 1024 * 1024)
            await self._client.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.broker == "kafka":
            await self._client.stop()
        else:
            await self._client.close()

    async def send(self, sample: corpus.Sample) -> None:
        headers = dict(sample.headers)
        if self.broker == "rabbit":
            await self._rabbit(sample.body, headers)
        elif self.broker == "nats":
            await self._nats(sample.body, headers, sample.kind)
        else:
            await self._kafka(sample.body, headers, sample.key)

    async def _rabbit(self, body: bytes, headers: dict[str, corpus.Header]) -> None:
        content_type = headers.pop("content-type", None)
        # pamqp writes bytearray as an AMQP byte array ('x'); plain bytes it refuses.
        table = {
            _raw(_renamed(k, "cloudEvents_")): bytearray(v) if isinstance(v, bytes) else v for k, v in headers.items()
        }
        message = aio_pika.Message(body, headers=table, content_type=content_type)  # type: ignore[arg-type]
        await self._target.publish(message, routing_key=self.topic, mandatory=True)

    async def _nats(self, body: bytes, headers: dict[str, corpus.Header], kind: str) -> None:
        text = {k: str(v) for k, v in headers.items()}
        if kind == "nats-expected-headers-then-dead-lettered":
            # Control headers the server checks (and accepts: they hold) on the first publish; copied
            # onto the dead letter, the subject sequence would no longer hold there.
            text |= {"Nats-Expected-Stream": "CONVEYOR", "Nats-Expected-Last-Subject-Sequence": str(self._last_seq)}
        ack = await self._target.publish(f"conveyor.{self.topic}", body, headers=text)
        self._last_seq = ack.seq

    async def _kafka(self, body: bytes, headers: dict[str, corpus.Header], key: bytes | None) -> None:
        records = [(_kafka_name(_renamed(k, "ce_")), _kafka_value(v)) for k, v in headers.items()]
        if any(isinstance(name, RawName) for name, _ in records):
            with kafka_raw.raw_header_names():
                await self._client.send_and_wait(self.topic, body, key=key, headers=records)
        else:
            await self._client.send_and_wait(self.topic, body, key=key, headers=records)

    async def good(self, n: int) -> None:
        sample = corpus.Sample(orjson.dumps({"n": n}), corpus.binary(), "effect", n, kind="good")
        await self.send(sample)


def _renamed(name: str, prefix: str) -> str:
    return prefix + name[3:] if name.startswith("ce-") else name


def _raw(name: str) -> str:
    """A header name as pamqp must write it: the bytes of a :data:`corpus.RAW_NAME` name, else the name."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return RawName(name.encode("utf-8", "surrogateescape"))
    return name


def _kafka_name(name: str) -> str:
    """A Kafka header name: a name with surrogate escapes goes on the wire as the bytes they stand for."""
    raw = name.encode("utf-8", "surrogateescape")
    try:
        raw.decode()
    except UnicodeDecodeError:
        return RawName(raw)
    return name


def _kafka_value(value: corpus.Header) -> bytes | None:
    """A Kafka header value: text as UTF-8; an int or float as a JVM producer writes a long or double."""
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, bool | int):
        return struct.pack(">q", int(value))
    if isinstance(value, float):
        return struct.pack(">d", value)
    return value.encode()


class ReadyWatch(threading.Thread):
    """Polls ``/readyz`` twice a second; keeps every answer that was not 200."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.failures: list[str] = []
        self.polls = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(0.5):
            try:
                response = httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=5)
                if response.status_code != 200:
                    self.failures.append(f"{response.status_code} {response.text[:200]}")
            except httpx.HTTPError as exc:
                self.failures.append(repr(exc))
            self.polls += 1


async def dead_lettered(url: str, topic: str, want: Counter[str]) -> Counter[str]:
    """Dead letters of ``topic`` by their ``fault-kind`` header, peeked until each kind of ``want`` showed up
    as often as wanted (or 45 s).

    A message the handler refuses is dead-lettered only after its retry (a delayed redelivery), which
    on a busy machine can take a while: the deadline is generous, the loop returns as soon as all are in.
    Kinds count one by one, not in total: a kind that may be dead-lettered or applied ("either") must not
    make the loop stop before a retried one arrived.
    """
    kinds: Counter[str] = Counter()
    deadline = time.monotonic() + 45
    while True:
        transport = transports.create(url)
        await transport.connect()
        try:
            found = await dead_letters.peek(transport, topic, limit=500, idle=1.5)
        finally:
            await transport.close()
        kinds = Counter(d.message.headers.get("fault-kind", "?") for d in found)
        leaked = [d.message.headers for d in found if any(k.lower().startswith("nats-exp") for k in d.message.headers)]
        assert not leaked, f"broker control headers copied onto a dead letter: {leaked}"
        if all(kinds[kind] >= count for kind, count in want.items()) or time.monotonic() > deadline:
            return kinds


@pytest.mark.parametrize("broker", ["rabbit", "nats", "kafka"])
def test_hostile_corpus_is_dead_lettered_or_harmless_and_good_messages_flow(
    broker: str, postgres_url: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = request.getfixturevalue(f"{broker}_url")
    database = databases.create("postgres")
    ledger.create_ledger(database)
    topic, handler = unique("hostile"), unique("hostile")
    kinds = [k for k in corpus.KINDS if k.needs <= FEATURES[broker]]
    samples = corpus.build(kinds, BAD_BASE)
    env = {
        **ledger.write_app(tmp_path), "CONVEYOR_DATABASE_URL": database, "CONVEYOR_BROKER_URL": url,
        "FAULT_TOPIC": topic, "FAULT_HANDLER": handler, "FAULT_MAX_ATTEMPTS": "2",
        "CONVEYOR_MAX_MESSAGE_BYTES": str(MAX_BYTES),
    }  # fmt: skip
    port = free_port()
    worker = Process(["worker", "--port", str(port)], tmp_path / "worker.log", cwd=tmp_path, **env)
    watch = ReadyWatch(port)
    try:
        worker.wait_ready(port, timeout=60)
        watch.start()

        async def produce() -> None:
            async with Producer(broker, url, topic) as producer:
                for i, sample in enumerate(samples):
                    await producer.send(sample)
                    await producer.good(i)

        started = time.time()
        asyncio.run(produce())
        must_apply = {s.n for s in samples if s.expect == "effect"} | set(range(len(samples)))
        deadline = time.monotonic() + 15  # then judge what arrived (all good effects take ~1-3 s here)
        while not must_apply <= {n for n, _ in ledger.effects(database)} and time.monotonic() < deadline:
            assert worker.popen.poll() is None, f"the worker died:\n{worker.text()}"
            time.sleep(0.2)
        expected_dlq = Counter(s.kind for s in samples if s.expect == "dlq")
        letters = asyncio.run(dead_lettered(url, topic, expected_dlq))
        time.sleep(0.5)  # a late duplicate effect would land now
        rows = ledger.effects(database)
        log_tail = worker.text()[-4000:]
        watch.stopping.set()
        watch.join()
        assert worker.terminate() == 0, worker.text()
    finally:
        watch.stopping.set()
        worker.close()
        databases.drop(database)

    applied = Counter(n for n, _ in rows)
    wrong: list[str] = []
    for sample in samples:
        in_dlq, effects = letters[sample.kind] > 0, applied[sample.n]
        if sample.expect == "dlq" and (not in_dlq or effects):
            wrong.append(f"{sample.kind}: expected a dead letter, got dlq={in_dlq} effects={effects}")
        elif sample.expect == "effect" and (in_dlq or effects != 1):
            wrong.append(f"{sample.kind}: expected one effect, got dlq={in_dlq} effects={effects}")
        elif sample.expect == "either" and in_dlq == (effects == 1):
            wrong.append(f"{sample.kind}: expected a dead letter or one effect, got dlq={in_dlq} effects={effects}")
    either = {s.kind: "dead-lettered" if letters[s.kind] else "applied once" for s in samples if s.expect == "either"}
    print(f"{broker}: {len(kinds)} kinds; coerced or refused wire types: {either}")
    extra = {kind: count for kind, count in letters.items() if count > sum(1 for s in samples if s.kind == kind)}
    vanished = [s for s in samples if s.expect != "effect" and not letters[s.kind] and not applied[s.n]]
    good = [(n, at) for n, at in rows if n < BAD_BASE]
    tally = ledger.tally(rows, must_apply)
    result = ledger.report(
        ledger.Result(
            scenario="hostile corpus", broker=broker, load=len(must_apply), faults=0, bad_inputs=len(kinds),
            lost=tally.lost + len(vanished), doubled=tally.doubled,
            stalled_s=ledger.longest_stall(good, since=started), limit_s=LIMIT_S,
        )
    )  # fmt: skip
    assert not wrong and not extra, "\n".join(wrong) + f"\nduplicate dead letters: {extra}\nworker log:\n{log_tail}"
    assert not watch.failures and watch.polls > 0, f"/readyz was not 200: {watch.failures[:5]}"
    assert result.ok, result
