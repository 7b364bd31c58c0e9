"""The client's channel: target, TLS (and mutual TLS), bearer token, message sizes."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

Pem = str | os.PathLike[str] | bytes  # a PEM file's path, or its contents
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # the server's default max_message_bytes
# gRPC waits 1 s, then 1.6x longer each time (up to 2 minutes), before reconnecting to a server that went away,
# and fails calls at once meanwhile; the client retries a lost step for a few seconds (cellstream.exactly_once),
# so the channel tries again on the same scale: after 0.1 s, then at most every second.
RECONNECT = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
             ("grpc.max_reconnect_backoff_ms", 1000)]


def _pem(source: Pem | None) -> bytes | None:
    if source is None or isinstance(source, bytes):
        return source
    return Path(source).read_bytes()


def tls_credentials(ca: Pem | None = None, cert: Pem | None = None, key: Pem | None = None
                    ) -> grpc.ChannelCredentials:
    """TLS to the server: trust `ca` (default: the system's roots); present `cert` and `key` for mutual TLS."""
    if (cert is None) != (key is None):
        raise ValueError("cert and key go together (mutual TLS): give both or neither")
    return grpc.ssl_channel_credentials(root_certificates=_pem(ca), private_key=_pem(key),
                                        certificate_chain=_pem(cert))


def open_channel(target: str, *, tls: bool = False, ca: Pem | None = None, cert: Pem | None = None,
                 key: Pem | None = None, server_name: str | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
    """A grpc.aio channel to `target` ("host:port", or any gRPC target such as "ipv4:10.0.0.1:50051,10.0.0.2:50051",
    whose addresses the channel tries in turn). TLS when `tls`, `ca` or `cert` is given; `server_name`: the
    name the server's certificate must carry when the target's host is not it. `options`: more gRPC channel
    arguments, which win over these."""
    settings: list[tuple[str, Any]] = [("grpc.max_receive_message_length", max_message_bytes),
                                       ("grpc.max_send_message_length", max_message_bytes), *RECONNECT]
    if server_name:
        settings.append(("grpc.ssl_target_name_override", server_name))
    settings += options
    if tls or ca is not None or cert is not None:
        return grpc.aio.secure_channel(target, tls_credentials(ca, cert, key), settings)
    return grpc.aio.insecure_channel(target, settings)


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    """The metadata every call carries: `authorization: Bearer <token>` when there is a token."""
    return (("authorization", f"Bearer {token}"),) if token else None
