"""`cellstream health`: one grpc.health.v1 Check, answered as an exit status.

Exit statuses, so scripts, Docker's HEALTHCHECK and exec probes can tell the cases apart:
- 0: the server answered SERVING;
- 1: it answered, but not SERVING (NOT_SERVING, UNKNOWN, or it does not know the service asked about);
- 3: no answer (unreachable, deadline passed, TLS handshake refused, any other RPC failure).
2 stays the CLI's "bad invocation" (unusable flags or files), as for argparse.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cellstream.service.config import Settings

SERVING = 0
NOT_SERVING = 1
NO_ANSWER = 3


@dataclass(frozen=True)
class Outcome:
    exit_status: int
    message: str


def default_target() -> str:
    """Loopback on the port `cellstream serve` binds in this environment: inside a container whose
    CELLSTREAM_PORT moved the server, the image's HEALTHCHECK still finds it without flags."""
    port = os.environ.get("CELLSTREAM_PORT") or str(Settings.model_fields["port"].default)
    return f"127.0.0.1:{port}"


def check(target: str, *, service: str = "", timeout: float = 3.0,
          credentials: grpc.ChannelCredentials | None = None, token: str | None = None,
          server_name: str | None = None) -> Outcome:
    """Ask `target` once whether `service` ("" = the whole server) is SERVING.

    `server_name` overrides the name the server's certificate must carry: a probe dials 127.0.0.1
    while the certificate names the Service.
    """
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    about = f"{target} (service {service!r})" if service else target
    channel = (grpc.secure_channel(target, credentials, options) if credentials is not None
               else grpc.insecure_channel(target, options))
    with channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout, metadata=metadata)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
            details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            if code == grpc.StatusCode.NOT_FOUND:
                return Outcome(NOT_SERVING, f"{about}: the server does not know this service ({details})")
            return Outcome(NO_ANSWER, f"{about}: no answer: {code.name}: {details}")
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    if response.status == health_pb2.HealthCheckResponse.SERVING:
        return Outcome(SERVING, f"{about}: {status}")
    return Outcome(NOT_SERVING, f"{about}: {status}")
