"""The one place exceptions become gRPC statuses, and where every RPC is counted and timed."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from service.errors import CellstreamError
from service.metrics import Metrics

log = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal error; the server logged the details"


class HasMetrics:
    metrics: Metrics


async def _status_of(exc: BaseException, context: grpc.aio.ServicerContext, method: str) -> grpc.StatusCode:
    """Abort the call with the status `exc` stands for (never returns normally for errors)."""
    if isinstance(exc, CellstreamError):
        await context.abort(exc.code, exc.message)
    log.exception("unexpected error in %s", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
    raise AssertionError("context.abort returned")  # pragma: no cover


def _final_code(exc: BaseException | None, context: grpc.aio.ServicerContext) -> str:
    if exc is None:
        return grpc.StatusCode.OK.name
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED.name
    if isinstance(exc, CellstreamError):
        return exc.code.name
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    return grpc.StatusCode.INTERNAL.name


def rpc(func: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a servicer method (unary or server-streaming): map errors, count and time the call."""
    method = func.__name__

    if inspect.isasyncgenfunction(func):

        @functools.wraps(func)
        async def stream_wrapper(self: HasMetrics, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator:
            started = time.perf_counter()
            error: BaseException | None = None
            try:
                async for reply in func(self, request, context):
                    yield reply
            except BaseException as exc:
                error = exc
                if isinstance(exc, Exception) and not isinstance(exc, grpc.aio.AbortError):
                    await _status_of(exc, context, method)
                raise
            finally:
                self.metrics.requests.labels(method, _final_code(error, context)).inc()
                self.metrics.request_latency.labels(method).observe(time.perf_counter() - started)

        return stream_wrapper

    @functools.wraps(func)
    async def unary_wrapper(self: HasMetrics, request: Any, context: grpc.aio.ServicerContext) -> Awaitable:
        started = time.perf_counter()
        error: BaseException | None = None
        try:
            return await func(self, request, context)
        except BaseException as exc:
            error = exc
            if isinstance(exc, Exception) and not isinstance(exc, grpc.aio.AbortError):
                await _status_of(exc, context, method)
            raise
        finally:
            self.metrics.requests.labels(method, _final_code(error, context)).inc()
            self.metrics.request_latency.labels(method).observe(time.perf_counter() - started)

    return unary_wrapper
