"""HTTP: health, readiness, metrics, and CloudEvents ingest, on Starlette served by uvicorn.

* ``GET /healthz``: the process is alive.
* ``GET /readyz``: each dependency (broker, database, subscriptions) is checked;
  ``healthy`` (200), ``degraded`` (200, a non-critical check failed) or
  ``unhealthy`` (503), with per-check details.
* ``GET /metrics``: Prometheus text format.
* ``GET /version``: the package version, the git commit if known
  (``CONVEYOR_GIT_SHA``), and the broker and database kinds.
* ``GET /scaling`` (only in processes with a worker): per handler, its
  topic, capacity (concurrency), in-flight messages and the broker's backlog
  and oldest message age, as last read (see :mod:`conveyor.runtime.scaling`).
* ``GET /asyncapi.json``, ``GET /docs``: the application's AsyncAPI document (see :mod:`conveyor.runtime.docs`).
* ``POST /events/{topic}`` (only where ingest is enabled): a CloudEvent in the
  HTTP binding's structured (``application/cloudevents+json``) or binary
  (``ce-*`` headers) mode, or a plain ``application/json`` body, which becomes
  the data of a new event (``type`` the topic, ``source`` ``conveyor:http``, id
  from ``Idempotency-Key`` or a new UUID); 202 once the event is accepted
  durably, 400 with a JSON body naming the field for an invalid event, 401
  without the configured bearer token, 413 over the size limit, 415 for other
  media types, 503 with ``Retry-After`` when it cannot be stored now.

Ingest is idempotent by event id, so a client retries safely: the same event
posted again (same id, topic and source) answers 202 with the same body and is
stored once; the id reused by another event (other topic or source) answers
409 naming ``id``. A binary-mode post without ``ce-id`` takes its id from the
``Idempotency-Key`` header; a key that differs from the event's id is a 400.
Ingest takes an ``X-Request-Id`` (1-200 printable characters; one is
generated when absent), echoes it in the response, and makes it the event's
correlation id when the event has none.

Every error, of every route, is one JSON shape: ``{"error": {"code": ...,
"message": ..., "field": ...}}`` (``field`` names the offending input, or is
null). Error bodies never carry database or driver text: that goes to the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import re
import socket
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

import prometheus_client
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from conveyor import envelope, errors, names, persistence
from conveyor.runtime import docs as api_docs

log = logging.getLogger("conveyor.http")

HTTP_SOURCE = "conveyor:http"
"""The ``source`` of an event posted as a plain ``application/json`` body."""

Outcome = persistence.AddOutcome
"""What :data:`Accept` did with an event: ``added`` (stored now), ``duplicate`` (an
event with this id, topic and source was stored before; nothing changed) or
``conflict`` (the id is taken by an event of another topic or source)."""

Accept = Callable[[str, envelope.Envelope], Awaitable[Outcome]]
"""Takes an ingested event for a topic and returns once it is durably accepted.

It must be idempotent by event id (see :data:`Outcome`); it raises
:class:`~conveyor.errors.ConveyorError` (typically ``StoreError``) when the
event cannot be accepted now, which the client sees as a 503 to retry.
"""

_RETRY_AFTER_SECONDS = 5


@dataclass(frozen=True, slots=True)
class Check:
    """A readiness check.

    Attributes:
        name: shown in the ``/readyz`` body.
        probe: returns normally when healthy; raises with the reason otherwise.
        critical: a failing critical check makes the process unhealthy (503);
            a failing non-critical one only degraded.
    """

    name: str
    probe: Callable[[], Awaitable[None]]
    critical: bool = True


@dataclass(frozen=True, slots=True)
class IngestConfig:
    """How ``POST /events/{topic}`` behaves.

    Attributes:
        accept: takes the event (publishes it, or writes it to the outbox).
        max_bytes: largest request body accepted.
        token: bearer token required, if any.
        tenants: per-tenant bearer tokens (token -> tenant); an event posted
            with one is stamped with its tenant, and may not name another.
    """

    accept: Accept
    max_bytes: int
    token: str | None = None
    tenants: Mapping[str, str] = field(default_factory=dict)


Scaling = Callable[[], Mapping[str, Any]]
"""Returns the body of ``GET /scaling`` (see :mod:`conveyor.runtime.scaling`); must not block."""


def create_app(
    checks: Sequence[Check],
    ingest: IngestConfig | None = None,
    version: dict[str, str | None] | None = None,
    scaling: Scaling | None = None,
    registry: prometheus_client.CollectorRegistry | None = None,
    docs: Mapping[str, Any] | None = None,
) -> Starlette:
    """Build the ASGI application.

    Args:
        checks: the readiness checks.
        ingest: how ``POST /events/{topic}`` behaves; no such route without it.
        version: the body of ``GET /version``.
        scaling: the body of ``GET /scaling`` (processes with a worker); no such route without it.
        registry: what ``GET /metrics`` exports; this process's metrics (the default
            registry) without it. The ``--processes`` supervisor passes the children's aggregate.
        docs: the AsyncAPI document served at ``/asyncapi.json`` and ``/docs``; no such routes without it.
    """

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        results = await asyncio.gather(*(_run_check(check) for check in checks))
        failed_critical = any(not ok and check.critical for check, (ok, _) in zip(checks, results, strict=True))
        failed_any = any(not ok for ok, _ in results)
        status = "unhealthy" if failed_critical else "degraded" if failed_any else "healthy"
        body = {
            "status": status,
            "checks": {check.name: detail for check, (_, detail) in zip(checks, results, strict=True)},
        }
        return JSONResponse(body, status_code=503 if failed_critical else 200)

    async def metrics(request: Request) -> Response:
        body = prometheus_client.generate_latest(prometheus_client.REGISTRY if registry is None else registry)
        return Response(body, media_type=prometheus_client.CONTENT_TYPE_LATEST)

    async def version_info(request: Request) -> Response:
        return JSONResponse(version or {})

    async def scaling_info(request: Request) -> Response:
        assert scaling is not None
        try:
            return JSONResponse(dict(scaling()))
        except Exception:
            log.exception("GET /scaling failed")
            return _error(503, "the scaling figures are unavailable now; try again")

    async def http_error(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        codes = {404: "not_found", 405: "method_not_allowed"}
        message = exc.detail if isinstance(exc, HTTPException) else "internal error"
        response = _error(status, str(message), code=codes.get(status, "http_error"))
        if isinstance(exc, HTTPException) and exc.headers:
            response.headers.update(exc.headers)
        return response

    routes = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/version", version_info, methods=["GET"]),
    ]
    if ingest is not None:
        routes.append(Route("/events/{topic}", _ingest_endpoint(ingest), methods=["POST"]))
    if scaling is not None:
        routes.append(Route("/scaling", scaling_info, methods=["GET"]))
    if docs is not None:
        routes.extend(api_docs.routes(docs))
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})


async def _run_check(check: Check) -> tuple[bool, dict[str, Any]]:
    try:
        async with asyncio.timeout(5):
            await check.probe()
    except Exception as exc:
        return False, {"ok": False, "critical": check.critical, "error": str(exc) or type(exc).__name__}
    return True, {"ok": True, "critical": check.critical}


_CODES = {
    400: "invalid_event", 401: "unauthorized", 403: "forbidden", 409: "conflict", 413: "payload_too_large",
    415: "unsupported_media_type", 503: "unavailable",
}  # fmt: skip


def _error(status: int, message: str, field: str | None = None, *, code: str | None = None) -> JSONResponse:
    """The one error shape: ``{"error": {"code", "message", "field"}}``."""
    body = {"error": {"code": code or _CODES.get(status, "error"), "message": message, "field": field}}
    return JSONResponse(body, status_code=status)


def _unavailable(exc: errors.ConveyorError) -> Response:
    """503 with ``Retry-After``; the reason may quote the database or broker, so only the log gets it."""
    what = (
        "the event store is unavailable" if isinstance(exc, errors.StoreError) else "the event cannot be accepted now"
    )
    response = _error(503, f"{what}; try again")
    response.headers["retry-after"] = str(_RETRY_AFTER_SECONDS)
    return response


def _caller(header: str, token: bytes | None, tenants: Sequence[tuple[bytes, str]]) -> tuple[bool, str | None]:
    """Whether ``Bearer <credentials>`` is a known token, and the tenant it posts for.

    The scheme is case-insensitive (RFC 9110); every token is compared in constant time.
    """
    scheme, _, credentials = header.partition(" ")
    given = credentials.strip(" ").encode()
    known = token is not None and hmac.compare_digest(given, token)
    tenant = None
    for candidate, name in tenants:
        if hmac.compare_digest(given, candidate):
            known, tenant = True, name
    return known and scheme.lower() == "bearer", tenant


def _printable_id(value: str) -> bool:
    return 0 < len(value) <= 200 and value.isprintable() and value.isascii()


def _idempotency_key(value: str) -> str:
    """The key of an ``Idempotency-Key`` header, plain or a structured-field string (``"..."``)."""
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = re.sub(r'\\(["\\])', r"\1", value[1:-1])
    return envelope.check_id(value, "Idempotency-Key")


def _plain_event(topic: str, body: bytes, key: str | None) -> envelope.Envelope:
    """A new event whose data is a plain JSON body: id the idempotency key (else a new one), type the topic."""
    return envelope.Envelope(
        id=key or envelope.new_id(),
        source=HTTP_SOURCE,
        type=topic,
        data=body,
        time=datetime.now(UTC),
        datacontenttype=envelope.JSON,
    )


def _ingest_endpoint(config: IngestConfig) -> Callable[[Request], Awaitable[Response]]:
    token = config.token.encode() if config.token else None
    tenants = [(key.encode(), name) for key, name in config.tenants.items()]

    async def ingest(request: Request) -> Response:
        request_id = request.headers.get("x-request-id") or str(uuid.uuid4())
        response = await _ingest_one(request, request_id)
        response.headers["x-request-id"] = request_id if _printable_id(request_id) else "invalid"
        return response

    async def _ingest_one(request: Request, request_id: str) -> Response:
        if not _printable_id(request_id):
            return _error(400, "X-Request-Id must be 1-200 printable characters", "X-Request-Id")
        known, tenant = _caller(request.headers.get("authorization", ""), token, tenants)
        if (token is not None or tenants) and not known:
            response = _error(401, "missing or wrong bearer token")
            response.headers["www-authenticate"] = "Bearer"
            return response
        topic = request.path_params["topic"]
        try:
            names.check("topic", topic)
        except errors.ConfigurationError as exc:
            return _error(400, str(exc), "topic")
        # The HTTP binding percent-encodes attribute values in ce-* headers.
        headers = {k: unquote(v) if k.startswith("ce-") else v for k, v in request.headers.items()}
        headers = {k: v for k, v in headers.items() if k == "content-type" or k.startswith("ce-")}
        media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        binary = "ce-specversion" in headers or "ce-id" in headers
        plain = media == envelope.JSON and not binary
        if media != envelope.STRUCTURED and not binary and not plain:
            return _error(
                415,
                f"unsupported media type {media or '(none)'!r}: send application/cloudevents+json "
                "(structured mode), ce-* headers (binary mode) or application/json (the data of a new event)",
            )
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > config.max_bytes:
            return _error(413, f"body of {declared} bytes exceeds the limit of {config.max_bytes} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > config.max_bytes:
                return _error(413, f"body exceeds the limit of {config.max_bytes} bytes")
        try:
            key = request.headers.get("idempotency-key")
            if key is not None:
                key = _idempotency_key(key)
                if binary:
                    headers.setdefault("ce-id", key)
            if plain:
                event = _plain_event(topic, bytes(body), key)
            else:
                event = envelope.decode(envelope.WireMessage(bytes(body), headers))
            if envelope.is_json(event.datacontenttype):
                envelope.check_json(event.data)  # reject malformed JSON data now rather than at a handler
        except errors.InvalidMessage as exc:
            return _error(400, str(exc), exc.field)
        if key is not None and key != event.id:
            return _error(400, f"Idempotency-Key {key!r} differs from the event id {event.id!r}", "Idempotency-Key")
        if event.correlationid is None:
            event = event.evolve(correlationid=request_id)
        if tenant is not None:
            if event.tenant not in (None, tenant):
                return _error(403, f"this token posts for tenant {tenant!r}, not {event.tenant!r}", envelope.TENANT)
            event = event.evolve(extensions={**event.extensions, envelope.TENANT: tenant})
        try:
            outcome = await config.accept(topic, event)
        except errors.ConveyorError as exc:
            log.error("could not accept event %s for %s: %s", event.id, topic, exc)
            return _unavailable(exc)
        if outcome == "conflict":
            return _error(
                409, f"event id {event.id!r} is already used by an event of another topic or source; use a new id", "id"
            )
        return JSONResponse({"id": event.id, "topic": topic}, status_code=202)

    return ingest


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside our event loop; signals stay with the process runner."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpServer:
    """Serves an ASGI app on ``host:port`` until stopped.

    Args:
        app: the application.
        host: address to bind.
        port: port to bind (0 picks a free one; see :attr:`port` after start).
        graceful_timeout: seconds :meth:`stop` lets requests under way finish;
            connections still open then (a client that never sends its body)
            are closed.
    """

    def __init__(self, app: Starlette, host: str, port: int, graceful_timeout: float = 10.0) -> None:
        self._app = app
        self._host = host
        self.port = port
        self._graceful = graceful_timeout
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Bind and serve in the background.

        Raises:
            ConfigurationError: the address cannot be bound (in use, or not local).
        """
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self._host, self.port))
        except OSError as exc:
            sock.close()
            raise errors.ConfigurationError(
                f"cannot listen on {self._host}:{self.port} ({exc.strerror}); set CONVEYOR_HTTP_PORT "
                "or --port to a free port, or 0 to turn the HTTP server off"
            ) from exc
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self._app,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=max(1, math.ceil(self._graceful)),
        )
        self._server = _EmbeddedServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="http")
        while not self._server.started and not self._task.done():  # noqa: ASYNC110 - uvicorn offers no event
            await asyncio.sleep(0.01)
        if self._task.done():
            self._task.result()
        log.info("HTTP listening on http://%s:%d", self._host, self.port)

    async def stop(self) -> None:
        """Stop accepting requests; finish those under way for up to ``graceful_timeout`` seconds, then close."""
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            done, _ = await asyncio.wait([self._task], timeout=self._graceful + 1.0)
            if not done:  # uvicorn's own deadline did not end it: stop waiting for those clients
                self._server.force_exit = True
                self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
