"""What the client raises: one base class carrying the gRPC status, one subclass per status a caller acts on.

Every error of a call (a failed RPC, or a multiplexed item's own status) becomes one of these, with the
server's message word for word. `applied` says what the failed call did to the session: False, nothing
(the server refused it, or it never left the client); None, it may have been applied (its reply was lost and
the client could not find out in time). Either way the session object knows where it stands: its next call
learns the outcome before anything else is applied (docs/CLIENT.md, "Exactly once").
"""

from __future__ import annotations

import grpc


class CellstreamError(Exception):
    """A call failed with `code` (a grpc.StatusCode); `message` is the server's (or the client's) explanation."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None, applied: bool | None = False) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.applied = applied
        """False: the call changed nothing; None: a step or turn that may have been applied."""

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class InvalidArgument(CellstreamError):
    """A bad request (token ids, features, sizes, limits): the message names the field and the bound."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(CellstreamError):
    """Unknown, expired, evicted or closed session (or another principal's), or an unknown model."""

    code = grpc.StatusCode.NOT_FOUND


class PositionConflict(CellstreamError):
    """ABORTED: the session was not where the step expected it (another writer moved it); nothing of this step
    was applied unless `applied` is None. `position` is where the session is now, as re-read by the client
    (which continues from there: the next step applies on top of it)."""

    code = grpc.StatusCode.ABORTED

    def __init__(self, message: str, *, position: int | None = None, applied: bool | None = False,
                 code: grpc.StatusCode | None = None) -> None:
        super().__init__(message, code=code, applied=applied)
        self.position = position


class FailedPrecondition(CellstreamError):
    """The model cannot do this (gates asked of a model served without its glass-box graph)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(CellstreamError):
    """The server is full or overloaded (sessions, queue, calls in flight); nothing was applied: retry later."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(CellstreamError):
    """The server could not be reached or could not serve (after the client's retries)."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(CellstreamError):
    """The call's deadline passed before its outcome was known."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(CellstreamError):
    """No bearer token, or one the server does not know."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(CellstreamError):
    """The caller is known but not allowed to do this."""

    code = grpc.StatusCode.PERMISSION_DENIED


BY_CODE: dict[grpc.StatusCode, type[CellstreamError]] = {
    cls.code: cls for cls in (InvalidArgument, NotFound, PositionConflict, FailedPrecondition, ResourceExhausted,
                              Unavailable, DeadlineExceeded, Unauthenticated, PermissionDenied)
}
CODE_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def error_for(code: grpc.StatusCode, message: str, *, applied: bool | None = False) -> CellstreamError:
    """The exception of a status: its subclass, or CellstreamError itself for the codes without one."""
    cls = BY_CODE.get(code)
    if cls is None:
        return CellstreamError(message, code=code, applied=applied)
    return cls(message, applied=applied)


def status_code(number: int) -> grpc.StatusCode:
    """The grpc.StatusCode of a status number (a multiplexed item's `Status.code`)."""
    return CODE_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)
