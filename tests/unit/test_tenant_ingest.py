"""Tenants: validated like every identifier, stamped from per-tenant ingest tokens, scoping ids."""

from collections.abc import AsyncIterator

import httpx
import orjson
import pytest
from conveyor import envelope, errors, settings
from conveyor.runtime import http
from test_http import EVENT, STRUCTURED, Accepted, client_for


@pytest.mark.parametrize("tenant", ["*", ">", "a.b", "a b", "A", "", "x" * 65, "a/b"])
def test_a_tenant_that_could_widen_a_subject_or_an_id_is_invalid(tenant: str) -> None:
    wire = envelope.to_structured(envelope.create("t", {}, source="s"))
    body = {**orjson.loads(wire.body), "tenant": tenant}
    with pytest.raises(errors.InvalidMessage) as caught:
        envelope.decode(envelope.WireMessage(orjson.dumps(body), wire.headers))
    assert caught.value.field == "tenant"


def test_a_tenant_scopes_the_id_that_deduplicates() -> None:
    plain = envelope.create("t", {}, source="s")
    tenanted = envelope.create("t", {}, source="s", extensions={"tenant": "acme"})
    assert (plain.scoped_id, plain.tenant) == (plain.id, None)
    assert (tenanted.scoped_id, tenanted.tenant) == (f"acme/{tenanted.id}", "acme")
    assert envelope.to_binary(tenanted, "ce-").message_id == f"acme/{tenanted.id}"


@pytest.mark.parametrize(
    ("tenant", "event_id"), [("acme", "42"), ("acme", "a/b"), ("a", "b/c")], ids=["plain", "slash", "nested"]
)
def test_an_untenanted_id_never_scopes_like_a_tenants_id(tenant: str, event_id: str) -> None:
    tenanted = envelope.create("t", {}, source="s", extensions={"tenant": tenant}).evolve(id=event_id)
    untenanted = envelope.create("t", {}, source="s").evolve(id=f"{tenant}/{event_id}")
    assert untenanted.scoped_id != tenanted.scoped_id


def test_an_untenanted_id_without_a_slash_is_its_own_scoped_id() -> None:
    event = envelope.create("t", {}, source="s").evolve(id="order-42")
    assert event.scoped_id == "order-42"  # the common case keeps its id, as stored by earlier versions


def test_settings_refuse_an_invalid_tenant_in_ingest_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_INGEST_TOKENS", '{"tok": "acme.*"}')
    with pytest.raises(errors.ConfigurationError, match="invalid tenant"):
        settings.load()
    monkeypatch.setenv("CONVEYOR_INGEST_TOKENS", '{"tok-a": "acme", "tok-b": "globex"}')
    assert settings.load().ingest_tokens == {"tok-a": "acme", "tok-b": "globex"}
    assert "tok-a" not in repr(settings.load())


@pytest.fixture
async def client() -> AsyncIterator[tuple[httpx.AsyncClient, Accepted]]:
    accepted = Accepted()
    config = http.IngestConfig(accept=accepted, max_bytes=4096, tenants={"tok-a": "acme", "tok-b": "globex"})
    async with await client_for(http.create_app([], config)) as c:
        yield c, accepted


async def post(c: httpx.AsyncClient, token: str | None, event: dict[str, object]) -> httpx.Response:
    headers = {**STRUCTURED, **({"authorization": f"Bearer {token}"} if token else {})}
    return await c.post("/events/orders.placed", content=orjson.dumps(event), headers=headers)


async def test_an_event_posted_with_a_tenant_token_belongs_to_that_tenant(
    client: tuple[httpx.AsyncClient, Accepted],
) -> None:
    c, accepted = client
    assert (await post(c, "tok-a", EVENT)).status_code == 202
    assert accepted.events[0][1].tenant == "acme"


async def test_a_token_for_tenant_a_cannot_post_as_tenant_b(client: tuple[httpx.AsyncClient, Accepted]) -> None:
    c, accepted = client
    response = await post(c, "tok-a", {**EVENT, "tenant": "globex"})
    assert (response.status_code, response.json()["error"]["code"], response.json()["error"]["field"]) == (
        403, "forbidden", "tenant",
    )  # fmt: skip
    assert accepted.events == []


@pytest.mark.parametrize("tenant", ["*", ">"])
async def test_a_wildcard_tenant_is_400_and_never_accepted(
    client: tuple[httpx.AsyncClient, Accepted], tenant: str
) -> None:
    c, accepted = client
    response = await post(c, "tok-b", {**EVENT, "tenant": tenant})
    assert (response.status_code, response.json()["error"]["field"]) == (400, "tenant")
    assert accepted.events == []


async def test_without_a_known_token_nothing_is_accepted(client: tuple[httpx.AsyncClient, Accepted]) -> None:
    c, accepted = client
    assert (await post(c, None, EVENT)).status_code == 401
    assert (await post(c, "tok-c", EVENT)).status_code == 401
    assert accepted.events == []
