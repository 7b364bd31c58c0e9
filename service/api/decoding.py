"""Requests that are no valid protobuf get INVALID_ARGUMENT, not gRPC's UNKNOWN and a logged traceback.

gRPC decodes a request before any servicer code runs and treats a decoding failure as a servicer
crash. This interceptor decodes leniently instead (a failure becomes a marker) and refuses the
marker where the servicer would have received the request: before a unary call starts, or at the
bad message of a stream (the messages before it were handled normally).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from cellstream.service.api.interception import Behavior, rebuild
from cellstream.service.metrics import Metrics


class _Undecodable:
    def __init__(self, message: str) -> None:
        self.message = message


def _lenient(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    message_type = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    name = message_type.full_name if message_type is not None else "the request message"

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError:
            return _Undecodable(f"request is not a valid {name} (protobuf wire format); nothing was done")

    return decode


class DecodeGuardInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._guarded: dict[str, grpc.RpcMethodHandler] = {}  # built once per method, not per call

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        guarded = self._guarded.get(handler_call_details.method)
        if guarded is not None:
            return guarded
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        guard = self._guard_stream if handler.request_streaming else self._guard_unary
        guarded = rebuild(handler, guard, request_deserializer=_lenient(handler.request_deserializer))
        self._guarded[handler_call_details.method] = guarded
        return guarded

    async def _refuse(self, marker: _Undecodable, context: grpc.aio.ServicerContext) -> None:
        self._metrics.calls_refused.labels("undecodable").inc()
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, marker.message)

    def _guard_unary(self, behavior: Behavior) -> Behavior:
        if inspect.isasyncgenfunction(behavior):

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                if isinstance(request, _Undecodable):
                    await self._refuse(request, context)
                async for reply in behavior(request, context):
                    yield reply

            return stream

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Undecodable):
                await self._refuse(request, context)
            return await behavior(request, context)

        return call

    def _guard_stream(self, behavior: Behavior) -> Behavior:
        def checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async def messages() -> AsyncIterator[Any]:
                async for request in requests:
                    if isinstance(request, _Undecodable):
                        await self._refuse(request, context)
                    yield request

            return messages()

        if inspect.isasyncgenfunction(behavior):

            async def stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                async for reply in behavior(checked(requests, context), context):
                    yield reply

            return stream

        async def call(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            return await behavior(checked(requests, context), context)

        return call
