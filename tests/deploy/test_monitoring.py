"""The Grafana dashboard and the alert rules against the code: every metric they read is exported by a
live server, with the labels they use; label values are real RPC names and status codes; every alert
has its runbook in docs/OPERATIONS.md."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from pathlib import Path

import grpc
import promql_parser
import pytest
from kustomize_subset import load_documents
from manifests import DEPLOY, REPO, find
from prometheus_client.parser import text_string_to_metric_families

from cellstream.bench.server import free_ports
from cellstream.service._proto.cellstream.v1 import inference_pb2
from cellstream.service._proto.cellstream.v1 import inference_pb2 as pb
from cellstream.service._proto.cellstream.v1 import inference_pb2_grpc as pb_grpc
from cellstream.service._proto.inference import grpc_service_pb2
from cellstream.service.config import load_settings
from cellstream.service.registry import DRAINING, READY
from cellstream.service.server import start_server

DASHBOARD = DEPLOY / "grafana" / "cellstream.json"
RULES = DEPLOY / "prometheus" / "rules.yaml"
# Grafana's variables, replaced by what they stand for so the expressions parse as PromQL.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$namespace": ".*"}
# Labels Prometheus attaches to every scraped series (target labels), not exported by the server.
TARGET_LABELS = {"namespace", "pod", "job", "instance", "service", "endpoint", "container"}
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
# What the dashboard must show (issue 7): calls and errors by code, latency, batch size, queue wait,
# onnxruntime compute, active sessions, expirations and evictions, session store errors; (issue 16) the
# HTTP port's requests and latency by route; (issue 27) sessions, steps, states and events per model version.
DASHBOARD_METRICS = {"cellstream_requests_total", "cellstream_request_duration_seconds_bucket",
                     "cellstream_http_requests_total", "cellstream_http_request_duration_seconds_bucket",
                     "cellstream_batch_size_bucket", "cellstream_queue_wait_seconds_bucket",
                     "cellstream_compute_seconds_bucket", "cellstream_sessions_active",
                     "cellstream_sessions_expired_total", "cellstream_sessions_evicted_total",
                     "cellstream_model_version_sessions", "cellstream_model_version_steps_total",
                     "cellstream_model_version_state", "cellstream_model_events_total"}
ALERTS = {"CellstreamHighErrorRatio", "CellstreamHighLatencyP99", "CellstreamSessionsNearCapacity",
          "CellstreamStateStoreUnavailable", "CellstreamModelVersionDrainingTooLong"}


def rpc_methods() -> dict[str, bool]:
    """Every RPC the server serves -> whether it streams (its duration is then a conversation's)."""
    services = [*inference_pb2.DESCRIPTOR.services_by_name.values(),
                *grpc_service_pb2.DESCRIPTOR.services_by_name.values()]
    return {m.name: m.client_streaming or m.server_streaming for s in services for m in s.methods}


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            expressions.append(re.fullmatch(r"label_values\((\w+), \w+\)", variable["definition"]).group(1))
    return expressions


def rules() -> list[dict]:
    [rule_object] = load_documents(RULES)
    return [rule for group in rule_object["spec"]["groups"] for rule in group["rules"]]


def parse(expression: str) -> promql_parser.Expr:
    for variable, value in GRAFANA_VARIABLES.items():
        expression = expression.replace(variable, value)
    return promql_parser.parse(expression)


def nodes(expression: promql_parser.Expr, kind: type) -> list:
    found = []

    def visit(node: object) -> bool:
        if isinstance(node, kind):
            found.append(node)
        return True

    promql_parser.walk(expression, visit)
    return found


def selectors(expression: str) -> list[promql_parser.VectorSelector]:
    return nodes(parse(expression), promql_parser.VectorSelector)


def all_expressions() -> list[tuple[str, str]]:
    """(where, PromQL) of every dashboard query and alert."""
    return [(f"dashboard: {e}", e) for e in dashboard_expressions()] + [(f"alert {r['alert']}", r["expr"])
                                                                       for r in rules()]


def all_selectors() -> list[tuple[str, promql_parser.VectorSelector]]:
    return [(where, s) for where, expression in all_expressions() for s in selectors(expression)]


@pytest.fixture
async def exposition(tiny_model_dir: Path) -> str:
    """/metrics of a live server on 127.0.0.1 after a workload that gives every labelled series a sample
    (a labelled metric shows its labels only then): sessions opened, stepped and closed, a call refused
    for overload, a step dropped for a full queue, and an HTTP request."""
    [http_port] = free_ports(1)
    settings = load_settings(host="127.0.0.1", port=0, metrics_host="127.0.0.1", metrics_port=0, http_port=http_port,
                             model_dir=tiny_model_dir, default_model="tiny-chat", ort_intra_op_threads=1,
                             max_inflight_requests=1, max_queue_size=1)
    running = await asyncio.wait_for(start_server(settings), 60)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.InferenceStub(channel)

            def step(session_id: str, *tokens: int) -> pb.StepRequest:
                return pb.StepRequest(session_id=session_id, tokens=pb.TokenSequence(ids=tokens))

            sessions = [(await stub.OpenSession(pb.OpenSessionRequest())).session_id for _ in range(2)]
            await stub.Step(step(sessions[0], 1, 2, 3))
            stream = stub.StreamSteps()  # an open stream holds the one in-flight slot
            await stream.write(step(sessions[0], 4))
            await stream.read()
            with pytest.raises(grpc.aio.AioRpcError, match="max_inflight_requests"):
                await stub.ListModels(pb.ListModelsRequest())
            await stream.done_writing()
            assert await stream.code() == grpc.StatusCode.OK
            # Two steps in one message, room in the queue for one: the other is dropped (queue_full).
            result = await stub.StepMany(pb.StepBatch(items=[step(sid, 5) for sid in sessions]))
            assert sorted(item.WhichOneof("outcome") for item in result.items) == ["error", "response"]
            for session_id in sessions:
                await stub.CloseSession(pb.SessionRef(session_id=session_id))

        def fetch_models() -> int:
            with urllib.request.urlopen(f"http://127.0.0.1:{running.http_port}/v1/models", timeout=10) as response:
                return response.status

        assert await asyncio.to_thread(fetch_models) == 200

        def fetch() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=10) as response:
                return response.read().decode()

        return await asyncio.to_thread(fetch)
    finally:
        await asyncio.wait_for(running.stop(0), 30)


def test_dashboard_is_importable_and_shows_what_operators_need():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    for panel in dashboard["panels"]:
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"} and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
        for target in panel["targets"]:
            used = set(re.findall(r"\$(\w+)", target["expr"])) - {"__rate_interval"}
            assert used <= variables, panel["title"]
    used = {s.name for e in dashboard_expressions() for s in selectors(e)}
    assert DASHBOARD_METRICS - used == set()


async def test_every_metric_the_dashboard_and_alerts_read_is_exported(exposition):
    families = list(text_string_to_metric_families(exposition))
    exported = {family.name + suffix for family in families for suffix in SUFFIXES.get(family.type, ("",))}
    labels: dict[str, set[str]] = {}
    for family in families:
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    for where, selector in all_selectors():
        assert selector.name in exported, f"{where}: {selector.name} is not exported by the server"
        # The workload gave every series a sample, so its labels are known: none is checked by default.
        assert selector.name in labels, f"{where}: {selector.name} has no sample after the workload"
        used = {m.name for m in selector.matchers.matchers} - TARGET_LABELS
        assert used <= labels[selector.name], f"{where}: {selector.name} lacks {used - labels[selector.name]}"
    for where, expression in all_expressions():
        for aggregation in nodes(parse(expression), promql_parser.AggregateExpr):
            if aggregation.modifier is None:
                continue
            below = {s.name for s in nodes(aggregation.expr, promql_parser.VectorSelector)}
            available = set().union(*(labels[name] for name in below))
            grouped = set(aggregation.modifier.labels) - TARGET_LABELS
            assert grouped <= available, f"{where}: grouped by {grouped - available}, which {below} lack"


def test_label_values_are_real_rpc_methods_status_codes_and_version_states():
    methods = rpc_methods()
    codes = {code.name for code in grpc.StatusCode}
    for where, selector in all_selectors():
        for matcher in selector.matchers.matchers:
            values = set(matcher.value.split("|"))
            if matcher.name == "method":
                assert values <= set(methods), f"{where}: no RPC named {values - set(methods)}"
                if matcher.op == promql_parser.MatchOp.NotRe:  # latency of unary calls: every stream left out
                    assert values == {name for name, streams in methods.items() if streams}, where
            if matcher.name == "code":
                assert values <= codes, f"{where}: {values - codes} are not gRPC status codes"
            if matcher.name == "state":
                assert values <= {READY, DRAINING}, f"{where}: {values - {READY, DRAINING}} is no state a loaded " \
                                                    "model version has"


def test_the_capacity_alert_uses_the_configured_max_sessions(rendered):
    [rule] = [r for r in rules() if r["alert"] == "CellstreamSessionsNearCapacity"]
    threshold = promql_parser.parse(rule["expr"]).rhs
    for variant, resources in rendered.items():
        max_sessions = float(find(resources, "ConfigMap", "cellstream-config")["data"]["CELLSTREAM_MAX_SESSIONS"])
        assert threshold.rhs.val == max_sessions, variant
        assert 0.5 <= threshold.lhs.val < 1


def test_every_alert_has_a_runbook_in_operations_md():
    headings = re.findall(r"^#{2,4} (.+)$", (REPO / "docs" / "OPERATIONS.md").read_text(), re.MULTILINE)
    anchors = {re.sub(r"[^a-z0-9 _-]", "", h.strip().lower()).replace(" ", "-") for h in headings}
    assert {r["alert"] for r in rules()} == ALERTS
    for rule in rules():
        document, _, anchor = rule["annotations"]["runbook"].partition("#")
        assert document == "docs/OPERATIONS.md" and anchor == rule["alert"].lower()
        assert anchor in anchors, f"no section `{rule['alert']}` in docs/OPERATIONS.md"
