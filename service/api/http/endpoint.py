"""What every HTTP route goes through, like the gRPC interceptors and `handling.rpc` together: counted
and timed per route, authenticated, admitted under the in-flight bound both transports share, given its
deadline; an exception becomes its HTTP status here and nowhere else (through errors.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from cellstream.service import auth
from cellstream.service.admission import AdmissionInterceptor
from cellstream.service.api.handling import INTERNAL_MESSAGE
from cellstream.service.api.http.errors import INTERNAL, JSON, HttpError, error_response, from_cellstream
from cellstream.service.config import Settings
from cellstream.service.errors import CellstreamError, Unauthenticated
from cellstream.service.metrics import Metrics

if TYPE_CHECKING:
    from cellstream.service.telemetry import Telemetry

log = logging.getLogger(__name__)

TIMEOUT_HEADER = "request-timeout-ms"
CLIENT_GONE = 499


@dataclass(frozen=True)
class Guards:
    """What every route needs from the server around its handler."""

    settings: Settings
    metrics: Metrics
    tokens: auth.TokenFile | None
    admission: AdmissionInterceptor  # the gRPC port's: one in-flight bound for the whole process
    tracing: Telemetry | None = None  # a span per request when tracing is on


class Call:
    """One HTTP request as a route handler sees it."""

    def __init__(self, request: Request, max_body_bytes: int) -> None:
        self.request = request
        self.deadline: float | None = None  # the event loop's clock
        # A streamed reply's real end, counted instead of the 200 it began with: CLIENT_GONE if its client
        # disconnected, or the status of the error event it ended with.
        self.outcome: int | None = None
        self._max_body_bytes = max_body_bytes

    @property
    def path(self) -> dict[str, Any]:
        return self.request.path_params

    def remaining(self) -> float | None:
        """Seconds until the deadline (the timeout to hand the data plane), None without one."""
        return None if self.deadline is None else self.deadline - asyncio.get_running_loop().time()

    async def body(self) -> bytes:
        """The whole body, refused with 413 past max_message_bytes (the gRPC port's bound too)."""
        limit = self._max_body_bytes
        declared = self.request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise HttpError(413, f"request body has {int(declared)} bytes, more than max_message_bytes ({limit})")
        chunks, size = [], 0
        async for chunk in self.request.stream():
            size += len(chunk)
            if size > limit:
                raise HttpError(413, f"request body has more than max_message_bytes ({limit}) bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def json(self, *, empty_is: dict[str, Any] | None = None) -> dict[str, Any]:
        """The body as a JSON object; `empty_is` stands for an empty body where the route allows one."""
        return parse_object(await self.body(), "request body", empty_is)


def parse_object(data: bytes, what: str, empty_is: dict[str, Any] | None = None) -> dict[str, Any]:
    if not data.strip() and empty_is is not None:
        return empty_is
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HttpError(400, f"{what} is not JSON: {exc}") from None
    except RecursionError:
        raise HttpError(400, f"{what} nests arrays or objects too deeply to read") from None
    if not isinstance(value, dict):
        raise HttpError(400, f"{what} must be a JSON object, not {type(value).__name__}")
    return value


def json_response(value: object, status: int = 200) -> Response:
    return Response(json_text(value), status, media_type=JSON)


def json_text(value: object) -> bytes:
    """Compact JSON and a newline, so replies printed by curl one after another stay on lines of their own."""
    return json.dumps(value, separators=(",", ":")).encode() + b"\n"


Handler = Callable[[Call], Awaitable[Response]]


@dataclass(frozen=True)
class Api:
    """A route: its path template, method and handler, and what the OpenAPI document says of it."""

    path: str
    method: str
    handler: Handler
    summary: str
    request: str = ""  # the body's schema: a protobuf message's full name or a KServe schema's (openapi.py)
    reply: str = ""
    open: bool = False  # no authentication or admission (health, the API's description)
    events: bool = False  # the reply is server-sent events of `reply`


class Endpoint:
    """A route's ASGI app: `handler` wrapped in everything above. `open` routes (health, the API's own
    description) skip authentication and admission, as gRPC's health and reflection do."""

    def __init__(self, route: str, handler: Handler, guards: Guards, *, open: bool = False) -> None:
        self.route = route
        self.handler = handler
        self.guards = guards
        self.open = open

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        tracing = self.guards.tracing
        if tracing is None or self.open:  # like gRPC's health and reflection, probes and the API's files: no span
            await self._serve(scope, receive, send)
            return
        name = f"{scope['method']} {self.route}"
        attributes = {"http.request.method": scope["method"], "http.route": self.route}
        with tracing.server_span(name, Headers(scope=scope), attributes) as span:
            tracing.http_outcome(span, await self._serve(scope, receive, send))

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> int:
        """Answer the request; returns the status counted for it."""
        started = time.perf_counter()
        status = 0

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        call = Call(Request(scope, receive), self.guards.settings.max_message_bytes)
        try:
            # Held until the reply's last byte: a streamed reply keeps its in-flight slot while it streams.
            with contextlib.ExitStack() as held:
                response = await self._respond(call, held)
                await response(scope, receive, send_counted)
        except asyncio.CancelledError:
            status = CLIENT_GONE  # the server is stopping, past its grace
            raise
        finally:
            metrics = self.guards.metrics
            metrics.http_requests.labels(self.route, str(call.outcome or status)).inc()
            metrics.http_latency.labels(self.route).observe(time.perf_counter() - started)
        return call.outcome or status

    async def _respond(self, call: Call, held: contextlib.ExitStack) -> Response:
        try:
            if not self.open:
                self._authenticate(call.request)  # first: a call refused for its credentials takes no slot
                held.enter_context(self.guards.admission.slot())
                call.deadline = self._deadline(call.request)
            async with asyncio.timeout_at(call.deadline):
                return await self.handler(call)
        except HttpError as exc:
            return error_response(exc)
        except CellstreamError as exc:
            return error_response(from_cellstream(exc))
        except Exception as exc:
            remaining = call.remaining()
            if isinstance(exc, TimeoutError) and remaining is not None and remaining <= 0:
                return error_response(HttpError(504, f"deadline exceeded: {self._timeout_words(call)}; "
                                                     "retry with a longer deadline"))
            # A bug: logged once, answered like gRPC's INTERNAL.
            log.exception("unexpected error in %s", self.route)
            return error_response(HttpError(INTERNAL, INTERNAL_MESSAGE))

    def _authenticate(self, request: Request) -> None:
        tokens = self.guards.tokens
        if tokens is None:
            return
        caller, problem = auth.authenticate(tokens, request.headers.getlist("authorization"), "header")
        if caller is None:
            self.guards.metrics.calls_refused.labels("unauthenticated").inc()
            raise Unauthenticated(problem)
        auth.act_as(caller)

    def _deadline(self, request: Request) -> float | None:
        timeout = self.guards.settings.http_request_timeout_seconds or math.inf
        header = request.headers.get(TIMEOUT_HEADER)
        if header is not None:
            try:
                asked = float(header)
            except ValueError:
                asked = math.nan
            if not (math.isfinite(asked) and asked > 0):
                raise HttpError(400, f"header Request-Timeout-Ms is {header[:40]!r}; it must be a number of "
                                     "milliseconds > 0")
            timeout = min(timeout, asked / 1000)
        return None if math.isinf(timeout) else asyncio.get_running_loop().time() + timeout

    def _timeout_words(self, call: Call) -> str:
        header = call.request.headers.get(TIMEOUT_HEADER)
        if header is not None:
            return f"the request took longer than its Request-Timeout-Ms ({header} ms)"
        return (f"the request took longer than http_request_timeout_seconds "
                f"({self.guards.settings.http_request_timeout_seconds:g} s)")

