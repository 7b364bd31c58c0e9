"""The server's OpenTelemetry traces (the `tracing` extra; service/tracing.py decides whether they are on).

- A SERVER span per API call, gRPC (both APIs, opened by api/traced.py) and HTTP (api/http/endpoint.py), child
  of the caller's trace when its gRPC metadata or HTTP headers carry one (`traceparent`, W3C trace context;
  OTEL_PROPAGATORS picks others). It names the session, model and tokens its steps fed, and its status.
- A span per batch of the batcher, a root span with a LINK to each request span it carries (a batch serves
  many callers, so it is no one's child), with its size, length, queue waits and onnxruntime time.
- A CLIENT span per Redis operation, child of the request or batch that caused it (probes and sweeps, which
  no request caused, make none).

The provider is this server's own, not OpenTelemetry's global one: several servers in one process (tests)
keep their traces apart. Exporters (OTLP over gRPC or HTTP, console), the sampler and the resource come from
the standard OTEL_* variables; the OTLP exporters read their endpoint, headers, TLS and timeout themselves.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from importlib import metadata
from typing import Any
from urllib.parse import unquote

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import Link, Span, SpanContext, SpanKind, Status, StatusCode

from cellstream.service import logs
from cellstream.service.errors import TracingError

log = logging.getLogger(__name__)

SESSION_ID, MODEL, TOKENS, ITEMS = "cellstream.session_id", "cellstream.model", "cellstream.tokens", "cellstream.items"
BATCH_SPAN = "cellstream.batch"
PROTOCOLS = ("grpc", "http/protobuf")
DEFAULT_PROTOCOL = "http/protobuf"  # the OpenTelemetry specification's default for OTLP exporters
# gRPC server spans whose status is an error (OpenTelemetry's semantic conventions for RPC): the others
# (NOT_FOUND, INVALID_ARGUMENT, ...) are the caller's mistakes, answered as designed.
SERVER_ERRORS = frozenset({"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE",
                           "DATA_LOSS"})


def _installed_version() -> str:
    try:
        return metadata.version("cellstream")
    except metadata.PackageNotFoundError:
        return "unknown"


class LinkedBatchSampler(Sampler):
    """The configured sampler, except for batch spans: a batch is recorded when a request it carries was
    (its links say so), whatever the ratio. Without this a ratio sampler would draw batches at random, apart
    from the requests whose traces need them."""

    def __init__(self, inner: Sampler) -> None:
        self.inner = inner

    def should_sample(self, parent_context: otel_context.Context | None, trace_id: int, name: str,
                      kind: SpanKind | None = None, attributes: Any = None, links: Sequence[Link] | None = None,
                      trace_state: Any = None) -> SamplingResult:
        if name == BATCH_SPAN:
            sampled = any(link.context.trace_flags.sampled for link in links or ())
            return SamplingResult(Decision.RECORD_AND_SAMPLE if sampled else Decision.DROP, attributes)
        return self.inner.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

    def get_description(self) -> str:
        return f"LinkedBatchSampler{{{self.inner.get_description()}}}"


def sampler_from(environ: Mapping[str, str]) -> Sampler:
    """OTEL_TRACES_SAMPLER (default parentbased_always_on) and OTEL_TRACES_SAMPLER_ARG (a ratio in [0, 1])."""
    name = environ.get("OTEL_TRACES_SAMPLER", "").strip().lower() or "parentbased_always_on"
    fixed = {"always_on": ALWAYS_ON, "always_off": ALWAYS_OFF, "parentbased_always_on": ParentBased(ALWAYS_ON),
             "parentbased_always_off": ParentBased(ALWAYS_OFF)}
    if name in fixed:
        return fixed[name]
    if name not in ("traceidratio", "parentbased_traceidratio"):
        raise TracingError(f"OTEL_TRACES_SAMPLER is {name!r}; this server knows {', '.join(fixed)}, traceidratio "
                           "and parentbased_traceidratio")
    text = environ.get("OTEL_TRACES_SAMPLER_ARG", "1.0").strip() or "1.0"
    try:
        ratio = float(text)
    except ValueError:
        ratio = -1.0
    if not 0.0 <= ratio <= 1.0:
        raise TracingError(f"OTEL_TRACES_SAMPLER_ARG is {text!r}; {name} needs a ratio between 0 and 1")
    root = TraceIdRatioBased(ratio)
    return root if name == "traceidratio" else ParentBased(root)


def exporter_for(name: str, environ: Mapping[str, str]) -> SpanExporter:
    if name == "console":
        return ConsoleSpanExporter()
    if name != "otlp":
        raise TracingError(f"OTEL_TRACES_EXPORTER names {name!r}; this server exports with otlp, console or none")
    protocol = (environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or DEFAULT_PROTOCOL).strip()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    elif protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # type: ignore[assignment]
    else:
        raise TracingError(f"the OTLP protocol is {protocol!r} (OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL); this server "
                           f"speaks {' or '.join(PROTOCOLS)}")
    return OTLPSpanExporter()


def resource_from(environ: Mapping[str, str]) -> Resource:
    """OTEL_RESOURCE_ATTRIBUTES (`key=value,...`, values percent-encoded) and OTEL_SERVICE_NAME over them; the
    service is `cellstream` when neither names it."""
    attributes: dict[str, str] = {SERVICE_NAME: "cellstream", SERVICE_VERSION: _installed_version()}
    for pair in environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, equals, value = pair.partition("=")
        if equals and key.strip():
            attributes[key.strip()] = unquote(value.strip())
    if environ.get("OTEL_SERVICE_NAME", "").strip():
        attributes[SERVICE_NAME] = environ["OTEL_SERVICE_NAME"].strip()
    return Resource.create(attributes)


class Telemetry:
    """The tracer of one server and the spans its parts open (see the module's docstring)."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("cellstream", _installed_version())

    @classmethod
    def from_environment(cls, environ: Mapping[str, str], exporters: Sequence[str]) -> Telemetry:
        provider = TracerProvider(sampler=LinkedBatchSampler(sampler_from(environ)), resource=resource_from(environ),
                                  shutdown_on_exit=False)
        for name in exporters:
            provider.add_span_processor(BatchSpanProcessor(exporter_for(name, environ)))
        logs.use_trace_ids(current_trace_ids)
        log.info("tracing on: exporters %s, sampler %s", ", ".join(exporters), provider.sampler.get_description())
        return cls(provider)

    def shutdown(self) -> None:
        """Export what is pending (blocks up to the exporters' timeout), then stop."""
        self.provider.shutdown()

    # --- request spans ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def server_span(self, name: str, carrier: Any, attributes: dict[str, Any]) -> Iterator[Span]:
        """A SERVER span, current until the block ends, child of the trace context `carrier` (gRPC metadata as
        a dict, HTTP headers) holds, if any."""
        parent = propagate.extract(carrier)
        span = self.tracer.start_span(name, parent, SpanKind.SERVER, attributes, record_exception=False,
                                      set_status_on_exception=False)
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        try:
            yield span
        finally:
            otel_context.detach(token)
            span.end()

    @staticmethod
    def grpc_outcome(span: Span, code: str) -> None:
        span.set_attribute("rpc.response.status_code", code)
        if code in SERVER_ERRORS:
            span.set_status(Status(StatusCode.ERROR, code))

    @staticmethod
    def http_outcome(span: Span, status: int) -> None:
        span.set_attribute("http.response.status_code", status)
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR))

    @staticmethod
    def failed(span: Span, error: BaseException) -> None:
        """The span's work failed with `error` (handled, so the span's own exit does not see it)."""
        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))

    @staticmethod
    def annotate(session_id: str, model: str) -> None:
        """Name the session (and its model) on the current request span."""
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attributes({SESSION_ID: session_id, MODEL: model})

    @staticmethod
    def note_steps(model: str, tokens: int, session_id: str | None = None, items: int = 0) -> SpanContext | None:
        """Steps queued by the current request: add them to its span; the span's context, for the batch's link,
        when it is sampled (None otherwise: no batch span needs it)."""
        span = trace.get_current_span()
        if not span.is_recording():
            return None
        attributes = span.attributes  # type: ignore[attr-defined]  # an SDK span: it records
        update: dict[str, Any] = {MODEL: model, TOKENS: attributes.get(TOKENS, 0) + tokens}
        if session_id is not None:
            update[SESSION_ID] = session_id
        if items:
            update[ITEMS] = attributes.get(ITEMS, 0) + items
        span.set_attributes(update)
        return span.get_span_context()

    # --- batch and store spans ----------------------------------------------------------------------

    @contextlib.contextmanager
    def batch_span(self, model: str, carried: Sequence[SpanContext | None]) -> Iterator[Span | None]:
        """A batch's span, current until the block ends, linking each distinct request span it carries; None
        (no span) when it carries no sampled request."""
        contexts = {context.span_id: context for context in carried if context is not None}
        if not contexts:
            yield None
            return
        span = self.tracer.start_span(BATCH_SPAN, otel_context.Context(), SpanKind.INTERNAL, {MODEL: model},
                                      [Link(context) for context in contexts.values()])
        with trace.use_span(span, end_on_exit=True):
            yield span

    @contextlib.contextmanager
    def store_span(self, operation: str, attributes: dict[str, Any]) -> Iterator[None]:
        """A store operation's CLIENT span (`attributes`: the store's, e.g. db.system.name), child of the current
        span; none when no recording span is current."""
        if not trace.get_current_span().is_recording():
            yield
            return
        with self.tracer.start_as_current_span(f"redis {operation}", kind=SpanKind.CLIENT,
                                               attributes={"db.operation.name": operation, **attributes}):
            yield


def current_trace_ids() -> tuple[str, str] | None:
    """(trace id, span id) of the current span in hex, for log records; None outside any."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"
