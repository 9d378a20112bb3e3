"""``POST /events/{topic}``: CloudEvents (and plain JSON) ingest over HTTP, and the one HTTP error shape.

The route takes a CloudEvent in the HTTP binding's structured
(``application/cloudevents+json``) or binary (``ce-*`` headers) mode, or a
plain ``application/json`` body, which becomes the data of a new event
(``type`` the topic, ``source`` ``conveyor:http``, id from ``Idempotency-Key``
or a new UUID); 202 once the event is accepted durably, 400 with a JSON body
naming the field for an invalid event, 401 without a configured bearer token,
403 for another tenant than the token's, 413 over the size limit, 415 for
other media types, 503 with ``Retry-After`` when it cannot be stored now.

Ingest is idempotent by event id, so a client retries safely: the same event
posted again (same id, topic and source) answers 202 with the same body and is
stored once; the id reused by another event (other topic or source) answers
409 naming ``id``. A binary-mode post without ``ce-id`` takes its id from the
``Idempotency-Key`` header; a key that differs from the event's id is a 400.
Ingest takes an ``X-Request-Id`` (1-200 printable characters; one is
generated when absent), echoes it in the response, and makes it the event's
correlation id when the event has none.

Every error, of every route, is one JSON shape (:func:`error_response`):
``{"error": {"code": ..., "message": ..., "field": ...}}`` (``field`` names the
offending input, or is null). Error bodies never carry database or driver text:
that goes to the log.
"""

from __future__ import annotations

import hmac
import logging
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import unquote

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from conveyor import attributes, envelope, errors, names, persistence

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


_CODES = {
    400: "invalid_event", 401: "unauthorized", 403: "forbidden", 409: "conflict", 413: "payload_too_large",
    415: "unsupported_media_type", 503: "unavailable",
}  # fmt: skip


def error_response(status: int, message: str, field: str | None = None, *, code: str | None = None) -> JSONResponse:
    """The one error shape of every HTTP route: ``{"error": {"code", "message", "field"}}``."""
    body = {"error": {"code": code or _CODES.get(status, "error"), "message": message, "field": field}}
    return JSONResponse(body, status_code=status)


def _unavailable(exc: errors.ConveyorError) -> Response:
    """503 with ``Retry-After``; the reason may quote the database or broker, so only the log gets it."""
    what = (
        "the event store is unavailable" if isinstance(exc, errors.StoreError) else "the event cannot be accepted now"
    )
    response = error_response(503, f"{what}; try again")
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
    return attributes.check_id(value, "Idempotency-Key")


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


def endpoint(config: IngestConfig) -> Callable[[Request], Awaitable[Response]]:
    token = config.token.encode() if config.token else None
    tenants = [(key.encode(), name) for key, name in config.tenants.items()]

    async def ingest(request: Request) -> Response:
        request_id = request.headers.get("x-request-id") or str(uuid.uuid4())
        response = await _ingest_one(request, request_id)
        response.headers["x-request-id"] = request_id if _printable_id(request_id) else "invalid"
        return response

    async def _ingest_one(request: Request, request_id: str) -> Response:
        if not _printable_id(request_id):
            return error_response(400, "X-Request-Id must be 1-200 printable characters", "X-Request-Id")
        known, tenant = _caller(request.headers.get("authorization", ""), token, tenants)
        if (token is not None or tenants) and not known:
            response = error_response(401, "missing or wrong bearer token")
            response.headers["www-authenticate"] = "Bearer"
            return response
        topic = request.path_params["topic"]
        try:
            names.check("topic", topic)
        except errors.ConfigurationError as exc:
            return error_response(400, str(exc), "topic")
        # The HTTP binding percent-encodes attribute values in ce-* headers.
        headers = {k: unquote(v) if k.startswith("ce-") else v for k, v in request.headers.items()}
        headers = {k: v for k, v in headers.items() if k == "content-type" or k.startswith("ce-")}
        media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        binary = "ce-specversion" in headers or "ce-id" in headers
        plain = media == envelope.JSON and not binary
        if media != envelope.STRUCTURED and not binary and not plain:
            return error_response(
                415,
                f"unsupported media type {media or '(none)'!r}: send application/cloudevents+json "
                "(structured mode), ce-* headers (binary mode) or application/json (the data of a new event)",
            )
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > config.max_bytes:
            return error_response(413, f"body of {declared} bytes exceeds the limit of {config.max_bytes} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > config.max_bytes:
                return error_response(413, f"body exceeds the limit of {config.max_bytes} bytes")
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
            return error_response(400, str(exc), exc.field)
        if key is not None and key != event.id:
            return error_response(
                400, f"Idempotency-Key {key!r} differs from the event id {event.id!r}", "Idempotency-Key"
            )
        if event.correlationid is None:
            event = event.evolve(correlationid=request_id)
        if tenant is not None:
            if event.tenant not in (None, tenant):
                return error_response(
                    403, f"this token posts for tenant {tenant!r}, not {event.tenant!r}", attributes.TENANT
                )
            event = event.evolve(extensions={**event.extensions, attributes.TENANT: tenant})
        try:
            outcome = await config.accept(topic, event)
        except errors.ConveyorError as exc:
            log.error("could not accept event %s for %s: %s", event.id, topic, exc)
            return _unavailable(exc)
        if outcome == "conflict":
            return error_response(
                409, f"event id {event.id!r} is already used by an event of another topic or source; use a new id", "id"
            )
        return JSONResponse({"id": event.id, "topic": topic}, status_code=202)

    return ingest
