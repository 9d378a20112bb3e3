"""``GET /asyncapi.json`` and ``GET /docs``: the application's AsyncAPI document, as JSON and as a page.

The page is rendered here, once, from the document (Jinja2, ``templates/docs.html``):
the service, its broker, every operation it receives and sends with its
channel and the fields of its message's payload, every schema, and the raw
JSON. It loads nothing from anywhere (no CDN, no script), so it reads offline,
behind a firewall and without JavaScript.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2
import markupsafe
import orjson
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

_TEMPLATES = Path(__file__).parent / "templates"
_SCHEMAS = "#/components/schemas/"


def routes(document: Mapping[str, Any]) -> list[Route]:
    """The two routes serving ``document`` (see :func:`conveyor.asyncapi.document`).

    Args:
        document: the AsyncAPI document, rendered once here.
    """
    body = orjson.dumps(document, option=orjson.OPT_INDENT_2)
    page = render(document, body.decode())

    async def asyncapi_json(request: Request) -> Response:
        return Response(body, media_type="application/json")

    async def docs_page(request: Request) -> Response:
        return HTMLResponse(page)

    return [Route("/asyncapi.json", asyncapi_json, methods=["GET"]), Route("/docs", docs_page, methods=["GET"])]


def render(document: Mapping[str, Any], raw: str) -> str:
    """The HTML page of an AsyncAPI 3 document (``raw``: its JSON text, shown at the end)."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(_TEMPLATES), autoescape=True, undefined=jinja2.ChainableUndefined
    )
    env.filters["type_of"] = type_of
    env.filters["anchor"] = anchor
    env.filters["inline"] = inline
    operations = []
    for key, operation in document.get("operations", {}).items():
        channel = _resolve(document, operation.get("channel", {}))
        messages = [_resolve(document, ref) for ref in operation.get("messages", [])]
        operations.append({"key": key, "operation": operation, "channel": channel, "messages": messages})
    return env.get_template("docs.html").render(
        doc=document,
        info=document.get("info", {}),
        receives=[entry for entry in operations if entry["operation"].get("action") == "receive"],
        sends=[entry for entry in operations if entry["operation"].get("action") == "send"],
        schemas=document.get("components", {}).get("schemas", {}),
        fields=fields,
        raw=raw,
    )


def fields(schema: Mapping[str, Any]) -> list[dict[str, Any]]:
    """An object schema's properties: name, type (words), required, description; ``[]`` for any other schema."""
    required = set(schema.get("required", []))
    return [
        {
            "name": name,
            "type": type_of(prop),
            "required": name in required,
            "description": prop.get("description", ""),
        }
        for name, prop in schema.get("properties", {}).items()
    ]


def type_of(schema: Any) -> str:
    """A JSON Schema in a few words: ``string``, ``array of Line``, ``integer | null``, ``any``."""
    if not isinstance(schema, Mapping) or not schema:
        return "any"
    if "$ref" in schema:
        return str(schema["$ref"]).removeprefix(_SCHEMAS)
    for combined in ("anyOf", "oneOf", "allOf"):
        if combined in schema:
            joiner = " & " if combined == "allOf" else " | "
            return joiner.join(type_of(part) for part in schema[combined])
    if "enum" in schema:
        return " | ".join(orjson.dumps(value).decode() for value in schema["enum"])
    kind = schema.get("type")
    if kind == "array":
        return f"array of {type_of(schema.get('items'))}"
    if isinstance(kind, list):
        return " | ".join(map(str, kind))
    words = str(kind or "any")
    if "format" in schema:
        words += f" ({schema['format']})"
    return words


def inline(text: str) -> markupsafe.Markup:
    """Text with its Markdown code spans (`` `x` ``) as ``<code>``, everything else escaped."""
    parts = str(text).split("`")
    if len(parts) % 2 == 0:  # an unpaired backtick: leave it as it is
        return markupsafe.escape(text)
    return markupsafe.Markup("").join(
        markupsafe.Markup("<code>{}</code>").format(part) if odd else markupsafe.escape(part)
        for odd, part in ((i % 2 == 1, part) for i, part in enumerate(parts))
    )


def anchor(name: str) -> str:
    """The HTML id of a schema's section."""
    return "schema-" + "".join(c if c.isalnum() or c in "-_." else "-" for c in name)


def _resolve(document: Mapping[str, Any], value: Any) -> Any:
    """Follow local ``$ref`` pointers (``#/a/b``) until a value that is not one."""
    seen = 0
    while isinstance(value, Mapping) and isinstance(value.get("$ref"), str) and seen < 16:
        target: Any = document
        for token in value["$ref"].removeprefix("#/").split("/"):
            target = target.get(token.replace("~1", "/").replace("~0", "~"), {}) if isinstance(target, Mapping) else {}
        value, seen = target, seen + 1
    return value
