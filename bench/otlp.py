"""A real OTLP trace receiver on loopback, for the tracing tests and `make bench-instructions`'s traced figures.

It serves OpenTelemetry's collector protocol both ways an exporter speaks it: gRPC (the TraceService of
opentelemetry-proto's generated classes) and HTTP/protobuf (POST /v1/traces), keeps every span it receives,
and answers success. Threads, not asyncio: it serves a server under test in this process or another while the
caller's own event loop (or a blocking benchmark) runs. Needs the `tracing` extra.
"""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from cellstream.bench.server import free_ports


def plain(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [plain(v) for v in value.array_value.values]
    return None if kind is None else getattr(value, kind)


def attributes(pairs: list[KeyValue]) -> dict[str, Any]:
    return {pair.key: plain(pair.value) for pair in pairs}


@dataclass(frozen=True)
class Link:
    trace_id: str
    span_id: str
    attributes: dict[str, Any]


@dataclass(frozen=True)
class ReceivedSpan:
    """A span as the receiver got it: ids in lower-case hex ("" for no parent)."""

    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int  # opentelemetry.proto.trace.v1.Span.SpanKind
    attributes: dict[str, Any]
    links: list[Link]
    status_code: int  # opentelemetry.proto.trace.v1.Status.StatusCode: 0 unset, 1 ok, 2 error
    resource: dict[str, Any] = field(default_factory=dict)
    protocol: str = ""  # "grpc" or "http"


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, sink: TraceSink) -> None:
        self.sink = sink

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
               ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.sink.receive(request, "grpc")
        return trace_service_pb2.ExportTraceServiceResponse()


class TraceSink:
    """`with TraceSink() as sink:` the receiver on free ports: `sink.grpc_endpoint`, `sink.http_endpoint` (for
    OTEL_EXPORTER_OTLP_ENDPOINT), `sink.spans` (all so far), `sink.wait_for(predicate)`."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.requests = 0
        self._changed = threading.Condition()
        self.grpc_port, self.http_port = free_ports(2)
        self._grpc = grpc.server(ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self), self._grpc)
        self._grpc.add_insecure_port(f"127.0.0.1:{self.grpc_port}")
        self._http = http.server.ThreadingHTTPServer(("127.0.0.1", self.http_port), self._http_handler())
        self._http_thread = threading.Thread(target=self._http.serve_forever, name="otlp-http", daemon=True)

    @property
    def grpc_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.grpc_port}"

    @property
    def http_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def __enter__(self) -> TraceSink:
        self._grpc.start()
        self._http_thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._grpc.stop(0)
        self._http.shutdown()
        self._http.server_close()

    def _http_handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        sink = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.path != "/v1/traces":
                    self.send_error(404)
                    return
                sink.receive(trace_service_pb2.ExportTraceServiceRequest.FromString(body), "http")
                reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: object) -> None:  # quiet: tests read spans, not logs
                pass

        return Handler

    def receive(self, request: trace_service_pb2.ExportTraceServiceRequest, protocol: str) -> None:
        received = list(_flatten(request, protocol))
        with self._changed:
            self.requests += 1
            self.spans.extend(received)
            self._changed.notify_all()

    def wait_for(self, predicate: Callable[[list[ReceivedSpan]], bool], timeout: float = 20) -> list[ReceivedSpan]:
        """All spans so far, once `predicate` holds for them; AssertionError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(self.spans):
                left = deadline - time.monotonic()
                if left <= 0:
                    names = sorted({span.name for span in self.spans})
                    raise AssertionError(f"spans received ({len(self.spans)}: {names}) never satisfied the test")
                self._changed.wait(left)
            return list(self.spans)


def _flatten(request: trace_service_pb2.ExportTraceServiceRequest, protocol: str) -> Iterator[ReceivedSpan]:
    for resource_spans in request.resource_spans:
        resource = attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                yield ReceivedSpan(
                    span.name, span.trace_id.hex(), span.span_id.hex(), span.parent_span_id.hex(), span.kind,
                    attributes(span.attributes),
                    [Link(link.trace_id.hex(), link.span_id.hex(), attributes(link.attributes)) for link in span.links],
                    span.status.code, resource, protocol)
