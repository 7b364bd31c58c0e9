"""Bad input on every HTTP route gets the status a client expects and a message that says what to change,
and changes no state; a fuzz of the JSON bodies never gets anything but such an answer. The limits of the
gRPC port hold here too: max_message_bytes (413), the shared in-flight bound (429), deadlines (504); every
request is counted per route and status."""

from __future__ import annotations

import asyncio
import json

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cellstream.bench.server import free_ports
from cellstream.service._proto.cellstream.v1 import inference_pb2 as pb
from cellstream.service.sequences import sequence_key

CHAT = "tiny-chat"
INFER = f"/v2/models/{CHAT}/infer"
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
async def server(start):
    [port] = free_ports(1)
    return await start(http_port=port)


def tokens(*rows: list[int], **parameters: object) -> dict:
    body: dict = {"inputs": [{"name": "tokens", "datatype": "INT64", "shape": [len(rows), len(rows[0])],
                              "data": [list(r) for r in rows]}]}
    if parameters:
        body["parameters"] = parameters
    return body


class Live:
    """A session and a KServe sequence with state, to show that refused requests change neither."""

    def __init__(self, server, session_id: str) -> None:
        self.server, self.session_id = server, session_id

    async def snapshot(self) -> list[tuple[str, int, bytes, bytes]]:
        store = self.server.dataplane.store
        records = [await store.get(key) for key in (self.session_id, sequence_key(CHAT, "seq"))]
        return [(r.session_id, r.position, r.h.tobytes(), r.c.tobytes()) for r in records] + [store.count()]


@pytest.fixture
async def live(server, http, stub, warmed) -> Live:
    session_id = await warmed(stub)
    started = await http.post(INFER, json=tokens([1, 2, 3], sequence_id="seq", sequence_start=True))
    assert started.status_code == 200, started.text
    return Live(server, session_id)


def bad_requests(sid: str) -> list[tuple[str, str, object, dict, int, str]]:
    """(method, path, body (bytes: as is), headers, status, words the error must hold)."""
    step, state, unknown = f"/v1/sessions/{sid}/step", f"/v1/sessions/{sid}/state", "/v1/sessions/0123abcd"
    binary = json.dumps({"inputs": [{"name": "tokens", "datatype": "INT64", "shape": [1, 2],
                                     "parameters": {"binary_data_size": 16}}]}).encode()
    return [
        ("POST", INFER, b"{bad", {}, 400, "is not JSON"),
        ("POST", INFER, b"[" * 100_000 + b"]" * 100_000, {}, 400, "nests arrays or objects too deeply"),
        ("POST", INFER, [], {}, 400, "must be a JSON object"),
        ("POST", INFER, {"inputs": []}, {}, 400, '"inputs"'),
        ("POST", INFER, {"inputs": [{"name": "tokens", "datatype": "INT64", "shape": [1, 2], "data": [1, 2, 3]}]},
         {}, 400, "has 3 values"),
        ("POST", INFER, {"inputs": [{"name": "tokens", "datatype": "FP32", "shape": [1, 1], "data": [1.0]}]}, {},
         400, "datatype 'FP32'"),
        ("POST", INFER, {"inputs": [{"name": "tokens", "datatype": "INT64", "shape": [1, 1], "data": [1.5]}]}, {},
         400, "INT64 data are integers"),
        ("POST", INFER, {"inputs": [{"name": "tokens", "datatype": "INT64", "shape": "1x1", "data": [1]}]}, {},
         400, "shape must be an array"),
        ("POST", INFER, {"inputs": [{"name": "tokenz", "datatype": "INT64", "shape": [1, 1], "data": [1]}]}, {},
         400, "unknown input 'tokenz'"),
        ("POST", INFER, tokens([999]), {}, 400, "outside the vocabulary"),
        ("POST", INFER, tokens([1], sequence_id="never"), {}, 400, "START flag"),
        ("POST", INFER, tokens([1], [2], sequence_id="seq"), {}, 400, "batch size"),
        ("POST", INFER, tokens([1], sequence_id=["seq"]), {}, 400, "a parameter is a bool, a string or a number"),
        ("POST", INFER, {**tokens([1], sequence_id="seq"), "outputs": [{"name": "logitz"}]}, {}, 400,
         "unknown output 'logitz'"),
        ("POST", INFER, binary + b"\0" * 16, {"Inference-Header-Content-Length": "9999"}, 400,
         "Inference-Header-Content-Length"),
        ("POST", INFER, binary + b"\0" * 8, {"Inference-Header-Content-Length": str(len(binary))}, 400,
         "declares 16 bytes of binary data"),
        ("POST", INFER, tokens([1], sequence_id="seq"), {"Content-Encoding": "gzip"}, 415, "uncompressed"),
        ("POST", "/v2/models/nope/infer", tokens([1]), {}, 404, "'nope' is not served"),
        ("POST", f"/v2/models/{CHAT}/versions/2/infer", tokens([1], sequence_id="seq"), {}, 404, "no version 2 loaded"),
        ("GET", "/v2/models/nope", None, {}, 404, "'nope' is not served"),
        ("GET", "/v2/models/nope/ready", None, {}, 404, "'nope' is not served"),
        ("POST", step, b"nope", {}, 400, "request body is not JSON"),
        ("POST", step, {"tokenz": {"ids": [1]}}, {}, 400, 'no field named "tokenz"'),
        ("POST", step, {"tokens": {"ids": "x"}}, {}, 400, "not a StepRequest"),
        ("POST", step, {"tokens": {"ids": [999]}}, {}, 400, "outside the vocabulary"),
        ("POST", step, {}, {}, 400, "has no input"),
        ("POST", step, {"text": "x", "expected_position": 99}, {}, 409, "position"),
        ("POST", step, {"session_id": "other", "text": "x"}, {}, 400, "leave session_id out of the body"),
        ("POST", step, {"text": "x"}, {"Request-Timeout-Ms": "soon"}, 400, "Request-Timeout-Ms"),
        ("POST", f"{unknown}/step", {"text": "x"}, {}, 404, "not found"),
        ("POST", "/v1/sessions", {"model": "nope"}, {}, 404, "'nope' is not served"),
        ("POST", "/v1/sessions", {"ttl_seconds": 10**9}, {}, 400, "ttl_seconds"),
        ("POST", f"/v1/sessions/{sid}/generate", {"prompt": "x", "max_tokens": 10**5}, {}, 400, "max_generate_tokens"),
        ("POST", f"/v1/sessions/{sid}/generate", {"prompt": "x", "temperature": -1}, {}, 400, "temperature"),
        ("POST", f"{unknown}/generate", {"prompt": "x"}, {}, 404, "not found"),
        ("GET", f"{unknown}/state", None, {}, 404, "not found"),
        ("POST", f"/v1/sessions/{sid}/fork", {"ttl_seconds": -1}, {}, 400, "not a ForkSessionRequest"),
        ("DELETE", unknown, None, {}, 404, "not found"),
        ("GET", state + "/more", None, {}, 404, "has no route"),
        ("PUT", "/v1/sessions", {}, {}, 405, "does not take this method"),
    ]


async def send(http: httpx.AsyncClient, method: str, path: str, body: object, headers: dict) -> httpx.Response:
    if isinstance(body, bytes):
        return await http.request(method, path, content=body, headers=headers)
    return await http.request(method, path, json=body, headers=headers)


async def test_bad_input_on_every_route_is_refused_and_changes_nothing(server, http, live, scrape):
    before = await live.snapshot()
    cases = bad_requests(live.session_id)
    for method, path, body, headers, status, words in cases:
        response = await send(http, method, path, body, headers)
        assert response.status_code == status, (method, path, body, response.text)
        assert response.headers["content-type"] == "application/json"
        assert words in response.json()["error"], (method, path, response.json())
    assert await live.snapshot() == before
    samples = await scrape(server)
    refused = sum(1 for c in cases if c[1] == INFER)
    assert samples.get("cellstream_http_requests_total", route="/v2/models/{model}/infer", code="400") == refused - 1
    assert samples.get("cellstream_http_requests_total", route="/v2/models/{model}/infer", code="415") == 1
    assert samples.get("cellstream_http_requests_total", route="(unmatched)", code="405") == 1
    assert samples.get("cellstream_http_request_duration_seconds_count", route="/v1/sessions/{session_id}/step") >= 9


async def test_an_oversized_body_is_refused_with_413(start):
    [port] = free_ports(1)
    server = await start(http_port=port, max_message_bytes=1024)
    body = tokens(list(range(256)) * 2)  # about 1,900 bytes of JSON
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.http_port}", timeout=30) as http:
        declared = await http.post(INFER, json=body)
        assert declared.status_code == 413 and "max_message_bytes (1024)" in declared.json()["error"]

        async def chunks():  # no Content-Length: counted as it arrives
            yield json.dumps(body).encode()

        streamed = await http.post(INFER, content=chunks())
        assert streamed.status_code == 413 and "max_message_bytes (1024)" in streamed.json()["error"]
        assert (await http.post(INFER, json=tokens([1, 2]))).status_code == 200
    assert server.dataplane.store.count() == 0


async def test_one_in_flight_bound_for_both_transports(start, connect, gate, rpc_error):
    """max_inflight_requests=1: an HTTP step held in the model fills it; another HTTP request gets 429 and a
    gRPC call RESOURCE_EXHAUSTED, with the same words; once it ends, both are served again."""
    [port] = free_ports(1)
    server = await start(http_port=port, max_inflight_requests=1)
    stub = connect(server)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.http_port}", timeout=30) as http:
        hold = gate(server)
        held = asyncio.create_task(http.post(INFER, json=tokens([1, 2])))
        await asyncio.to_thread(hold.running.wait, 20)
        refused = await http.get("/v1/models")
        assert refused.status_code == 429 and "server overloaded" in refused.json()["error"]
        error = await rpc_error(stub.ListModels(pb.ListModelsRequest()))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "server overloaded" in error.details()
        assert (await http.get("/v2/health/ready")).status_code == 200, "health is never refused"
        hold.open.set()
        assert (await held).status_code == 200
        assert (await http.get("/v1/models")).status_code == 200
        assert (await stub.ListModels(pb.ListModelsRequest())).default_model == CHAT


@pytest.mark.parametrize("where", ["header", "setting"])
async def test_a_deadline_ends_a_queued_step_unapplied(start, connect, gate, where, step):
    [port] = free_ports(1)
    server = await start(http_port=port, **({"http_request_timeout_seconds": 0.3} if where == "setting" else {}))
    stub = connect(server)
    sid = (await stub.OpenSession(pb.OpenSessionRequest())).session_id
    headers = {"Request-Timeout-Ms": "300"} if where == "header" else {}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.http_port}", timeout=30) as http:
        hold = gate(server)
        busy = (await stub.OpenSession(pb.OpenSessionRequest())).session_id
        holding = asyncio.ensure_future(stub.Step(step(busy, tokens=[1])))
        await asyncio.to_thread(hold.running.wait, 20)
        late = await http.post(f"/v1/sessions/{sid}/step", json={"tokens": {"ids": [5, 6]}}, headers=headers)
        hold.open.set()
        await holding
    assert late.status_code == 504, late.text
    assert "deadline" in late.json()["error"].lower()
    assert (await stub.GetState(pb.SessionRef(session_id=sid))).position == 0, "the late step was applied"


@st.composite
def json_values(draw: st.DrawFn, depth: int = 3) -> object:
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                        st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12))
    if depth == 0:
        return draw(scalars)
    inner = json_values(depth - 1)
    return draw(st.one_of(scalars, st.lists(inner, max_size=4),
                          st.dictionaries(st.text(max_size=10), inner, max_size=4)))


def kserve_bodies() -> st.SearchStrategy:
    """Bodies near the real shape, so the fuzz reaches past the first check."""
    names = st.sampled_from(["tokens", "h0", "c0", "features", "x"])
    datatypes = st.sampled_from(["INT64", "FP32", "BYTES", 3])
    shapes = st.one_of(st.lists(st.integers(-2, 3), max_size=4), json_values(1))
    data = st.one_of(st.lists(st.integers(-5, 300), max_size=6), st.lists(st.lists(st.integers(0, 259), max_size=3),
                                                                          max_size=3), json_values(1))
    tensor = st.fixed_dictionaries({"name": names, "datatype": datatypes, "shape": shapes}, optional={
        "data": data, "parameters": st.dictionaries(st.sampled_from(["binary_data_size", "x"]), json_values(0))})
    parameters = st.dictionaries(st.sampled_from(["sequence_id", "sequence_start", "sequence_end", "timeout",
                                                  "binary_data_output"]), json_values(0))
    outputs = st.lists(st.fixed_dictionaries({"name": st.sampled_from(["logits", "hn", "zz"])},
                                             optional={"parameters": json_values(1)}), max_size=3)
    return st.one_of(json_values(), st.fixed_dictionaries({"inputs": st.lists(tensor, max_size=3)},
                                                          optional={"parameters": parameters, "outputs": outputs,
                                                                    "id": json_values(0)}))


def step_bodies() -> st.SearchStrategy:
    fields = {"tokens": st.one_of(st.fixed_dictionaries({"ids": st.lists(st.integers(-3, 300), max_size=5)}),
                                  json_values(1)),
              "text": json_values(0), "features": json_values(2), "expected_position": json_values(0),
              "want": st.one_of(st.fixed_dictionaries({}, optional={"top_k": st.integers(-1, 300),
                                                                    "state": st.booleans()}), json_values(1)),
              "session_id": json_values(0)}
    return st.one_of(json_values(), st.fixed_dictionaries({}, optional=fields))


async def test_fuzzed_json_bodies_get_an_answer_not_a_crash(server, live, step):
    """Every fuzzed body is answered 200 or with a 4xx {"error"}, never a 500; only a 200 may move the state,
    and none may move the session or sequence the fuzzer was not given."""
    base = f"http://127.0.0.1:{server.http_port}"
    fuzzed = f"/v1/sessions/{(await server.dataplane.open_session(CHAT)).session_id}/step"
    before = await live.snapshot()
    answers: list[int] = []

    def check(response: httpx.Response) -> None:
        answers.append(response.status_code)
        if response.status_code != 200:
            assert 400 <= response.status_code < 500, response.text
            error = response.json()["error"]
            assert isinstance(error, str) and error, response.text

    def fuzz() -> None:
        with httpx.Client(base_url=base, timeout=30) as http:
            @FUZZ
            @given(kserve_bodies())
            def kserve(body: object) -> None:
                check(http.post(INFER, content=json.dumps(body, allow_nan=False).encode()))

            @FUZZ
            @given(step_bodies())
            def step(body: object) -> None:
                check(http.post(fuzzed, content=json.dumps(body, allow_nan=False).encode()))

            kserve()
            step()

    await asyncio.to_thread(fuzz)
    assert (await live.snapshot())[:2] == before[:2]  # the store may hold new sequences the fuzz started
    assert {200, 400} <= set(answers), "the fuzz reached neither a success nor a refusal"
