"""Shared by the server interceptors: which calls they leave alone, and how they rebuild a handler."""

from __future__ import annotations

import abc
import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import grpc

# Probes and tooling: health must answer load balancers even when every API call would be refused.
INFRASTRUCTURE = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                  "/grpc.reflection.v1.ServerReflection/")

Behavior = Callable[..., Any]
Around = Callable[[grpc.aio.ServicerContext], AbstractAsyncContextManager[None]]
KEEP = object()  # rebuild(): keep the handler's request deserializer


def is_infrastructure(method: str) -> bool:
    return method.startswith(INFRASTRUCTURE)


def rebuild(handler: grpc.RpcMethodHandler, wrap: Callable[[Behavior], Behavior],
            request_deserializer: object = KEEP) -> grpc.RpcMethodHandler:
    """A handler of the same kind whose behaviour is `wrap(behaviour)`, optionally decoding differently."""
    codecs = {
        "request_deserializer": handler.request_deserializer if request_deserializer is KEEP else request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary), **codecs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream), **codecs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(wrap(handler.stream_unary), **codecs)
    return grpc.stream_stream_rpc_method_handler(wrap(handler.stream_stream), **codecs)


def _around(behavior: Behavior, around: Around) -> Behavior:
    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with around(context):
                async for reply in behavior(request, context):
                    yield reply

        return stream

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        async with around(context):
            return await behavior(request, context)

    return call


def wrap_handler(handler: grpc.RpcMethodHandler, around: Around) -> grpc.RpcMethodHandler:
    """The same handler with its behaviour run inside `around(context)`, which may abort the call."""
    return rebuild(handler, lambda behavior: _around(behavior, around))


def refusing_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, details: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind that fails every call with `code`; its requests are never decoded."""

    @contextlib.asynccontextmanager
    async def refuse(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        await context.abort(code, details)
        yield  # never reached: abort raises

    return rebuild(handler, lambda behavior: _around(behavior, refuse), request_deserializer=None)


class ApiInterceptor(grpc.aio.ServerInterceptor):
    """An interceptor of API calls only: unknown methods and the infrastructure pass untouched."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or is_infrastructure(handler_call_details.method):
            return handler
        return self.intercept_api(handler, handler_call_details)

    @abc.abstractmethod  # grpc.aio.ServerInterceptor is an ABC
    def intercept_api(self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails
                      ) -> grpc.RpcMethodHandler:
        """The handler an API call runs with instead of `handler`."""
