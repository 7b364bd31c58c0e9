"""A server span around every API call on the gRPC port (both APIs), installed first, so refusals by the
other interceptors (credentials, overload) are traced too; only when tracing is on (service/tracing.py).

Our own interceptor rather than opentelemetry-instrumentation-grpc's: that one wraps every method, health
probes and reflection included (a span per probe), and builds its wrapper on every call; this one reuses the
interceptors' handler per method, as admission does, and reads the status the servicer left (docs/BENCHMARKS.md
has both measured).
"""

from __future__ import annotations

import asyncio
from types import TracebackType

import grpc

from cellstream.service.api.handling import interruption_code
from cellstream.service.api.interception import ApiInterceptor, wrap_handler
from cellstream.service.telemetry import Telemetry


class TracingInterceptor(ApiInterceptor):
    def __init__(self, telemetry: Telemetry) -> None:
        self._telemetry = telemetry
        # By method: the handler the next interceptors returned and its traced copy, reused while they return
        # the same one (admission's, built once per method); a refusal or a per-call handler (bearer tokens)
        # gets a copy of its own.
        self._traced: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def intercept_api(self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails
                      ) -> grpc.RpcMethodHandler:
        cached = self._traced.get(details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        name = details.method.lstrip("/")  # package.Service/Method, as OpenTelemetry names gRPC spans
        attributes = {"rpc.system.name": "grpc", "rpc.method": name}
        traced = wrap_handler(handler, lambda context: _CallSpan(self._telemetry, name, attributes, context))
        self._traced[details.method] = (handler, traced)
        return traced


class _CallSpan:
    """One call's span, current while its handler runs; its status from how the handler ended."""

    __slots__ = ("_attributes", "_context", "_name", "_scope", "_span", "_telemetry")

    def __init__(self, telemetry: Telemetry, name: str, attributes: dict[str, str],
                 context: grpc.aio.ServicerContext) -> None:
        self._telemetry, self._name, self._attributes, self._context = telemetry, name, attributes, context

    async def __aenter__(self) -> None:
        metadata = dict(self._context.invocation_metadata() or ())
        self._scope = self._telemetry.server_span(self._name, metadata, dict(self._attributes))
        self._span = self._scope.__enter__()

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        traceback: TracebackType | None) -> None:
        if kind is None or isinstance(error, grpc.aio.AbortError):
            code = self._context.code()  # set by an abort, or left unset: OK
            name = code.name if isinstance(code, grpc.StatusCode) else "OK"
        elif isinstance(error, asyncio.CancelledError):
            name = interruption_code(self._context).name
        else:  # gRPC answers an exception that escaped the servicer with UNKNOWN
            name = "UNKNOWN"
        self._telemetry.grpc_outcome(self._span, name)
        self._scope.__exit__(None, None, None)
