"""The application's AsyncAPI 3.0.0 document (``conveyor docs``, ``GET /asyncapi.json``).

Built from a :class:`~conveyor.registry.Registry` alone: no broker or database
is contacted. Every topic becomes a channel (a handler's topic, its dead-letter
topic ``<topic>.dlq``, a cron job's ``schedules.<name>``, a saga's
``sagas.<name>`` and the topics of its commands and undos); every handler a
``receive`` operation; every saga command and undo a ``send`` operation. A
message's payload is the JSON Schema of the handler's payload annotation (or of
the saga step's return annotation); the schemas of nested pydantic models are
hoisted to ``components.schemas`` so every ``$ref`` resolves in the document.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import typing
from collections.abc import Callable
from typing import Any

import orjson
import pydantic

from conveyor import envelope, errors, registry, settings
from conveyor.sagas import definition as saga_definition
from conveyor.scheduling import schedules as scheduling

VERSION = "3.0.0"
SERVER = "broker"
_COMPONENT = "#/components/"
_PROTOCOLS = {"kafka": "kafka", "amqp": "amqp", "amqps": "amqps", "nats": "nats", "memory": "memory"}
_CLOUDEVENTS = (
    "A CloudEvent (CloudEvents 1.0) whose `data` is the payload below: binary mode (attributes in broker "
    "headers: `ce_*` on Kafka, `cloudEvents_*` on RabbitMQ, `ce-*` on NATS) or structured mode "
    "(`application/cloudevents+json` body). The ordering key is the `partitionkey` extension."
)
_WIRE = (
    "Wire names: Kafka topic `{0}`; RabbitMQ routing key `{0}` on the topic exchange `conveyor`; "
    "NATS JetStream subject `conveyor.{0}` in stream `CONVEYOR`."
)
_JOB_PAYLOAD: dict[str, Any] = {
    "type": "object",
    "properties": {
        "schedule": {"type": "string"},
        "fire_time": {"type": "string", "format": "date-time"},
        "run_id": {"type": "integer"},
        "trigger": {"type": "string"},
    },
    "required": ["schedule", "fire_time", "run_id", "trigger"],
}


def document(found: registry.Registry, config: settings.Settings) -> dict[str, Any]:
    """The AsyncAPI 3.0.0 document of an application.

    Args:
        found: the application's handlers, schedules and sagas.
        config: the service's settings (its name and broker URL are used).

    Returns:
        A JSON-serialisable ``dict``; every ``$ref`` in it points inside it.
    """
    builder = _Builder(config.broker_url.partition("://")[0])
    starts = {f"{saga.topic}.start": schema_of(saga.state) for saga in found.sagas}  # start_on handlers
    for handler in found.handlers:
        payload = starts[handler.name] if handler.name in starts else _handler_payload(handler)
        builder.receive(handler.name, handler.topic, payload, f"Handled by `{handler.where}`.")
    for schedule in found.schedules:
        builder.receive(schedule.topic, schedule.topic, _JOB_PAYLOAD, _job_summary(schedule))
    for saga in found.sagas:
        _add_saga(builder, saga)
        _add_replies(builder, saga, found.handlers)
    publishers = [(h.name, h) for h in found.handlers] + [(s.topic, s) for s in found.schedules]
    for name, publisher in publishers:
        for topic, payload in publisher.publishes:
            summary = f"Published by `{publisher.where}`."
            key = builder.message(f"publish.{name}.{topic}", _declared(payload), summary)
            builder.send(f"send.{name}.{topic}", topic, key, summary, "Topic this service publishes to.")
    return {
        "asyncapi": VERSION,
        "info": {
            "title": config.service,
            "version": _package_version(),
            "description": (
                f"Messages the Conveyor service `{config.service}` consumes and sends: event handlers, "
                "cron jobs and sagas. Each message is a CloudEvent; a message that fails all its attempts "
                "is dead-lettered to `<topic>.dlq`."
            ),
        },
        "defaultContentType": envelope.JSON,
        "servers": {SERVER: server(config.broker_url)},
        "channels": builder.channels,
        "operations": builder.operations,
        "components": {"messages": builder.messages, "schemas": builder.schemas},
    }


def render(doc: dict[str, Any], output: str = "json") -> str:
    """The document as indented JSON or YAML text.

    Raises:
        ConfigurationError: ``output`` is neither ``json`` nor ``yaml``, or ``yaml``
            without PyYAML installed.
    """
    if output == "json":
        return orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode()
    if output == "yaml":
        try:
            import yaml
        except ImportError:
            raise errors.ConfigurationError(
                "--format yaml needs PyYAML (pip install pyyaml); or use --format json"
            ) from None
        text: str = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
        return text
    raise errors.ConfigurationError(f"unknown document format {output!r}: use json or yaml")


def server(url: str) -> dict[str, Any]:
    """The AsyncAPI server object of a broker URL, without credentials or query options."""
    scheme, _, rest = url.partition("://")
    rest = rest.split("?", 1)[0].split("#", 1)[0].rsplit("@", 1)[-1]
    host, slash, path = rest.partition("/")
    found: dict[str, Any] = {
        "host": host or "in-process",
        "protocol": _PROTOCOLS.get(scheme, scheme),
        "description": "The service's broker (CONVEYOR_BROKER_URL), credentials removed.",
    }
    if slash and path:
        found["pathname"] = "/" + path
    return found


def channel_bindings(scheme: str, topic: str) -> dict[str, Any]:
    """The AsyncAPI channel bindings of a topic on a broker: where its messages are on the wire.

    RabbitMQ: a routing key on the durable topic exchange ``conveyor``; Kafka:
    the topic of the same name. NATS has no JetStream binding in AsyncAPI 3.0
    (the channel description names the subject and stream).
    """
    if scheme in ("amqp", "amqps"):
        exchange = {"name": "conveyor", "type": "topic", "durable": True, "autoDelete": False, "vhost": "/"}
        return {"amqp": {"is": "routingKey", "exchange": exchange, "bindingVersion": "0.3.0"}}
    if scheme == "kafka":
        return {"kafka": {"topic": topic, "bindingVersion": "0.5.0"}}
    return {}


class _Builder:
    """Accumulates channels, operations, messages and schemas with unique keys."""

    def __init__(self, scheme: str = "memory") -> None:
        self.scheme = scheme
        self.channels: dict[str, Any] = {}
        self.operations: dict[str, Any] = {}
        self.messages: dict[str, Any] = {}
        self.schemas: dict[str, Any] = {}

    def channel(self, topic: str, description: str) -> dict[str, Any]:
        existing: dict[str, Any] | None = self.channels.get(topic)
        if existing is None:
            existing = {
                "address": topic,
                "title": topic,
                "description": f"{description} {_WIRE.format(topic)}",
                "messages": {},
            }
            if bindings := channel_bindings(self.scheme, topic):
                existing["bindings"] = bindings
            self.channels[topic] = existing
        return existing

    def message(self, key: str, payload: dict[str, Any], summary: str) -> str:
        self.messages[key] = {
            "name": key,
            "title": key,
            "summary": summary,
            "description": _CLOUDEVENTS,
            "contentType": envelope.JSON,
            "payload": self._hoisted(payload),
        }
        return key

    def receive(self, name: str, topic: str, payload: dict[str, Any], summary: str) -> None:
        key = self.message(name, payload, summary)
        self._attach(self.channel(topic, "Topic consumed by this service."), key)
        dead = f"{topic}.dlq"
        self._attach(self.channel(dead, f"Dead letters of `{topic}` (`conveyor dlq`)."), key)
        self.operations[f"receive.{name}"] = {
            "action": "receive",
            "channel": {"$ref": _channel_ref(topic)},
            "summary": summary,
            "messages": [{"$ref": f"{_channel_ref(topic)}/messages/{_escape(key)}"}],
        }
        if self.scheme == "kafka":  # the consumer group is the handler name
            group = {"type": "string", "enum": [name]}
            self.operations[f"receive.{name}"]["bindings"] = {"kafka": {"groupId": group, "bindingVersion": "0.5.0"}}

    def send(
        self, operation: str, topic: str, key: str, summary: str, about: str = "Topic this service sends commands to."
    ) -> None:
        self._attach(self.channel(topic, about), key)
        self.operations[operation] = {
            "action": "send",
            "channel": {"$ref": _channel_ref(topic)},
            "summary": summary,
            "messages": [{"$ref": f"{_channel_ref(topic)}/messages/{_escape(key)}"}],
        }

    def _attach(self, channel: dict[str, Any], key: str) -> None:
        channel["messages"][key] = {"$ref": f"{_COMPONENT}messages/{_escape(key)}"}

    def _hoisted(self, schema: dict[str, Any]) -> dict[str, Any]:
        """``schema`` without its ``$defs``, which join ``components.schemas``."""
        schema = dict(schema)
        self.schemas.update(schema.pop("$defs", {}))
        return schema


def _add_saga(builder: _Builder, saga: saga_definition.Saga[Any]) -> None:
    for step in saga.steps:
        if step.send is not None:
            summary = f"Command of step `{step.name}` of saga `{saga.name}`."
            key = builder.message(f"command.{saga.name}.{step.name}", _returned(step.build), summary)
            builder.send(f"send.{key}", step.send, key, f"Saga `{saga.name}` sends step `{step.name}`'s command.")
        if step.undo_topic is not None:
            key = builder.message(
                f"undo.{saga.name}.{step.name}",
                _returned(step.undo_build or step.build),
                f"Undo of step `{step.name}` of saga `{saga.name}`.",
            )
            builder.send(f"send.{key}", step.undo_topic, key, f"Saga `{saga.name}` undoes step `{step.name}`.")


def _add_replies(builder: _Builder, saga: saga_definition.Saga[Any], handlers: list[registry.Handler]) -> None:
    """The replies the saga's participants send (``ctx.reply``) to the saga's topic."""
    replied: dict[str, Any] = {}  # topic -> the reply's payload type (None: unknown)
    for step in saga.steps:
        if step.send is not None:
            replied[step.send] = _reply_annotation(step.on_reply)
        if step.undo_topic is not None:
            replied.setdefault(step.undo_topic, None)
    for handler in handlers:
        if handler.topic not in replied:
            continue
        summary = f"Reply of `{handler.where}` to saga `{saga.name}` (`ctx.reply`)."
        key = builder.message(f"reply.{handler.name}.{saga.name}", _declared(replied[handler.topic]), summary)
        builder.send(f"send.{handler.name}.{saga.topic}", saga.topic, key, summary)


def _reply_annotation(on_reply: Callable[..., Any] | None) -> Any:
    """The type of the reply an ``@step.replied`` function takes (its second parameter), or ``None``."""
    if on_reply is None:
        return None
    try:
        hints = typing.get_type_hints(on_reply)
        names = [name for name in inspect.signature(on_reply).parameters if name != "return"]
    except Exception:  # an unresolvable annotation only makes the document vaguer
        return None
    return hints.get(names[1]) if len(names) == 2 else None


def _declared(payload: Any) -> dict[str, Any]:
    """The schema of a declared payload type; ``{}`` (any) when none was declared."""
    return {} if payload is None else schema_of(payload)


def _handler_payload(handler: registry.Handler) -> dict[str, Any]:
    try:
        annotation, _ = registry._payload_annotation(handler.func, handler.where)
    except errors.ConfigurationError:
        return {}
    return schema_of(annotation)


def _returned(build: Callable[..., Any] | None) -> dict[str, Any]:
    """The schema of what a saga step's builder returns (``{}`` when not annotated)."""
    if build is None:
        return {}
    try:
        annotation = typing.get_type_hints(build).get("return")
    except Exception:  # an unresolvable annotation only makes the document vaguer
        return {}
    return {} if annotation is None else schema_of(annotation)


def schema_of(annotation: Any) -> dict[str, Any]:
    """The JSON Schema of a payload annotation; nested models are ``#/components/schemas/...`` references.

    ``bytes`` and :class:`~conveyor.envelope.Envelope` (any data) give ``{}``;
    ``str`` gives a string; a type pydantic cannot describe gives ``{}``.
    """
    if annotation is bytes or annotation is envelope.Envelope or annotation is Any:
        return {}
    if annotation is str:
        return {"type": "string"}
    template = _COMPONENT + "schemas/{model}"
    try:
        if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
            return annotation.model_json_schema(ref_template=template)
        adapter: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(annotation)
        return adapter.json_schema(ref_template=template)
    except pydantic.PydanticUserError:  # a type with no JSON Schema only makes the document vaguer
        return {}


def _job_summary(schedule: scheduling.Schedule) -> str:
    return f"Job of the schedule `{schedule.name}` ({schedule.expression}), run by `{schedule.where}`."


def _channel_ref(topic: str) -> str:
    return f"#/channels/{_escape(topic)}"


def _escape(key: str) -> str:
    """A JSON Pointer reference token (RFC 6901)."""
    return key.replace("~", "~0").replace("/", "~1")


def _package_version() -> str:
    try:
        return importlib.metadata.version("conveyor")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"
