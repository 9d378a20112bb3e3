"""HTTP: health, readiness, metrics, scaling, docs and CloudEvents ingest, on Starlette served by uvicorn.

* ``GET /healthz``: the process is alive.
* ``GET /readyz``: each dependency (broker, database, subscriptions) is checked;
  ``healthy`` (200), ``degraded`` (200, a non-critical check failed) or
  ``unhealthy`` (503), with per-check details.
* ``GET /metrics``: Prometheus text format.
* ``GET /version``: the package version, the git commit if known (the
  checkout's, or ``CONVEYOR_GIT_SHA``; see :mod:`conveyor.runtime.revision`), and the broker and database kinds.
* ``GET /scaling`` (only in processes with a worker): per handler, its
  topic, capacity (concurrency), in-flight messages and the broker's backlog
  and oldest message age, as last read (see :mod:`conveyor.runtime.scaling`).
* ``GET /asyncapi.json``, ``GET /docs``: the application's AsyncAPI document (see :mod:`conveyor.runtime.docs`).
* ``POST /events/{topic}`` (only where ingest is enabled): see :mod:`conveyor.runtime.ingest`.
* ``/console/...`` (only where the console is on): see :mod:`conveyor.console`.

Every error, of every route, is one JSON shape: ``{"error": {"code": ...,
"message": ..., "field": ...}}`` (:func:`conveyor.runtime.ingest.error_response`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import prometheus_client
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from conveyor import errors
from conveyor.runtime import docs as api_docs
from conveyor.runtime import ingest as ingest_route

log = logging.getLogger("conveyor.http")

# What ``create_app(..., ingest=...)`` takes, here too for callers of this module.
IngestConfig = ingest_route.IngestConfig
Outcome = ingest_route.Outcome
Accept = ingest_route.Accept


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


Scaling = Callable[[], Mapping[str, Any]]
"""Returns the body of ``GET /scaling`` (see :mod:`conveyor.runtime.scaling`); must not block."""


def create_app(
    checks: Sequence[Check],
    ingest: IngestConfig | None = None,
    version: dict[str, str | None] | None = None,
    scaling: Scaling | None = None,
    registry: prometheus_client.CollectorRegistry | None = None,
    docs: Mapping[str, Any] | None = None,
    console: Sequence[BaseRoute] | None = None,
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
        console: the operations console's routes (:meth:`conveyor.console.app.Console.routes`), if served.
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
            return ingest_route.error_response(503, "the scaling figures are unavailable now; try again")

    async def http_error(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        codes = {404: "not_found", 405: "method_not_allowed", 500: "internal"}
        message = exc.detail if isinstance(exc, HTTPException) else "internal error"
        response = ingest_route.error_response(status, str(message), code=codes.get(status, "http_error"))
        if isinstance(exc, HTTPException) and exc.headers:
            response.headers.update(exc.headers)
        return response

    routes: list[BaseRoute] = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/version", version_info, methods=["GET"]),
    ]
    if ingest is not None:
        routes.append(Route("/events/{topic}", ingest_route.endpoint(ingest), methods=["POST"]))
    if scaling is not None:
        routes.append(Route("/scaling", scaling_info, methods=["GET"]))
    if docs is not None:
        routes.extend(api_docs.routes(docs))
    if console is not None:
        routes.extend(console)
    # Exception: a bug answers 500 in the same shape (the server still logs the traceback).
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: http_error})


async def _run_check(check: Check) -> tuple[bool, dict[str, Any]]:
    try:
        async with asyncio.timeout(5):
            await check.probe()
    except Exception as exc:
        return False, {"ok": False, "critical": check.critical, "error": str(exc) or type(exc).__name__}
    return True, {"ok": True, "critical": check.critical}


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
