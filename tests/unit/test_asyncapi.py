"""The AsyncAPI 3.0.0 document: FastStream's AsyncAPI 3 models parse it, and structural checks from the spec hold."""

from __future__ import annotations

import html
import html.parser
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import orjson
import pytest
import yaml
from conveyor import asyncapi, registry, settings
from conveyor.runtime import http
from faststream.specification.asyncapi.v3_0_0.schema import ApplicationSchema
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    found = registry.discover(["handlers", "schedules"], str(ROOT))
    config = settings.Settings(service="shop", broker_url="amqp://user:secret@rabbit:5672/prod")
    return asyncapi.document(found, config)


def pointer(doc: dict[str, Any], ref: str) -> Any:
    """The value a local ``$ref`` (``#/a/b``) points to; KeyError if it dangles."""
    assert ref.startswith("#/"), ref
    value: Any = doc
    for token in ref[2:].split("/"):
        value = value[token.replace("~1", "/").replace("~0", "~")]
    return value


def refs(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        if isinstance(value.get("$ref"), str):
            yield value["$ref"]
        for item in value.values():
            yield from refs(item)
    elif isinstance(value, list):
        for item in value:
            yield from refs(item)


def resolved(doc: dict[str, Any], value: Any) -> Any:
    while isinstance(value, dict) and "$ref" in value:
        value = pointer(doc, value["$ref"])
    return value


def structural_problems(doc: dict[str, Any]) -> list[str]:
    """What the AsyncAPI 3.0.0 specification requires of the document's shape, as a list of violations."""
    problems = []
    if doc.get("asyncapi") != "3.0.0":
        problems.append("asyncapi is not 3.0.0")
    if not doc.get("info", {}).get("title") or not doc.get("info", {}).get("version"):
        problems.append("info.title or info.version missing")
    for ref in refs(doc):
        try:
            pointer(doc, ref)
        except (KeyError, TypeError):
            problems.append(f"dangling $ref {ref}")
    if problems:
        return problems
    channels = doc.get("channels", {})
    for name, operation in doc.get("operations", {}).items():
        if operation.get("action") not in ("send", "receive"):
            problems.append(f"operation {name}: action {operation.get('action')!r}")
        channel_ref = operation.get("channel", {}).get("$ref", "")
        if not channel_ref.startswith("#/channels/") or resolved(doc, operation["channel"]) not in channels.values():
            problems.append(f"operation {name}: channel {channel_ref!r} is not a channel")
        for message in operation.get("messages", []):
            if not message["$ref"].startswith(channel_ref + "/messages/"):
                problems.append(f"operation {name}: message {message['$ref']} is not one of its channel's")
    for name, channel in channels.items():
        if not channel.get("address"):
            problems.append(f"channel {name}: no address")
        for message in channel.get("messages", {}).values():
            if not message.get("$ref", "").startswith("#/components/messages/"):
                problems.append(f"channel {name}: message {message} is not in components.messages")
    for name, message in doc.get("components", {}).get("messages", {}).items():
        if "payload" not in message:
            problems.append(f"message {name}: no payload")
    return problems


def test_document_parses_as_asyncapi_3_with_faststream_models(document: dict[str, Any]) -> None:
    parsed = ApplicationSchema.model_validate(document)
    assert (parsed.asyncapi, parsed.info.title) == ("3.0.0", "shop")


SPECS_VERSION = "6.11.1"
"""``@asyncapi/specs``: the AsyncAPI Initiative's own JSON Schemas of the specification, from npm."""


@pytest.fixture(scope="module")
def official_schema() -> dict[str, Any]:
    """The official AsyncAPI 3.0.0 JSON Schema, installed with npm into ``.cache`` on first use.

    npm is part of the set-up of this machine and CI; a missing npm or registry fails here, never skips.
    """
    prefix = ROOT / ".cache" / f"asyncapi-specs-{SPECS_VERSION}"
    path = prefix / "node_modules" / "@asyncapi" / "specs" / "schemas" / "3.0.0-without-$id.json"
    if not path.exists():
        subprocess.run(
            ["npm", "install", "--no-save", "--no-audit", "--no-fund", "--silent", "--prefix", str(prefix),
             f"@asyncapi/specs@{SPECS_VERSION}"],
            check=True, timeout=300,
        )  # fmt: skip
    schema: dict[str, Any] = orjson.loads(path.read_bytes())
    return schema


@pytest.mark.parametrize(
    "broker_url", ["amqp://user:secret@rabbit:5672/prod", "nats://nats:4222", "kafka://k1:9092,k2:9092", "memory://"]
)
def test_document_validates_against_the_official_asyncapi_3_schema(
    official_schema: dict[str, Any], broker_url: str
) -> None:
    found = registry.discover(["handlers", "schedules"], str(ROOT))
    doc = asyncapi.document(found, settings.Settings(service="shop", broker_url=broker_url))
    problems = [
        f"{'/'.join(map(str, e.path))}: {e.message}"
        for e in jsonschema.Draft7Validator(official_schema).iter_errors(doc)
    ]
    assert problems == []
    assert {f"receive.{h.name}" for h in found.handlers} <= set(doc["operations"])


def test_the_official_schema_catches_a_broken_document(
    official_schema: dict[str, Any], document: dict[str, Any]
) -> None:
    broken = {**document, "operations": {"x": {"action": "publish", "channel": {"$ref": "#/channels/none"}}}}
    assert list(jsonschema.Draft7Validator(official_schema).iter_errors(broken))
    assert list(
        jsonschema.Draft7Validator(official_schema).iter_errors({k: v for k, v in document.items() if k != "info"})
    )
    found = registry.discover(["handlers", "schedules"], str(ROOT))
    rabbit = asyncapi.document(found, settings.Settings(service="shop", broker_url="amqp://rabbit/"))
    rabbit["channels"]["orders.placed"]["bindings"]["amqp"]["is"] = "nonsense"  # bindings are checked too
    assert list(jsonschema.Draft7Validator(official_schema).iter_errors(rabbit))


def test_document_passes_the_structural_checks(document: dict[str, Any]) -> None:
    assert structural_problems(document) == []


def test_structural_checks_catch_a_dangling_ref(document: dict[str, Any]) -> None:
    broken = orjson.loads(orjson.dumps(document))
    broken["channels"]["billing.charge"]["messages"]["billing.charge-order"]["$ref"] = "#/components/messages/nope"
    assert structural_problems(broken) == ["dangling $ref #/components/messages/nope"]


def test_structural_checks_catch_a_bad_action(document: dict[str, Any]) -> None:
    broken = orjson.loads(orjson.dumps(document))
    broken["operations"]["receive.billing.charge-order"]["action"] = "subscribe"
    assert structural_problems(broken) == ["operation receive.billing.charge-order: action 'subscribe'"]


def test_document_names_every_topic_dead_letter_job_and_saga_topic(document: dict[str, Any]) -> None:
    found = registry.discover(["handlers", "schedules"], str(ROOT))
    topics = {h.topic for h in found.handlers} | {"schedules.demo.place-order", "sagas.shop.checkout"}
    expected = topics | {f"{t}.dlq" for t in topics} | {"inventory.release", "billing.refund", "shipping.book"}
    assert expected <= set(document["channels"])


def test_saga_commands_are_send_operations_on_their_topics(document: dict[str, Any]) -> None:
    sends = {
        pointer(document, op["channel"]["$ref"])["address"]
        for key, op in document["operations"].items()
        if op["action"] == "send" and key.startswith(("send.command.", "send.undo."))
    }
    assert sends == {"inventory.reserve", "inventory.release", "billing.charge", "billing.refund", "shipping.book"}


def test_pydantic_payload_schema_is_the_message_payload(document: dict[str, Any]) -> None:
    payload = document["components"]["messages"]["billing.charge-order"]["payload"]
    assert (payload["title"], sorted(payload["properties"])) == ("ChargeCard", ["amount_cents", "customer", "order_id"])


def test_server_has_no_credentials(document: dict[str, Any]) -> None:
    assert document["servers"]["broker"] == {
        "host": "rabbit:5672",
        "protocol": "amqp",
        "pathname": "/prod",
        "description": document["servers"]["broker"]["description"],
    }
    assert b"secret" not in orjson.dumps(document)


class Line(BaseModel):
    sku: str


class Order(BaseModel):
    lines: list[Line]


@registry.on("orders.nested", name="test.nested")
async def take_order(order: Order) -> None:
    """A handler whose payload nests a model."""


def test_nested_models_are_hoisted_to_component_schemas() -> None:
    doc = asyncapi.document(registry.Registry.of(take_order), settings.Settings())
    payload = doc["components"]["messages"]["test.nested"]["payload"]
    assert pointer(doc, payload["properties"]["lines"]["items"]["$ref"])["title"] == "Line"
    assert structural_problems(doc) == []


def test_cli_docs_prints_yaml_that_parses_as_asyncapi_3() -> None:
    env = {"PATH": "/usr/bin:/bin", "CONVEYOR_APP": "handlers,schedules"}
    result = subprocess.run(
        [sys.executable, "-m", "conveyor.cli", "docs", "--format", "yaml"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert structural_problems(yaml.safe_load(result.stdout)) == []


async def test_http_serves_the_document_and_the_docs_page(document: dict[str, Any]) -> None:
    app = http.create_app([], docs=document)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        spec = await client.get("/asyncapi.json")
        page = await client.get("/docs")
    assert spec.json() == document
    assert page.headers["content-type"].startswith("text/html")
    assert '"asyncapi": "3.0.0"' in html.unescape(page.text)  # the raw document, in a <pre>


async def test_http_without_a_document_has_no_docs_routes() -> None:
    app = http.create_app([])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        assert (await client.get("/docs")).status_code == 404


def test_saga_command_payload_is_the_step_return_annotation(document: dict[str, Any]) -> None:
    messages = document["components"]["messages"]
    titles = [
        messages[key]["payload"].get("title") for key in ("command.shop.checkout.charge", "undo.shop.checkout.charge")
    ]
    assert titles == ["ChargeCard", "ChargeCard"]


def test_broker_bindings_name_the_wire_for_rabbitmq_and_kafka() -> None:
    found = registry.discover(["handlers", "schedules"], str(ROOT))
    rabbit = asyncapi.document(found, settings.Settings(service="shop", broker_url="amqp://rabbit:5672/"))
    channel = rabbit["channels"]["orders.placed"]["bindings"]["amqp"]
    assert (channel["is"], channel["exchange"]["name"], channel["exchange"]["type"]) == (
        "routingKey",
        "conveyor",
        "topic",
    )
    kafka = asyncapi.document(found, settings.Settings(service="shop", broker_url="kafka://k:9092"))
    assert kafka["channels"]["orders.placed"]["bindings"]["kafka"]["topic"] == "orders.placed"
    handler = found.handlers[0]
    binding = kafka["operations"][f"receive.{handler.name}"]["bindings"]["kafka"]
    assert binding["groupId"]["enum"] == [handler.name]
    nats = asyncapi.document(found, settings.Settings(service="shop", broker_url="nats://n:4222"))
    assert "bindings" not in nats["channels"]["orders.placed"]


def test_a_handlers_declared_publishes_are_its_send_operations(document: dict[str, Any]) -> None:
    operation = document["operations"]["send.shipping.create-shipment.shipments.created"]
    message = resolved(document, operation["messages"][0])
    assert (operation["action"], pointer(document, operation["channel"]["$ref"])["address"]) == (
        "send",
        "shipments.created",
    )
    assert message["payload"]["title"] == "ShipmentCreated"


def test_saga_participants_send_their_replies_to_the_saga(document: dict[str, Any]) -> None:
    replies = {
        key: pointer(document, op["channel"]["$ref"])["address"]
        for key, op in document["operations"].items()
        if key.startswith("send.") and key.endswith(".sagas.shop.checkout")
    }
    assert replies == {
        "send.inventory.reserve-stock.sagas.shop.checkout": "sagas.shop.checkout",
        "send.inventory.release-stock.sagas.shop.checkout": "sagas.shop.checkout",
        "send.billing.charge-order.sagas.shop.checkout": "sagas.shop.checkout",
        "send.billing.refund-order.sagas.shop.checkout": "sagas.shop.checkout",
        "send.shipping.create-shipment.sagas.shop.checkout": "sagas.shop.checkout",
    }


class _Page(html.parser.HTMLParser):
    """What a page loads (every src and stylesheet href) and its text outside <pre>."""

    def __init__(self) -> None:
        super().__init__()
        self.loads: list[str] = []
        self.text: list[str] = []
        self._pre = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if found.get("src"):
            self.loads.append(str(found["src"]))
        if tag == "link" and found.get("href"):
            self.loads.append(str(found["href"]))
        self._pre += tag == "pre"

    def handle_endtag(self, tag: str) -> None:
        self._pre -= tag == "pre"

    def handle_data(self, data: str) -> None:
        if not self._pre:
            self.text.append(data)


async def docs_page(document: dict[str, Any]) -> _Page:
    app = http.create_app([], docs=document)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        response = await client.get("/docs")
    parsed = _Page()
    parsed.feed(response.text)
    return parsed


async def test_docs_page_loads_nothing_from_another_site(document: dict[str, Any]) -> None:
    page = await docs_page(document)
    assert [url for url in page.loads if "//" in url or url.startswith(("http:", "https:"))] == []


async def test_docs_page_renders_every_operation_and_payload_field_as_html(document: dict[str, Any]) -> None:
    text = " ".join((await docs_page(document)).text)
    assert all(key in text for key in document["operations"])
    assert all(field in text for field in ("amount_cents", "tracking_number", "ShipmentCreated"))


def test_a_schedules_declared_publishes_are_its_send_operations(document: dict[str, Any]) -> None:
    operation = document["operations"]["send.schedules.demo.place-order.orders.placed"]
    assert pointer(document, operation["channel"]["$ref"])["address"] == "orders.placed"
    assert resolved(document, operation["messages"][0])["payload"]["title"] == "OrderPlaced"
