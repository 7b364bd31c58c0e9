"""All server settings in one object: environment `CELLSTREAM_*`, overridden by CLI flags."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CELLSTREAM_", extra="forbid", use_attribute_docstrings=True)

    host: str = "0.0.0.0"
    """Address the gRPC server binds."""
    port: int = Field(50051, ge=0, le=65535)
    """gRPC port (both APIs and health); 0 picks a free port."""
    metrics_host: str = "0.0.0.0"
    """Address the Prometheus /metrics HTTP server binds."""
    metrics_port: int = Field(8000, ge=0, le=65535)
    """Prometheus /metrics port; 0 picks a free port."""
    model_dir: Path = Path("model/artifacts")
    """Directory of .onnx models; each is served under its file stem."""
    default_model: str = ""
    """Model used when a request names none; empty: the only model, or `cellstream-chat`."""
    ort_intra_op_threads: int = Field(2, ge=1, le=256)
    """onnxruntime intra-op threads per model."""
    max_batch_size: int = Field(256, ge=1, le=4096)
    """Most session steps run in one onnxruntime call."""
    max_queue_size: int = Field(4096, ge=1)
    """Most steps waiting per model; past it new steps get RESOURCE_EXHAUSTED."""
    max_sessions: int = Field(100_000, ge=1)
    """Most live sessions in the store."""
    when_full: Literal["evict", "reject"] = "evict"
    """At max_sessions: evict the least recently used idle session, or reject with RESOURCE_EXHAUSTED."""
    session_ttl_seconds: float = Field(1800.0, gt=0)
    """Idle time-to-live of a session when the client asks for none."""
    max_session_ttl_seconds: float = Field(86_400.0, gt=0)
    """Longest idle time-to-live a client may ask for."""
    sweep_interval_seconds: float = Field(5.0, gt=0)
    """How often expired sessions are swept out (they are also refused on access)."""
    max_tokens_per_request: int = Field(4096, ge=1)
    """Most tokens (or feature vectors) in one step."""
    max_generate_tokens: int = Field(512, ge=1)
    """Most tokens one Generate call may sample; also its default."""
    max_message_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    """Largest gRPC message received or sent."""
    shutdown_grace_seconds: float = Field(10.0, ge=0)
    """On SIGTERM, how long in-flight calls get to finish."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Logging level."""

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
        parser.add_argument(
            flag, dest=name, default=None, metavar=name.split("_")[-1].upper(),
            help=f"{field.description} [env {env}; default {field.default}]",
        )
