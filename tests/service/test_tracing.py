"""OpenTelemetry tracing against a real OTLP receiver (bench/otlp.py: opentelemetry-proto's TraceService on a
free port): in-process servers started with OTEL_* in their environment, the generated stubs on real ports (a
call's metadata carries the caller's `traceparent`)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import secrets

import grpc
import httpx
import numpy as np
import pytest
from tritonclient.grpc import InferInput
from tritonclient.grpc import aio as triton_aio

from cellstream.bench.otlp import ReceivedSpan, TraceSink
from cellstream.bench.server import free_ports
from cellstream.service import logs
from cellstream.service._proto.cellstream.v1 import inference_pb2 as pb
from cellstream.service.errors import TracingError
from cellstream.service.tracing import EXTRA_MISSING, exporter_names, start_tracing

pytestmark = pytest.mark.timeout(120)
CHAT = "tiny-chat"
STEP = "cellstream.v1.Inference/Step"
SERVER, CLIENT = 2, 3  # opentelemetry.proto.trace.v1.Span.SpanKind
ERROR = 2  # Status.StatusCode


@pytest.fixture
def sink():
    with TraceSink() as receiver:
        yield receiver


@pytest.fixture
def traced(monkeypatch, sink):
    """traced(protocol="grpc", **otel) -> set OTEL_* so the next server started exports to `sink`."""

    def _traced(protocol: str = "grpc", **otel: str) -> None:
        endpoint = sink.grpc_endpoint if protocol == "grpc" else sink.http_endpoint
        variables = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
                     "OTEL_BSP_SCHEDULE_DELAY": "50", **otel}
        for name, value in variables.items():
            monkeypatch.setenv(name, value)

    return _traced


def traceparent() -> tuple[str, str, str]:
    """A client's trace id, span id and the W3C header carrying them (sampled)."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


def named(spans: list[ReceivedSpan], name: str) -> list[ReceivedSpan]:
    return [span for span in spans if span.name == name]


async def test_a_batched_step_of_8_sessions_is_one_batch_span_linking_the_8_request_spans(traced, sink, start, gate,
                                                                                           connect, step):
    traced()
    running = await start()
    held = gate(running)
    stub = connect(running)
    blocker = (await stub.OpenSession(pb.OpenSessionRequest(), timeout=30)).session_id
    ids = [(await stub.OpenSession(pb.OpenSessionRequest(), timeout=30)).session_id for _ in range(8)]
    callers = [traceparent() for _ in ids]
    first = asyncio.ensure_future(stub.Step(step(blocker, tokens=[1]), timeout=30))
    await asyncio.to_thread(held.running.wait, 30)  # the model is busy: the 8 steps queue together
    steps = [asyncio.ensure_future(stub.Step(step(sid, tokens=[7]), timeout=30, metadata=(("traceparent", header),)))
             for sid, (_, _, header) in zip(ids, callers, strict=True)]
    batcher = running.dataplane.batchers[CHAT]
    while batcher.queued < 8:
        await asyncio.sleep(0.005)
    held.open.set()
    await first
    await asyncio.gather(*steps)

    def complete(spans: list[ReceivedSpan]) -> bool:
        return len(named(spans, STEP)) == 9 and any(s.attributes.get("cellstream.batch.size") == 8 for s in spans)

    spans = await asyncio.to_thread(sink.wait_for, complete)
    requests = {span.attributes["cellstream.session_id"]: span for span in named(spans, STEP)}
    [batch] = [span for span in named(spans, "cellstream.batch") if span.attributes["cellstream.batch.size"] == 8]
    for sid, (trace_id, parent_id, _) in zip(ids, callers, strict=True):
        span = requests[sid]  # the client's span is its parent: same trace
        assert (span.trace_id, span.parent_id, span.kind) == (trace_id, parent_id, SERVER)
        assert span.attributes["cellstream.model"] == CHAT and span.attributes["cellstream.tokens"] == 1
        assert span.attributes["rpc.response.status_code"] == "OK" and span.status_code != ERROR
    # One root span for the batch, in a trace of its own, linking each request span it carried and no other.
    assert batch.parent_id == "" and batch.trace_id not in {trace_id for trace_id, _, _ in callers}
    assert {(link.trace_id, link.span_id) for link in batch.links} == {
        (requests[sid].trace_id, requests[sid].span_id) for sid in ids}
    assert batch.attributes["cellstream.model"] == CHAT and batch.attributes["cellstream.batch.steps"] == 1
    # They waited for the blocker's batch: a queue wait, and onnxruntime's own time.
    assert batch.attributes["cellstream.batch.queue_wait_max_seconds"] > 0
    assert batch.attributes["cellstream.batch.queue_wait_max_seconds"] >= \
        batch.attributes["cellstream.batch.queue_wait_mean_seconds"] > 0
    assert 0 < batch.attributes["cellstream.batch.onnxruntime_seconds"] < 10
    assert batch.resource["service.name"] == "cellstream" and batch.protocol == "grpc"


async def test_a_clients_trace_reaches_the_request_spans_of_both_apis_on_both_ports(traced, sink, start, connect):
    traced("http/protobuf")
    [http_port] = free_ports(1)
    running = await start(http_port=http_port)
    trace_grpc, span_grpc, header_grpc = traceparent()
    trace_http, span_http, header_http = traceparent()
    trace_kserve, span_kserve, header_kserve = traceparent()
    trace_turn, _, header_turn = traceparent()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}", timeout=30) as http:
        opened = (await http.post("/v1/sessions", json={})).json()["session_id"]
        stepped = await http.post(f"/v1/sessions/{opened}/step", json={"text": "hi"},
                                  headers={"traceparent": header_http})
        assert stepped.status_code == 200
        assert (await http.get("/v2/health/ready")).status_code == 200
    triton = triton_aio.InferenceServerClient(f"127.0.0.1:{running.port}")
    try:
        tokens = InferInput("tokens", [1, 2], "INT64")
        tokens.set_data_from_numpy(np.array([[104, 105]], np.int64))
        await triton.infer(CHAT, [tokens], sequence_id=5, sequence_start=True, headers={"traceparent": header_kserve})
    finally:
        await triton.close()
    stub = connect(running)
    await stub.GetState(pb.SessionRef(session_id=opened), timeout=30, metadata=(("traceparent", header_grpc),))
    before = (await stub.GetState(pb.SessionRef(session_id=opened), timeout=30)).position
    turn = [chunk async for chunk in stub.Generate(pb.GenerateRequest(session_id=opened, prompt="ok", max_tokens=6),
                                                   timeout=30, metadata=(("traceparent", header_turn),))]

    def complete(spans: list[ReceivedSpan]) -> bool:
        return {trace_grpc, trace_http, trace_kserve, trace_turn} <= {span.trace_id for span in spans}

    spans = await asyncio.to_thread(sink.wait_for, complete)
    [http_step] = [s for s in spans if s.trace_id == trace_http and s.kind == SERVER]
    assert http_step.name == "POST /v1/sessions/{session_id}/step" and http_step.parent_id == span_http
    assert http_step.attributes["http.response.status_code"] == 200
    assert http_step.attributes["cellstream.session_id"] == opened and http_step.attributes["cellstream.tokens"] == 2
    [infer] = [s for s in spans if s.trace_id == trace_kserve and s.kind == SERVER]
    assert infer.name == "inference.GRPCInferenceService/ModelInfer" and infer.parent_id == span_kserve
    assert infer.attributes["cellstream.tokens"] == 2 and infer.attributes["cellstream.model"] == CHAT
    [state] = [s for s in spans if s.trace_id == trace_grpc]
    assert state.name == "cellstream.v1.Inference/GetState" and state.parent_id == span_grpc
    assert state.attributes["cellstream.session_id"] == opened
    # A chat turn's span counts every token its steps fed: the prompt's, then each sampled one's.
    [generate] = [s for s in spans if s.trace_id == trace_turn]
    assert generate.attributes["cellstream.tokens"] == turn[-1].position - before > 2
    assert {span.protocol for span in spans} == {"http"}
    # Health probes make no span (as gRPC's health and reflection make none).
    assert not [s for s in spans if "health" in s.name]


async def test_redis_operations_are_children_of_the_request_or_batch_that_caused_them(traced, sink, start,
                                                                                      redis_server, connect, step):
    traced()
    running = await start(state_store=redis_server.url)
    trace_id, _, header = traceparent()
    stub = connect(running)
    sid = (await stub.OpenSession(pb.OpenSessionRequest(), timeout=30)).session_id
    await stub.Step(step(sid, tokens=[1, 2, 3]), timeout=30, metadata=(("traceparent", header),))

    def complete(spans: list[ReceivedSpan]) -> bool:
        return len(named(spans, "redis COMMIT")) >= 1 and len(named(spans, "redis CREATE")) == 1

    spans = await asyncio.to_thread(sink.wait_for, complete)
    by_id = {span.span_id: span for span in spans}
    [step] = [s for s in named(spans, STEP) if s.trace_id == trace_id]
    [batch] = [s for s in named(spans, "cellstream.batch") if (trace_id, step.span_id) in
               {(link.trace_id, link.span_id) for link in s.links}]
    # Step reads its session (a LOAD under the request); the batch loads and commits (under the batch).
    assert {by_id[s.parent_id].name for s in spans if s.name == "redis LOAD"} >= {STEP, "cellstream.batch"}
    [commit] = [s for s in named(spans, "redis COMMIT") if s.parent_id == batch.span_id]
    assert commit.kind == CLIENT and commit.trace_id == batch.trace_id
    assert commit.attributes["db.system.name"] == "redis" and commit.attributes["cellstream.sessions"] == 1
    assert commit.attributes["server.port"] == redis_server.port
    [create] = named(spans, "redis CREATE")
    assert by_id[create.parent_id].name == "cellstream.v1.Inference/OpenSession"
    # The store's probe and sweep run for no request: no span (they run every second).
    assert not named(spans, "redis PING") and not named(spans, "redis SWEEP")


async def test_a_sampled_caller_is_traced_with_its_batches_and_the_others_not_at_all(traced, sink, start, connect,
                                                                                      step):
    traced(OTEL_TRACES_SAMPLER="parentbased_traceidratio", OTEL_TRACES_SAMPLER_ARG="0")
    running = await start()
    trace_id, _, header = traceparent()
    stub = connect(running)
    sid = (await stub.OpenSession(pb.OpenSessionRequest(), timeout=30)).session_id
    for _ in range(5):  # no parent: the ratio 0 draws none of them, nor their batches
        await stub.Step(step(sid, tokens=[4]), timeout=30)
    await stub.Step(step(sid, tokens=[5]), timeout=30, metadata=(("traceparent", header),))
    await stub.Step(step(sid, tokens=[6]), timeout=30,
                    metadata=(("traceparent", header[:-2] + "00"),))  # the caller's: not sampled

    spans = await asyncio.to_thread(sink.wait_for, lambda spans: len(spans) >= 2)
    await asyncio.sleep(0.3)  # anything else would have come by now (50 ms export delay)
    spans = sink.spans
    [step] = named(spans, STEP)
    [batch] = named(spans, "cellstream.batch")
    assert step.trace_id == trace_id and [(link.trace_id, link.span_id) for link in batch.links] == [
        (trace_id, step.span_id)]
    assert len(spans) == 2, [span.name for span in spans]


async def test_each_outcome_is_on_its_span(traced, sink, start, tmp_path, connect, step):
    traced()
    tokens = tmp_path / "tokens"
    tokens.write_text("alice s3cret-s3cret-s3cret\n")
    running = await start(auth_token_file=tokens)
    stub = connect(running)
    alice, stranger = ((("authorization", f"Bearer {token}"),) for token in ("s3cret-s3cret-s3cret",
                                                                               "wrong-wrong-wrong-wrong"))
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.Step(step("no-such-session", tokens=[1]), timeout=30, metadata=alice)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await stub.OpenSession(pb.OpenSessionRequest(model="no-such-model"), timeout=30, metadata=alice)
    assert invalid.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.ListModels(pb.ListModelsRequest(), timeout=30, metadata=stranger)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    spans = await asyncio.to_thread(sink.wait_for, lambda spans: len(spans) >= 3)
    outcomes = {span.name: (span.attributes["rpc.response.status_code"], span.status_code) for span in spans}
    # The caller's mistakes are answered as designed: a status code, not an error of the server.
    assert outcomes == {STEP: ("NOT_FOUND", 0), "cellstream.v1.Inference/OpenSession": ("NOT_FOUND", 0),
                        "cellstream.v1.Inference/ListModels": ("UNAUTHENTICATED", 0)}
    assert named(spans, STEP)[0].attributes.get("cellstream.session_id") is None  # no such session to name


async def test_an_internal_error_is_an_error_span_and_its_log_line_carries_the_trace_id(traced, sink, start, connect,
                                                                                       step):
    traced()
    running = await start()
    stream = io.StringIO()
    handler = logs.handler("json", stream)
    batcher_log = logging.getLogger("cellstream.service.batcher")
    batcher_log.addHandler(handler)

    def broken(*args: object) -> None:
        raise RuntimeError("the model broke")

    running.dataplane.batchers[CHAT].engine.run = broken
    try:
        stub = connect(running)
        sid = (await stub.OpenSession(pb.OpenSessionRequest(), timeout=30)).session_id
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await stub.Step(step(sid, tokens=[1]), timeout=30)
        assert failed.value.code() == grpc.StatusCode.INTERNAL
    finally:
        batcher_log.removeHandler(handler)
    spans = await asyncio.to_thread(sink.wait_for,
                                    lambda spans: named(spans, STEP) and named(spans, "cellstream.batch"))
    [step], [batch] = named(spans, STEP), named(spans, "cellstream.batch")
    assert step.attributes["rpc.response.status_code"] == "INTERNAL" and step.status_code == ERROR
    assert batch.status_code == ERROR
    [line] = [json.loads(text) for text in stream.getvalue().splitlines()]
    assert line["level"] == "ERROR" and "batch of 1 entries on version 1 of model 'tiny-chat' failed" in line["message"]
    assert (line["trace_id"], line["span_id"]) == (batch.trace_id, batch.span_id)
    assert "RuntimeError: the model broke" in line["exception"]


def test_tracing_is_off_unless_otel_variables_ask_for_it():
    assert exporter_names({}) == [] and start_tracing({}) is None
    assert exporter_names({"OTEL_SERVICE_NAME": "x", "OTEL_TRACES_SAMPLER": "always_on"}) == []
    assert exporter_names({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}) == ["otlp"]
    assert exporter_names({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}) == ["otlp"]
    assert exporter_names({"OTEL_TRACES_EXPORTER": "console,otlp"}) == ["console", "otlp"]
    assert exporter_names({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}) == []
    assert exporter_names({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}) == []


@pytest.mark.parametrize(("variables", "words"), [
    ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER names 'zipkin'; this server exports with otlp, "
                                         "console or none"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
     "the OTLP protocol is 'http/json'"),
    ({"OTEL_TRACES_EXPORTER": "console", "OTEL_TRACES_SAMPLER": "sometimes"}, "OTEL_TRACES_SAMPLER is 'sometimes'"),
    ({"OTEL_TRACES_EXPORTER": "console", "OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"},
     "OTEL_TRACES_SAMPLER_ARG is '2'; traceidratio needs a ratio between 0 and 1"),
])
def test_what_cannot_be_traced_is_refused_at_start_with_what_to_change(variables, words):
    with pytest.raises(TracingError, match="^" + words.replace("(", r"\(").replace("[", r"\[")):
        start_tracing(variables)


def test_without_the_extra_tracing_asked_for_is_refused_naming_the_extra(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "opentelemetry", None)  # as if not installed
    monkeypatch.delitem(__import__("sys").modules, "cellstream.service.telemetry", raising=False)
    with pytest.raises(TracingError) as refused:
        start_tracing({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"})
    assert str(refused.value) == f"tracing is configured (OTEL_EXPORTER_OTLP_ENDPOINT), but {EXTRA_MISSING}"


def test_the_service_is_named_by_the_otel_variables_or_cellstream():
    from cellstream.service.telemetry import resource_from

    assert resource_from({}).attributes["service.name"] == "cellstream"
    assert resource_from({"OTEL_SERVICE_NAME": "chat-eu"}).attributes["service.name"] == "chat-eu"
    resource = resource_from({"OTEL_RESOURCE_ATTRIBUTES": "service.name=chat%20eu, deployment.environment=prod"})
    assert (resource.attributes["service.name"], resource.attributes["deployment.environment"]) == ("chat eu", "prod")
    both = {"OTEL_RESOURCE_ATTRIBUTES": "service.name=a", "OTEL_SERVICE_NAME": "b"}
    assert resource_from(both).attributes["service.name"] == "b"  # the specification's precedence


def test_text_log_lines_made_inside_a_span_end_with_its_ids():
    telemetry = start_tracing({"OTEL_TRACES_EXPORTER": "console"})
    assert telemetry is not None
    stream = io.StringIO()
    handler = logs.handler("text", stream)
    logger = logging.getLogger("tests.tracing.text")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        logger.info("outside")
        with telemetry.server_span("a call", {}, {}) as span:
            logger.info("inside")
    finally:
        logger.removeHandler(handler)
        telemetry.shutdown()
    outside, inside = stream.getvalue().splitlines()
    ids = span.get_span_context()
    assert outside.endswith("INFO tests.tracing.text: outside")
    assert inside.endswith(f"INFO tests.tracing.text: inside trace_id={ids.trace_id:032x} span_id={ids.span_id:016x}")
