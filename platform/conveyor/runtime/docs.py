"""``GET /asyncapi.json`` and ``GET /docs``: the application's AsyncAPI document, as JSON and as a page.

The page renders the document with the AsyncAPI React component's standalone
bundle from a CDN (pinned version) and carries the JSON in a ``<pre>`` too, so
it reads without JavaScript or network access.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

REACT_COMPONENT = "https://unpkg.com/@asyncapi/react-component@3.1.5"
"""The pinned AsyncAPI React component (standalone bundle, AsyncAPI 3 support) the page loads."""

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title} - AsyncAPI</title>
<link rel="stylesheet" href="{component}/styles/default.min.css">
</head>
<body>
<div id="asyncapi"></div>
<noscript><p>JavaScript is off: the AsyncAPI document follows as JSON
(also at <a href="asyncapi.json">asyncapi.json</a>).</p></noscript>
<details id="raw"><summary>AsyncAPI document (JSON)</summary>
<pre>{body}</pre>
</details>
<script src="{component}/browser/standalone/index.js"></script>
<script>
window.AsyncApiStandalone.render(
  {{schema: {{url: "asyncapi.json"}}, config: {{show: {{sidebar: true}}}}}},
  document.getElementById("asyncapi")
);
</script>
</body>
</html>
"""


def routes(document: Mapping[str, Any]) -> list[Route]:
    """The two routes serving ``document`` (see :func:`conveyor.asyncapi.document`).

    Args:
        document: the AsyncAPI document, rendered once here.
    """
    body = orjson.dumps(document, option=orjson.OPT_INDENT_2)
    title = str(document.get("info", {}).get("title", "conveyor"))
    page = _PAGE.format(title=html.escape(title), component=REACT_COMPONENT, body=html.escape(body.decode()))

    async def asyncapi_json(request: Request) -> Response:
        return Response(body, media_type="application/json")

    async def docs_page(request: Request) -> Response:
        return HTMLResponse(page)

    return [Route("/asyncapi.json", asyncapi_json, methods=["GET"]), Route("/docs", docs_page, methods=["GET"])]
