"""Whether the server traces, read from the standard OpenTelemetry variables; the tracing itself is in
telemetry.py, imported only then (the `tracing` extra: without it installed the server runs as before).

Tracing is off unless OTEL_* asks for it: an OTLP endpoint (OTEL_EXPORTER_OTLP_ENDPOINT or
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT), or OTEL_TRACES_EXPORTER naming exporters. OTEL_SDK_DISABLED=true, or
OTEL_TRACES_EXPORTER=none, keeps it off whatever else is set.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from cellstream.service.errors import TracingError

if TYPE_CHECKING:
    from cellstream.service.telemetry import Telemetry

ENDPOINTS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
EXTRA_MISSING = ("OpenTelemetry is not installed: install the tracing extra (pip install 'cellstream[tracing]'), "
                 "or unset the OTEL_* variables")


def exporter_names(environ: Mapping[str, str]) -> list[str]:
    """The trace exporters OTEL_* asks for ([] when tracing is off)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    named = [name.strip() for name in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if name.strip()]
    if named:
        return [] if named == ["none"] else named
    return ["otlp"] if any(environ.get(name, "").strip() for name in ENDPOINTS) else []


def start_tracing(environ: Mapping[str, str] | None = None) -> Telemetry | None:
    """The server's tracing as OTEL_* configures it, or None when it is off; TracingError when the variables
    ask for what cannot be done (the extra missing, an unknown exporter, protocol or sampler)."""
    environ = os.environ if environ is None else environ
    exporters = exporter_names(environ)
    if not exporters:
        return None
    try:
        from cellstream.service.telemetry import Telemetry
    except ImportError as exc:
        if not (exc.name or "").startswith("opentelemetry"):
            raise
        variables = sorted(name for name in environ if name.startswith("OTEL_"))
        raise TracingError(f"tracing is configured ({', '.join(variables)}), but {EXTRA_MISSING}") from None
    return Telemetry.from_environment(environ, exporters)
