"""HTTP endpoints: health, readiness, metrics and CloudEvents or plain JSON ingest (202/400/401/413/415)."""

import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import orjson
import pytest
from conveyor import envelope, errors, settings
from conveyor.runtime import app as runtime_app
from conveyor.runtime import http

EVENT = {"specversion": "1.0", "id": "e-1", "source": "shop", "type": "orders.placed", "data": {"order_id": "o-1"}}
STRUCTURED = {"content-type": "application/cloudevents+json"}
BINARY = {
    "content-type": "application/json",
    "ce-specversion": "1.0",
    "ce-id": "e-2",
    "ce-source": "shop",
    "ce-type": "t",
}


class Accepted:
    """A fake accept callback, idempotent by event id like the outbox."""

    def __init__(self) -> None:
        self.events: list[tuple[str, envelope.Envelope]] = []

    async def __call__(self, topic: str, event: envelope.Envelope) -> http.Outcome:
        for seen_topic, seen in self.events:
            if seen.id == event.id:
                return "duplicate" if (seen_topic, seen.source) == (topic, event.source) else "conflict"
        self.events.append((topic, event))
        return "added"


@pytest.fixture
def accepted() -> Accepted:
    return Accepted()


async def client_for(app: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")  # type: ignore[arg-type]


@pytest.fixture
async def client(accepted: Accepted) -> AsyncIterator[httpx.AsyncClient]:
    app = http.create_app([], http.IngestConfig(accept=accepted, max_bytes=4096, token="s3cret"))
    async with await client_for(app) as c:
        c.headers["authorization"] = "Bearer s3cret"
        yield c


async def test_structured_event_is_accepted_with_202(client: httpx.AsyncClient, accepted: Accepted) -> None:
    response = await client.post("/events/orders.placed", content=orjson.dumps(EVENT), headers=STRUCTURED)
    assert (response.status_code, response.json()) == (202, {"id": "e-1", "topic": "orders.placed"})
    assert accepted.events[0][1].json() == {"order_id": "o-1"}


async def test_binary_event_is_accepted_and_percent_decoded(client: httpx.AsyncClient, accepted: Accepted) -> None:
    headers = {**BINARY, "ce-subject": "order%20o-1"}
    response = await client.post("/events/orders.placed", content=b'{"order_id": "o-2"}', headers=headers)
    assert response.status_code == 202
    assert accepted.events[0][1].subject == "order o-1"


async def test_missing_attribute_is_400_naming_the_field(client: httpx.AsyncClient, accepted: Accepted) -> None:
    event = {k: v for k, v in EVENT.items() if k != "source"}
    response = await client.post("/events/orders.placed", content=orjson.dumps(event), headers=STRUCTURED)
    assert (response.status_code, response.json()["error"]["field"]) == (400, "source")
    assert accepted.events == []


async def test_malformed_json_data_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post("/events/orders.placed", content=b'{"order_id": ', headers=BINARY)
    assert (response.status_code, response.json()["error"]["field"]) == (400, "data")


async def test_invalid_topic_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post("/events/orders.*", content=orjson.dumps(EVENT), headers=STRUCTURED)
    assert (response.status_code, response.json()["error"]["field"]) == (400, "topic")


async def test_missing_token_is_401(client: httpx.AsyncClient, accepted: Accepted) -> None:
    response = await client.post(
        "/events/orders.placed", content=orjson.dumps(EVENT), headers={**STRUCTURED, "authorization": "Bearer nope"}
    )
    assert (response.status_code, response.headers["www-authenticate"]) == (401, "Bearer")
    assert accepted.events == []


async def test_oversized_body_is_413(client: httpx.AsyncClient) -> None:
    event = {**EVENT, "data": {"blob": "x" * 5000}}
    response = await client.post("/events/orders.placed", content=orjson.dumps(event), headers=STRUCTURED)
    assert response.status_code == 413


async def test_oversized_streamed_body_without_length_is_413(client: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"x" * 1000

    response = await client.post("/events/orders.placed", content=chunks(), headers=STRUCTURED)
    assert response.status_code == 413


async def test_other_media_type_is_415(client: httpx.AsyncClient) -> None:
    response = await client.post("/events/orders.placed", content=b"<order/>", headers={"content-type": "text/xml"})
    assert (response.status_code, response.json()["error"]["code"]) == (415, "unsupported_media_type")


async def test_plain_json_is_the_data_of_a_new_event(client: httpx.AsyncClient, accepted: Accepted) -> None:
    headers = {"content-type": "application/json; charset=utf-8"}
    response = await client.post("/events/orders.placed", content=b'{"order_id": "o-3"}', headers=headers)
    [(topic, event)] = accepted.events
    assert (response.status_code, response.json()) == (202, {"id": event.id, "topic": "orders.placed"})
    assert (topic, event.type, event.source, event.json()) == (
        "orders.placed",
        "orders.placed",
        "conveyor:http",
        {"order_id": "o-3"},
    )


async def test_plain_json_takes_its_id_from_the_idempotency_key(client: httpx.AsyncClient, accepted: Accepted) -> None:
    headers = {"content-type": "application/json", "idempotency-key": "k-1"}
    answers = [await client.post("/events/orders.placed", content=b"{}", headers=headers) for _ in range(2)]
    assert [(r.status_code, r.json()["id"]) for r in answers] == [(202, "k-1"), (202, "k-1")]
    assert len(accepted.events) == 1


async def test_plain_json_without_a_key_is_a_new_event_each_time(client: httpx.AsyncClient, accepted: Accepted) -> None:
    for _ in range(2):
        await client.post("/events/orders.placed", content=b"{}", headers={"content-type": "application/json"})
    assert len({event.id for _, event in accepted.events}) == 2


async def test_malformed_plain_json_is_400(client: httpx.AsyncClient, accepted: Accepted) -> None:
    headers = {"content-type": "application/json"}
    response = await client.post("/events/orders.placed", content=b'{"order_id": ', headers=headers)
    assert (response.status_code, response.json()["error"]["field"], accepted.events) == (400, "data", [])


async def test_accept_failure_is_503() -> None:
    async def refuse(topic: str, event: envelope.Envelope) -> http.Outcome:
        raise errors.TransportError("broker down")

    app = http.create_app([], http.IngestConfig(accept=refuse, max_bytes=4096))
    async with await client_for(app) as c:
        response = await c.post("/events/orders.placed", content=orjson.dumps(EVENT), headers=STRUCTURED)
    assert response.status_code == 503


async def test_readyz_reports_each_check() -> None:
    async def ok() -> None: ...

    async def down() -> None:
        raise errors.TransportError("connection refused")

    async with await client_for(
        http.create_app([http.Check("broker", ok), http.Check("cache", down, critical=False)])
    ) as c:
        degraded = await c.get("/readyz")
    async with await client_for(http.create_app([http.Check("broker", down)])) as c:
        unhealthy = await c.get("/readyz")
    assert (degraded.status_code, degraded.json()["status"]) == (200, "degraded")
    assert (unhealthy.status_code, unhealthy.json()["status"]) == (503, "unhealthy")
    assert unhealthy.json()["checks"]["broker"]["error"] == "connection refused"


async def test_healthz_and_metrics() -> None:
    async with await client_for(http.create_app([])) as c:
        health, metrics = await c.get("/healthz"), await c.get("/metrics")
    assert health.json() == {"status": "ok"}
    assert b"conveyor_messages_total" in metrics.content or b"conveyor_handler_seconds" in metrics.content


async def test_ingest_is_absent_when_disabled() -> None:
    async with await client_for(http.create_app([])) as c:
        response = await c.post("/events/orders.placed", content=orjson.dumps(EVENT), headers=STRUCTURED)
    assert response.status_code == 404


# Idempotency by event id.


async def post(client: httpx.AsyncClient, topic: str = "orders.placed", **changes: object) -> httpx.Response:
    return await client.post(f"/events/{topic}", content=orjson.dumps({**EVENT, **changes}), headers=STRUCTURED)


async def test_same_event_posted_twice_answers_202_with_the_same_body(client: httpx.AsyncClient) -> None:
    first, second = await post(client), await post(client)
    assert (second.status_code, second.json()) == (202, first.json())


async def test_same_event_posted_twice_is_accepted_once(client: httpx.AsyncClient, accepted: Accepted) -> None:
    await post(client)
    await post(client)
    assert len(accepted.events) == 1


async def test_same_id_for_another_topic_is_409_naming_id(client: httpx.AsyncClient) -> None:
    await post(client)
    response = await post(client, topic="orders.shipped")
    assert (response.status_code, response.json()["error"]["field"]) == (409, "id")


async def test_same_id_from_another_source_is_409_naming_id(client: httpx.AsyncClient) -> None:
    await post(client)
    response = await post(client, source="billing")
    assert (response.status_code, response.json()["error"]["field"]) == (409, "id")


@pytest.mark.parametrize(
    "changes",
    [{"id": "i" * 200}, {"id": "e\x00"}, {"id": "e\n1"}, {"id": "e\x7f"}, {"id": "e\x85"}, {"id": 5}, {"id": ""}],
    ids=["200 characters", "NUL", "LF", "DEL", "C1", "number", "empty"],
)
async def test_invalid_structured_id_is_400_naming_id(
    client: httpx.AsyncClient, accepted: Accepted, changes: dict[str, object]
) -> None:
    response = await post(client, **changes)
    assert (response.status_code, response.json()["error"]["field"]) == (400, "id")


@pytest.mark.parametrize("ce_id", ["e%001", "e%0D%0A1", "i" * 200], ids=["NUL", "CRLF", "200 characters"])
async def test_invalid_binary_id_is_400_naming_id(client: httpx.AsyncClient, ce_id: str) -> None:
    response = await client.post("/events/orders.placed", content=b"{}", headers={**BINARY, "ce-id": ce_id})
    assert (response.status_code, response.json()["error"]["field"]) == (400, "id")


# Idempotency-Key.

WITHOUT_ID = {k: v for k, v in BINARY.items() if k != "ce-id"}


async def test_idempotency_key_without_ce_id_becomes_the_event_id(
    client: httpx.AsyncClient, accepted: Accepted
) -> None:
    headers = {**WITHOUT_ID, "idempotency-key": "k-1"}
    response = await client.post("/events/orders.placed", content=b"{}", headers=headers)
    assert (response.status_code, accepted.events[0][1].id) == (202, "k-1")


async def test_quoted_idempotency_key_is_unquoted(client: httpx.AsyncClient, accepted: Accepted) -> None:
    headers = {**WITHOUT_ID, "idempotency-key": '"k-2"'}
    await client.post("/events/orders.placed", content=b"{}", headers=headers)
    assert accepted.events[0][1].id == "k-2"


async def test_idempotency_key_retry_is_accepted_once(client: httpx.AsyncClient, accepted: Accepted) -> None:
    headers = {**WITHOUT_ID, "idempotency-key": "k-3"}
    for _ in range(2):
        await client.post("/events/orders.placed", content=b"{}", headers=headers)
    assert len(accepted.events) == 1


async def test_idempotency_key_equal_to_ce_id_is_accepted(client: httpx.AsyncClient) -> None:
    headers = {**BINARY, "idempotency-key": BINARY["ce-id"]}
    response = await client.post("/events/orders.placed", content=b"{}", headers=headers)
    assert response.status_code == 202


async def test_idempotency_key_differing_from_ce_id_is_400(client: httpx.AsyncClient, accepted: Accepted) -> None:
    headers = {**BINARY, "idempotency-key": "other"}
    response = await client.post("/events/orders.placed", content=b"{}", headers=headers)
    assert (response.status_code, response.json()["error"]["field"]) == (400, "Idempotency-Key")


async def test_idempotency_key_differing_from_structured_id_is_400(client: httpx.AsyncClient) -> None:
    headers = {**STRUCTURED, "idempotency-key": "other"}
    response = await client.post("/events/orders.placed", content=orjson.dumps(EVENT), headers=headers)
    assert (response.status_code, response.json()["error"]["field"]) == (400, "Idempotency-Key")


@pytest.mark.parametrize("key", ["k" * 129, "k\x01", '""'], ids=["129 characters", "control", "empty"])
async def test_invalid_idempotency_key_is_400(client: httpx.AsyncClient, accepted: Accepted, key: str) -> None:
    headers = {**WITHOUT_ID, "idempotency-key": key}
    response = await client.post("/events/orders.placed", content=b"{}", headers=headers)
    assert (response.status_code, response.json()["error"]["field"]) == (400, "Idempotency-Key")


# Store failures and authentication.


async def refuse_with_driver_text(topic: str, event: envelope.Envelope) -> http.Outcome:
    raise errors.StoreError('database error: (asyncpg) relation "outbox" password=hunter2')


async def test_store_error_is_503_without_the_driver_text() -> None:
    app = http.create_app([], http.IngestConfig(accept=refuse_with_driver_text, max_bytes=4096))
    async with await client_for(app) as c:
        response = await c.post("/events/orders.placed", content=orjson.dumps(EVENT), headers=STRUCTURED)
    assert (response.status_code, b"asyncpg" in response.content) == (503, False)


async def test_store_error_is_503_with_retry_after() -> None:
    app = http.create_app([], http.IngestConfig(accept=refuse_with_driver_text, max_bytes=4096))
    async with await client_for(app) as c:
        response = await c.post("/events/orders.placed", content=orjson.dumps(EVENT), headers=STRUCTURED)
    assert response.headers["retry-after"].isdigit()


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
async def test_bearer_scheme_is_case_insensitive(client: httpx.AsyncClient, scheme: str) -> None:
    response = await client.post(
        "/events/orders.placed",
        content=orjson.dumps(EVENT),
        headers={**STRUCTURED, "authorization": f"{scheme} s3cret"},
    )
    assert response.status_code == 202


@pytest.mark.parametrize("value", ["bearer nope", "Basic s3cret", "s3cret", "bearer", "bearer s3cret2"])
async def test_wrong_authorization_is_401(client: httpx.AsyncClient, value: str) -> None:
    response = await client.post(
        "/events/orders.placed", content=orjson.dumps(EVENT), headers={**STRUCTURED, "authorization": value}
    )
    assert response.status_code == 401


# Data arrives byte for byte.


async def test_binary_data_with_a_400_digit_number_is_accepted(client: httpx.AsyncClient) -> None:
    response = await client.post("/events/orders.placed", content=b"[" + b"9" * 400 + b"]", headers=BINARY)
    assert response.status_code == 202


async def test_structured_30_digit_integer_reaches_accept_exactly(
    client: httpx.AsyncClient, accepted: Accepted
) -> None:
    body = b'{"specversion":"1.0","id":"e-9","source":"shop","type":"t","data":{"n": 123456789012345678901234567890}}'
    await client.post("/events/orders.placed", content=body, headers=STRUCTURED)
    assert accepted.events[0][1].data == b'{"n": 123456789012345678901234567890}'


COMMIT_VARIABLES = ("CONVEYOR_GIT_SHA", "SOURCE_COMMIT")


def _git(cwd: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=30)
    return done.stdout.strip()


@pytest.fixture
def checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A git repository with one commit, in a directory with no commit named in the environment."""
    for name in COMMIT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    repo = tmp_path / "repo"
    (repo / "app").mkdir(parents=True)
    (repo / "app" / "handlers.py").write_text("")
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "add", ".")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "first")
    return repo


def test_version_in_a_git_checkout_names_its_commit(checkout: Path) -> None:
    found = runtime_app.version_info(settings.Settings(app_dir=str(checkout / "app")))
    assert found["git_sha"] == _git(checkout, "rev-parse", "HEAD")


def test_version_in_a_linked_worktree_with_packed_refs_names_its_commit(checkout: Path) -> None:
    _git(checkout, "worktree", "add", "-q", "-b", "other", str(checkout.parent / "linked"))
    _git(checkout, "pack-refs", "--all")  # the branch is now only in packed-refs, of the main repository
    linked = checkout.parent / "linked"
    assert (linked / ".git").is_file()
    found = runtime_app.version_info(settings.Settings(app_dir=str(linked / "app")))
    assert found["git_sha"] == _git(linked, "rev-parse", "HEAD")


def test_version_with_a_detached_head_names_its_commit(checkout: Path) -> None:
    sha = _git(checkout, "rev-parse", "HEAD")
    _git(checkout, "checkout", "-q", "--detach")
    assert runtime_app.version_info(settings.Settings(app_dir=str(checkout)))["git_sha"] == sha


@pytest.mark.parametrize("variable", ["CONVEYOR_GIT_SHA", "SOURCE_COMMIT"])
def test_version_of_a_deployed_image_names_the_commit_of_the_environment(
    checkout: Path, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    monkeypatch.setenv(variable, "0123abc")
    assert runtime_app.version_info(settings.Settings(app_dir=str(checkout)))["git_sha"] == "0123abc"


def test_version_outside_a_checkout_names_no_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in COMMIT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert runtime_app.version_info(settings.Settings(app_dir=str(tmp_path)))["git_sha"] is None
