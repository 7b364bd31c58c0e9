"""Who may call, over what: TLS and mutual TLS, bearer tokens, and the principal of the current call.

- TLS: the server presents tls_cert_path/tls_key_path; with tls_client_ca_path, a client must present
  a certificate that CA signed (mutual TLS), or the handshake fails before any call.
- Tokens: auth_token_file holds `<principal> <token> [<scope> ...]` lines (`#` comments). Every call to
  an API service (all but health and reflection, which probes and tools need) must carry the metadata
  `authorization: Bearer <token>`; the file is re-read within a second of changing, and a change that
  does not parse keeps the previous tokens (logged). Tokens are kept only as SHA-256 digests and
  never logged or echoed.
- Scopes grant calls beyond the sessions: `admin`, the model repository calls (load, unload, index). A
  token without it is refused them (PERMISSION_DENIED naming the scope); without a token file there are
  no tokens and no scopes, and every caller may make every call.
- The principal of an authenticated call and its scopes are set here (contextvars of the call's task) and
  read by the data plane: the principal owns the sessions it opens. Without a token file every caller is "".
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import NamedTuple

import grpc

from cellstream.service.api.interception import ApiInterceptor, refusing_handler, wrap_handler
from cellstream.service.config import Settings
from cellstream.service.errors import PermissionDenied
from cellstream.service.metrics import Metrics

log = logging.getLogger(__name__)

PRINCIPAL_PATTERN = re.compile(r"[A-Za-z0-9._@-]{1,64}")
MIN_TOKEN_CHARS = 16
RECHECK_SECONDS = 1.0  # how often the token file's identity (mtime, size, inode) is looked at
ADMIN = "admin"
SCOPES = {ADMIN: "the model repository calls: load, unload and index (KServe's Repository*, LoadModel, UnloadModel)"}

_principal: ContextVar[str] = ContextVar("cellstream_principal", default="")
_scopes: ContextVar[frozenset[str] | None] = ContextVar("cellstream_scopes", default=None)  # None: no tokens


def current_principal() -> str:
    """The authenticated caller of the current call, or "" when the server runs without tokens."""
    return _principal.get()


def require_scope(scope: str, what: str) -> None:
    """PermissionDenied unless the caller's token has `scope` (a server without tokens allows everything)."""
    scopes = _scopes.get()
    if scopes is not None and scope not in scopes:
        raise PermissionDenied(f"{what} needs a token with the scope {scope!r}, which the token of "
                               f"{_principal.get()!r} does not have: add `{scope}` after the token on its line of the "
                               "token file")


class Caller(NamedTuple):
    """Who a token stands for, and what it may do beyond the sessions."""

    principal: str
    scopes: frozenset[str]


class SecurityConfigError(ValueError):
    """A TLS or token file the server cannot use; the message says which and why."""


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def parse_tokens(text: str, path: Path) -> dict[bytes, Caller]:
    """Token digests to callers, from a token file's text; SecurityConfigError names the bad line."""
    tokens: dict[bytes, Caller] = {}
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        where = f"{path}, line {number}"
        if len(fields) < 2:
            raise SecurityConfigError(f"{where}: expected `<principal> <token> [<scope> ...]`, found "
                                      f"{len(fields)} field")
        principal, token, *scopes = fields
        unknown = sorted(set(scopes) - set(SCOPES))
        if unknown:
            raise SecurityConfigError(f"{where}: unknown scope {unknown[0]!r}; scopes: "
                                      + "; ".join(f"{name} ({what})" for name, what in SCOPES.items()))
        if not PRINCIPAL_PATTERN.fullmatch(principal):
            raise SecurityConfigError(f"{where}: principal must be 1-64 of A-Z a-z 0-9 . _ @ -")
        if len(token) < MIN_TOKEN_CHARS:
            raise SecurityConfigError(f"{where}: token for {principal!r} is shorter than {MIN_TOKEN_CHARS} characters")
        if _digest(token) in tokens:
            raise SecurityConfigError(f"{where}: token for {principal!r} is already given to another line")
        tokens[_digest(token)] = Caller(principal, frozenset(scopes))
    if not tokens:
        raise SecurityConfigError(f"{path}: no tokens (every call would be refused)")
    return tokens


class TokenFile:
    """The tokens of a file, re-read when the file changes."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._clock = clock
        self._stamp = self._identity()
        self._tokens = parse_tokens(self._read(), path)
        self._checked = clock()

    def _identity(self) -> tuple[int, int, int]:
        try:
            stat = self.path.stat()
        except OSError as exc:
            raise SecurityConfigError(f"cannot read the token file {self.path}: {exc.strerror}") from None
        return (stat.st_mtime_ns, stat.st_size, stat.st_ino)

    def _read(self) -> str:
        try:
            return self.path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise SecurityConfigError(f"cannot read the token file {self.path}: {exc}") from None

    def _refresh(self) -> None:
        now = self._clock()
        if now - self._checked < RECHECK_SECONDS:
            return
        self._checked = now
        try:
            stamp = self._identity()
            if stamp != self._stamp:
                self._tokens, self._stamp = parse_tokens(self._read(), self.path), stamp
                log.info("token file %s reloaded: %d tokens", self.path, len(self._tokens))
        except SecurityConfigError as exc:
            log.error("%s; keeping the previous %d tokens", exc, len(self._tokens))

    def caller(self, token: str) -> Caller | None:
        self._refresh()
        return self._tokens.get(_digest(token))


def _bearer(values: Sequence[str | bytes], where: str) -> tuple[str | None, str]:
    """(token, "") from the values of a call's `authorization` metadata (or HTTP header), or (None, why not)."""
    if not values:
        return None, f"missing credentials: send the {where} `authorization: Bearer <token>`"
    value = values[0] if isinstance(values[0], str) else ""
    scheme, _, token = value.partition(" ")
    if len(values) > 1 or scheme.lower() != "bearer" or not token.strip():
        return None, f"malformed credentials: send exactly one {where} `authorization: Bearer <token>`"
    return token.strip(), ""


def authenticate(tokens: TokenFile, values: Sequence[str | bytes], where: str = "metadata"
                 ) -> tuple[Caller | None, str]:
    """(caller, "") for the values of a call's `authorization` metadata or header, or (None, why not)."""
    token, problem = _bearer(values, where)
    caller = None if token is None else tokens.caller(token)
    return caller, problem or ("" if caller is not None else "unknown or revoked bearer token")


def act_as(caller: Caller) -> None:
    """Make `caller` the caller of the current call. Set, never reset: each call runs in a task of its
    own, whose context ends with it."""
    _principal.set(caller.principal)
    _scopes.set(caller.scopes)


def token_file(settings: Settings) -> TokenFile | None:
    """The tokens of auth_token_file, when set (SecurityConfigError if it is unusable)."""
    return None if settings.auth_token_file is None else TokenFile(settings.auth_token_file)


class TokenAuthInterceptor(ApiInterceptor):
    """UNAUTHENTICATED for API calls without a known token; the caller's principal for the others."""

    def __init__(self, tokens: TokenFile, metrics: Metrics) -> None:
        self._tokens = tokens
        self._metrics = metrics

    def intercept_api(self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails
                      ) -> grpc.RpcMethodHandler:
        values = [v for k, v in details.invocation_metadata or () if k == "authorization"]
        caller, problem = authenticate(self._tokens, values)
        if caller is None:
            self._metrics.calls_refused.labels("unauthenticated").inc()
            return refusing_handler(handler, grpc.StatusCode.UNAUTHENTICATED, problem)

        @contextlib.asynccontextmanager
        async def as_principal(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
            act_as(caller)
            yield

        return wrap_handler(handler, as_principal)


def interceptors(tokens: TokenFile | None, metrics: Metrics) -> list[grpc.aio.ServerInterceptor]:
    """The token check, when there are tokens (see token_file)."""
    return [] if tokens is None else [TokenAuthInterceptor(tokens, metrics)]


def _read_pem(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SecurityConfigError(f"cannot read the {what} {path}: {exc.strerror}") from None
    if b"-----BEGIN " not in data:
        raise SecurityConfigError(f"the {what} {path} is not PEM (no -----BEGIN line)")
    return data


def bind(server: grpc.aio.Server, settings: Settings) -> int:
    """Add the gRPC port, with TLS (and mutual TLS) when configured; returns the bound port, 0 if none."""
    address = f"{settings.host}:{settings.port}"
    if settings.tls_cert_path is None or settings.tls_key_path is None:
        return server.add_insecure_port(address)
    chain = _read_pem(settings.tls_cert_path, "TLS certificate")
    key = _read_pem(settings.tls_key_path, "TLS key")
    client_ca = None if settings.tls_client_ca_path is None else _read_pem(settings.tls_client_ca_path,
                                                                           "client CA bundle")
    credentials = grpc.ssl_server_credentials([(key, chain)], root_certificates=client_ca,
                                              require_client_auth=client_ca is not None)
    try:
        return server.add_secure_port(address, credentials)
    except RuntimeError:  # gRPC says only "failed to bind"; a key that does not fit is the usual cause
        raise SecurityConfigError(
            f"cannot serve TLS on {address}: check that {settings.tls_cert_path} and {settings.tls_key_path} are a "
            "certificate chain and its private key, and that the address is free") from None
