"""All server settings in one object: environment `CELLSTREAM_*`, overridden by CLI flags."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Annotated, Literal, get_origin
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MEMORY = "memory"
REDIS_SCHEMES = ("redis", "rediss", "unix")
SECRET_FIELDS = frozenset({"state_store"})  # may hold a password: never echoed in errors or logs
EXPLICIT = "explicit"
EVERY_MODEL = "*"  # load_model: every model of model_dir
VERSION_POLICY = re.compile(r"all|latest:[1-9][0-9]*")


def redacted_url(url: str) -> str:
    """`url` without user name and password, fit for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    host = parts.hostname or ""
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CELLSTREAM_", extra="forbid", use_attribute_docstrings=True)

    host: str = "0.0.0.0"
    """Address the gRPC and HTTP servers bind."""
    port: int = Field(50051, ge=0, le=65535)
    """gRPC port (both APIs and health); 0 picks a free port."""
    http_port: int = Field(8080, ge=0, le=65535)
    """HTTP port (KServe v2 REST, sessions as JSON with streamed replies, /openapi.json); 0: no HTTP server."""
    http_request_timeout_seconds: float = Field(0.0, ge=0)
    """Deadline of an HTTP request that sends no `Request-Timeout-Ms` header (a streamed reply: until its last
    event); 0: none."""
    tls_cert_path: Path | None = None
    """PEM certificate chain the gRPC and HTTP ports present; with tls_key_path both speak TLS only."""
    tls_key_path: Path | None = None
    """PEM private key of tls_cert_path."""
    tls_client_ca_path: Path | None = None
    """PEM CA bundle: clients must present a certificate it signed (mutual TLS); needs tls_cert_path."""
    auth_token_file: Path | None = None
    """File of `<principal> <token>` lines: API calls need `authorization: Bearer <token>` (health and
    reflection stay open); re-read when it changes. Unset: no authentication."""
    metrics_host: str = "0.0.0.0"
    """Address the Prometheus /metrics HTTP server binds."""
    metrics_port: int = Field(8000, ge=0, le=65535)
    """Prometheus /metrics port; 0 picks a free port."""
    model_dir: Path = Path("model/artifacts")
    """The model repository: NAME.onnx (version 1 of NAME) and NAME/VERSION/model.onnx (Triton's layout), each with
    its glass-box graph (.gates.onnx) beside it."""
    default_model: str = ""
    """Model used when a request names none; empty: the only model, or `cellstream-chat`."""
    default_versions: Annotated[dict[str, int], NoDecode] = {}
    """The version a request naming a model but no version gets, as `NAME=VERSION` pairs separated by commas; other
    models: their highest loaded version."""
    version_policy: str = "all"
    """Which versions of each NAME/ directory are loaded: `all`, or `latest:N` (the N highest)."""
    model_control: Literal["none", "explicit", "poll"] = "none"
    """`none`: model_dir is loaded at start-up and never changes; `explicit`: the repository calls (KServe
    RepositoryModelLoad/Unload, LoadModel/UnloadModel) load and unload models, start-up loads load_model; `poll`:
    model_dir is re-read every model_poll_interval_seconds and followed."""
    load_model: Annotated[list[str], NoDecode] = []
    """model_control=explicit: the models start-up loads (repeat the flag, or separate names with commas; `*`: every
    model of model_dir); none: start with none."""
    model_poll_interval_seconds: float = Field(15.0, gt=0)
    """model_control=poll: how often model_dir is re-read."""
    ort_intra_op_threads: int = Field(2, ge=1, le=256)
    """onnxruntime intra-op threads per model."""
    max_batch_size: int = Field(256, ge=1, le=4096)
    """Most session steps run in one onnxruntime call."""
    max_queue_size: int = Field(4096, ge=1)
    """Most steps waiting per model; past it new steps get RESOURCE_EXHAUSTED."""
    max_queue_wait_ms: float = Field(2000.0, gt=0)
    """Longest a step may wait for its batch; a queue whose oldest step waited longer refuses new steps,
    and steps past it are refused unrun (RESOURCE_EXHAUSTED)."""
    max_inflight_requests: int = Field(1024, ge=1)
    """Most API calls handled at once (a stream counts while open; health and reflection do not);
    further calls get RESOURCE_EXHAUSTED at once."""
    max_sessions: int = Field(100_000, ge=1)
    """Most live sessions in the store."""
    max_sessions_per_principal: int = Field(0, ge=0)
    """Most live sessions one authenticated principal may hold; 0: no bound but max_sessions."""
    when_full: Literal["evict", "reject"] = "evict"
    """At max_sessions: evict the least recently used idle session, or reject with RESOURCE_EXHAUSTED."""
    session_ttl_seconds: float = Field(1800.0, gt=0)
    """Idle time-to-live of a session when the client asks for none."""
    max_session_ttl_seconds: float = Field(86_400.0, gt=0)
    """Longest idle time-to-live a client may ask for."""
    sweep_interval_seconds: float = Field(5.0, gt=0)
    """How often expired sessions are swept out (they are also refused on access)."""
    state_store: str = "memory"
    """Where sessions live: `memory` (this process) or a Redis URL shared by replicas
    (`redis://[:password@]host:port/db`, `rediss://` for TLS, `unix:///path?db=0`)."""
    state_store_timeout_seconds: float = Field(1.0, gt=0)
    """Redis: longest wait to connect or for a reply; past it the request fails UNAVAILABLE."""
    snapshot_path: Path | None = None
    """Memory store: file that receives every live session at graceful shutdown and restores them at
    start-up (then is removed); unset: sessions end with the process."""
    snapshot_on_invalid: Literal["refuse", "start-empty"] = "refuse"
    """An unusable snapshot (corrupt, truncated, foreign) is always renamed `<path>.rejected`; then `refuse`
    stops start-up with the reason, `start-empty` starts without its sessions."""
    store_probe_interval_seconds: float = Field(1.0, gt=0)
    """How often the state store's reachability is checked; health is NOT_SERVING while it is down."""
    max_tokens_per_request: int = Field(4096, ge=1)
    """Most tokens (or feature vectors) in one step."""
    max_items_per_message: int = Field(1024, ge=1)
    """Most items in one StepBatch or GenerateBatch (StepMany, StreamMany, GenerateMany); a message with more
    is refused whole (INVALID_ARGUMENT). Also the most GenerateMany turns in progress on one stream."""
    max_generate_tokens: int = Field(512, ge=1)
    """Most tokens one Generate call may sample; also its default."""
    max_gate_steps: int = Field(256, ge=1)
    """Most steps of one request that asks for gates (Outputs.gates, or a Generate prompt with gates): such a
    request weighs on other sessions less than the largest plain ones at 256 (`make bench-gates`)."""
    max_message_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    """Largest gRPC message received or sent."""
    shutdown_grace_seconds: float = Field(10.0, ge=0)
    """On SIGTERM, how long in-flight calls get to finish."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Logging level."""
    log_format: Literal["text", "json"] = "text"
    """Log lines as text, or one JSON object each (time, level, logger, message, and trace_id/span_id inside a
    traced call)."""

    @field_validator("load_model", mode="before")
    @classmethod
    def _split_names(cls, value: object) -> object:
        """Names from the environment (one string) or the flag (a string per use), split at commas."""
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return [name.strip() for v in value for name in v.split(",") if name.strip()]
        return value

    @field_validator("default_versions", mode="before")
    @classmethod
    def _parse_pairs(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        pairs: dict[str, str] = {}
        for pair in filter(None, (p.strip() for p in value.split(","))):
            name, equals, version = pair.partition("=")
            if not (equals and name.strip() and version.strip()):
                raise ValueError(f"{pair!r} is not NAME=VERSION")
            pairs[name.strip()] = version.strip()
        return pairs

    @model_validator(mode="after")
    def _versions_valid(self) -> Settings:
        if not VERSION_POLICY.fullmatch(self.version_policy):
            raise ValueError(f"version_policy must be `all` or `latest:N` with N >= 1; got {self.version_policy!r}")
        if any(version < 1 for version in self.default_versions.values()):
            raise ValueError(f"default_versions must name versions >= 1; got {self.default_versions}")
        if self.load_model and self.model_control != EXPLICIT:
            raise ValueError(f"load_model applies to model_control=explicit (model_control is {self.model_control!r}, "
                             "which loads every model of model_dir)")
        if EVERY_MODEL in self.load_model and len(self.load_model) > 1:
            raise ValueError(f"load_model {EVERY_MODEL!r} (every model) goes alone; got {self.load_model}")
        return self

    @model_validator(mode="after")
    def _state_store_known(self) -> Settings:
        if self.state_store != MEMORY and urlsplit(self.state_store).scheme not in REDIS_SCHEMES:
            raise ValueError(f"state_store must be {MEMORY!r} or a URL with scheme {', '.join(REDIS_SCHEMES)}; "
                             f"got {redacted_url(self.state_store)!r}")
        if self.snapshot_path is not None and self.state_store != MEMORY:
            raise ValueError("snapshot_path applies to the memory store only: Redis keeps the sessions itself; "
                             "unset one of snapshot_path and state_store")
        return self

    @model_validator(mode="after")
    def _tls_complete(self) -> Settings:
        if (self.tls_cert_path is None) != (self.tls_key_path is None):
            raise ValueError("tls_cert_path and tls_key_path go together: set both for TLS, or neither")
        if self.tls_client_ca_path is not None and self.tls_cert_path is None:
            raise ValueError("tls_client_ca_path (mutual TLS) needs the server's own tls_cert_path and tls_key_path")
        return self

    @model_validator(mode="after")
    def _ttl_within_bound(self) -> Settings:
        if self.session_ttl_seconds > self.max_session_ttl_seconds:
            raise ValueError(
                f"session_ttl_seconds ({self.session_ttl_seconds}) exceeds "
                f"max_session_ttl_seconds ({self.max_session_ttl_seconds})"
            )
        return self


class SettingsError(ValueError):
    """Settings failed validation; the message lists each bad field in words."""


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"]) or "settings"
        if field in SECRET_FIELDS or not item["loc"]:  # a model-level check: its message says what it may
            lines.append(f"{field}: {item['msg']}")
        else:
            lines.append(f"{field}: {item['msg']} (got {item.get('input')!r})")
    return "; ".join(lines)


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment with `overrides` on top, or SettingsError."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        raise SettingsError(_describe(exc)) from None


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One --flag per setting, documented with its env variable and default."""
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = f"CELLSTREAM_{name.upper()}"
        many = get_origin(field.annotation) is list  # a flag that may be repeated
        parser.add_argument(
            flag, dest=name, default=None, metavar=name.split("_")[-1].upper(), action="append" if many else "store",
            help=f"{field.description} [env {env}; default {field.default}]",
        )
