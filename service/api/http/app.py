"""The HTTP face: one Starlette app on uvicorn, in the gRPC server's process and event loop, calling the
same servicer cores, so both transports share one DataPlane (store, batcher, rules, metrics).

uvicorn is driven by hand (startup, its tick loop, shutdown) rather than through `Server.serve`, which
installs its own SIGINT/SIGTERM handlers: the process's shutdown order is server.py's (readiness first,
then both transports drain within the same grace).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from cellstream.service.api.handling import DataPlaneServicer
from cellstream.service.api.http.endpoint import Api, Call, Endpoint, Guards, json_response
from cellstream.service.api.http.errors import HttpError, error_response
from cellstream.service.api.http.kserve_routes import KServeRoutes
from cellstream.service.api.http.openapi import document
from cellstream.service.api.http.page_routes import page_apis
from cellstream.service.api.http.session_routes import SessionRoutes
from cellstream.service.api.kserve import KServeServicer
from cellstream.service.auth import SecurityConfigError
from cellstream.service.config import Settings

log = logging.getLogger(__name__)

UNMATCHED = "(unmatched)"  # the route label of requests no route takes
# uvicorn's wait for requests in flight is asyncio.wait_for: with 0 it gives up before even looking, and logs
# an error on every stop, idle or not. This little lets an idle server stop cleanly.
MIN_GRACE_SECONDS = 0.05


def build_app(guards: Guards, kserve: KServeServicer, native: DataPlaneServicer) -> Starlette:
    apis = [*KServeRoutes(kserve).apis(), *SessionRoutes(native).apis()]
    spec = document(apis)

    async def openapi(call: Call) -> Response:
        return json_response(spec)

    apis.append(Api("/openapi.json", "GET", openapi, "This document", open=True))
    # The gate page is no API: it stays out of the document, but is counted and timed like any route.
    routes = [Route(api.path, Endpoint(api.path, api.handler, guards, open=api.open), methods=[api.method])
              for api in [*apis, *page_apis()]]

    async def refused(request: Request, exc: Exception) -> Response:
        """No route, or not this method: counted, and answered in the API's error shape."""
        status = exc.status_code if isinstance(exc, HTTPException) else 404
        guards.metrics.http_requests.labels(UNMATCHED, str(status)).inc()
        words = "has no route" if status == 404 else "does not take this method"
        return error_response(HttpError(status, f"{request.method} {request.url.path[:200]}: the server {words}; "
                                                "the routes are in GET /openapi.json"))

    return Starlette(routes=routes, exception_handlers={HTTPException: refused})


def _listening_socket(settings: Settings) -> socket.socket:
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.host, settings.http_port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot bind HTTP port {settings.host}:{settings.http_port}: {exc.strerror}") from None
    return sock


def _config(app: Starlette, settings: Settings) -> uvicorn.Config:
    """uvicorn's config: TLS from the gRPC port's settings; its logging left to ours."""
    tls: dict[str, object] = {}
    if settings.tls_cert_path is not None:
        tls = {"ssl_certfile": settings.tls_cert_path, "ssl_keyfile": settings.tls_key_path}
        if settings.tls_client_ca_path is not None:
            tls |= {"ssl_ca_certs": settings.tls_client_ca_path, "ssl_cert_reqs": ssl.CERT_REQUIRED}
    # httptools named, not left to "auto": the server must not parse HTTP differently by what is installed.
    config = uvicorn.Config(app, http="httptools", log_config=None, access_log=False, lifespan="off",
                            server_header=False, timeout_graceful_shutdown=settings.shutdown_grace_seconds,
                            **tls)  # type: ignore[arg-type]
    try:
        config.load()
    except (OSError, ssl.SSLError) as exc:
        raise SecurityConfigError(f"cannot serve TLS on the HTTP port: check that {settings.tls_cert_path} and "
                                  f"{settings.tls_key_path} are a certificate chain and its private key ({exc})"
                                  ) from None
    return config


class HttpServer:
    """The HTTP face's lifecycle: `start` binds and serves, `stop` drains within a grace period."""

    def __init__(self, app: Starlette, settings: Settings) -> None:
        self._config = _config(app, settings)
        self._server = uvicorn.Server(self._config)
        self._server.lifespan = self._config.lifespan_class(self._config)  # what Server.serve would set
        self._socket = _listening_socket(settings)
        self.port: int = self._socket.getsockname()[1]
        self._ticks: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._server.startup(sockets=[self._socket])
        # uvicorn's tick loop refreshes the Date header; it ends when should_exit is set.
        self._ticks = asyncio.get_running_loop().create_task(self._server.main_loop(), name="http-ticks")

    async def stop(self, grace: float) -> None:
        """Stop accepting, let requests in flight (streams too) finish within `grace`, then cancel them."""
        self._server.should_exit = True
        if self._ticks is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticks
        self._config.timeout_graceful_shutdown = max(grace, MIN_GRACE_SECONDS)  # type: ignore[assignment]
        await self._server.shutdown(sockets=[self._socket])
