"""One error base class that carries its gRPC status; the API layer maps it in one place."""

from __future__ import annotations

from collections.abc import Sequence

import grpc


class CellstreamError(Exception):
    """An error a client caused or can act on; `code` is the gRPC status it becomes."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(CellstreamError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(CellstreamError):
    code = grpc.StatusCode.NOT_FOUND


def session_not_found(session_id: str) -> NotFound:
    """The one answer for a session that is unknown, expired, evicted, closed or another principal's."""
    return NotFound(f"session {session_id!r} not found (unknown, expired, evicted or closed)")


class FailedPrecondition(CellstreamError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(CellstreamError):
    code = grpc.StatusCode.ABORTED


class ResourceExhausted(CellstreamError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(CellstreamError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unavailable(CellstreamError):
    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(CellstreamError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(CellstreamError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ModelLoadError(Exception):
    """A model file cannot be served; raised at start-up with the reason. `problems` lists each one
    (a graph can break the contract in several ways); the message joins them."""

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems) or [message]


class TracingError(ValueError):
    """The OTEL_* variables ask for tracing the server cannot do; raised at start-up, the message says what to
    change (service/tracing.py)."""
