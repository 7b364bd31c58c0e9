"""The one place a status becomes an HTTP status, and the one shape of an HTTP error: `{"error": "..."}`.

Errors of the shared core carry a gRPC status (service/errors.py); HTTP answers with the status a REST
client expects for it. Refusals only HTTP has (a body that is not JSON, too large, a wrong method) are
HttpErrors with their HTTP status.
"""

from __future__ import annotations

import json

import grpc
from starlette.responses import Response

from cellstream.service.errors import CellstreamError

HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,  # the client went away first (nginx's convention)
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,  # expected_position: the session moved
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
INTERNAL = 500
JSON = "application/json"


class HttpError(Exception):
    """A refusal of the HTTP layer itself, with its HTTP status."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def http_status(code: grpc.StatusCode) -> int:
    return HTTP_STATUS.get(code, INTERNAL)


def from_cellstream(exc: CellstreamError) -> HttpError:
    headers = {"WWW-Authenticate": "Bearer"} if exc.code == grpc.StatusCode.UNAUTHENTICATED else None
    return HttpError(http_status(exc.code), exc.message, headers)


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode() + b"\n"


def error_response(error: HttpError) -> Response:
    return Response(error_body(error.message), error.status, error.headers, media_type=JSON)
