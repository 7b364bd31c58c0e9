"""S. Hostile input: property-based fuzzing (hypothesis) of every native RPC against a live server
process. Every reply is an expected status code, the server stays SERVING, and sessions the fuzzer
was never told about keep their exact state."""

from __future__ import annotations

import asyncio
import math

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cellstream.service._proto.cellstream.v1 import inference_pb2 as pb
from cellstream.service._proto.cellstream.v1 import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(180)
MAX_TOKENS = 64
# Refusals of a bad request; OK and ABORTED when a generated request happens to be valid.
EXPECTED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.ABORTED, grpc.StatusCode.RESOURCE_EXHAUSTED}
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
UINT32, UINT64, INT32 = 2**32 - 1, 2**64 - 1, 2**31 - 1

floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
# Proto strings must be UTF-8: no lone surrogates.
texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=300)
huge_text = st.integers(5_000, 200_000).map(lambda n: "é" * n)
token_lists = st.one_of(st.lists(st.integers(-INT32 - 1, INT32), max_size=3 * MAX_TOKENS),
                        st.lists(st.integers(0, 300), min_size=1, max_size=8))


class Live:
    """The server process, a sync channel to it, and the one session id the fuzzer may aim at."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)])
        self.stub = pb_grpc.InferenceStub(self.channel)
        self.target_id = ""

    def ids(self) -> st.SearchStrategy[str]:
        return st.one_of(st.just(self.target_id), st.just(""), texts, huge_text,
                         st.text("0123456789abcdef", min_size=32, max_size=32))

    def call(self, method: str, request: object) -> grpc.StatusCode:
        rpc = getattr(self.stub, method)
        try:
            reply = rpc(request, timeout=30)
            if method == "Generate":
                list(reply)
            return grpc.StatusCode.OK
        except grpc.RpcError as exc:
            assert exc.code() in EXPECTED, f"{method}: {exc.code()} {exc.details()}"
            assert len(exc.details()) < 2000, "an error echoed a huge input"
            return exc.code()


def states(live: Live, ids: list[str]) -> list[pb.State]:
    return [live.stub.GetState(pb.SessionRef(session_id=sid), timeout=10) for sid in ids]


@pytest.fixture(scope="module")
def live(tiny_model_dir, tmp_path_factory, server_process_class):
    """One server process for every example of the module."""
    process = server_process_class(tiny_model_dir, tmp_path_factory.mktemp("fuzz") / "server.log",
                                   max_tokens_per_request=MAX_TOKENS, max_generate_tokens=8, max_sessions=500,
                                   max_session_ttl_seconds=600, session_ttl_seconds=600)
    asyncio.run(process.wait_serving())
    connection = Live(process.target)
    victims = [connection.stub.OpenSession(pb.OpenSessionRequest(), timeout=10).session_id for _ in range(3)]
    for k, victim in enumerate(victims):
        connection.stub.Step(pb.StepRequest(session_id=victim, tokens=pb.TokenSequence(ids=[k, 7, 9])), timeout=10)
    connection.target_id = connection.stub.OpenSession(pb.OpenSessionRequest(), timeout=10).session_id
    before = states(connection, victims)
    yield connection
    after = states(connection, victims)
    health = health_pb2_grpc.HealthStub(connection.channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    connection.channel.close()
    log = process.log()
    alive = process.proc.poll() is None
    process.kill()
    assert alive, log
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert after == before, "the fuzzer changed sessions it was never given"
    assert "Traceback" not in log and "unexpected error" not in log, log


def _outputs() -> st.SearchStrategy[pb.Outputs]:
    return st.builds(pb.Outputs, logits=st.booleans(), top_k=st.integers(0, UINT32), all_steps=st.booleans(),
                     state=st.booleans())


def _step_request(live: Live) -> st.SearchStrategy[pb.StepRequest]:
    inputs = st.one_of(
        st.builds(lambda ids: {"tokens": pb.TokenSequence(ids=ids)}, token_lists),
        st.builds(lambda text: {"text": text}, st.one_of(texts, huge_text)),
        st.builds(lambda values, dim: {"features": pb.FloatSequence(values=values, dim=dim)},
                  st.lists(floats, max_size=40), st.integers(0, UINT32)),
        st.just({}),
    )
    return st.builds(
        lambda sid, given_input, expected, want: pb.StepRequest(session_id=sid, expected_position=expected,
                                                                want=want, **given_input),
        live.ids(), inputs, st.one_of(st.none(), st.integers(0, UINT64)), _outputs(),
    )


def _state() -> st.SearchStrategy[pb.State]:
    return st.builds(pb.State, model=st.one_of(st.just("tiny-chat"), texts), num_layers=st.integers(0, UINT32),
                     hidden_size=st.integers(0, UINT32), h=st.lists(floats, max_size=80),
                     c=st.lists(floats, max_size=80), position=st.integers(0, UINT64))


def test_fuzz_steps(live):
    @FUZZ
    @given(_step_request(live))
    def check(request: pb.StepRequest) -> None:
        live.call("Step", request)

    check()


def test_fuzz_session_calls(live):
    models = st.one_of(st.just(""), st.just("tiny-chat"), st.just("tiny-features"), texts, huge_text)
    calls = st.one_of(
        st.builds(lambda m, ttl, s: ("OpenSession", pb.OpenSessionRequest(model=m, ttl_seconds=ttl, initial_state=s)),
                  models, st.integers(0, UINT32), st.one_of(st.none(), _state())),
        st.builds(lambda sid, ttl: ("ForkSession", pb.ForkSessionRequest(session_id=sid, ttl_seconds=ttl)),
                  live.ids(), st.integers(0, UINT32)),
        st.builds(lambda sid: ("GetState", pb.SessionRef(session_id=sid)), live.ids()),
        st.builds(lambda sid: ("CloseSession", pb.SessionRef(session_id=sid)),
                  live.ids().filter(lambda sid: sid != live.target_id)),
        st.builds(lambda: ("ListModels", pb.ListModelsRequest())),
    )

    @FUZZ
    @given(calls)
    def check(call: tuple[str, object]) -> None:
        live.call(*call)

    check()


def test_fuzz_generate(live):
    requests = st.builds(
        lambda sid, prompt, max_tokens, temperature, top_k, seed, stop: pb.GenerateRequest(
            session_id=sid, prompt=prompt, max_tokens=max_tokens, temperature=temperature, top_k=top_k, seed=seed,
            stop=stop),
        live.ids(), st.one_of(texts, huge_text), st.integers(0, UINT32), floats, st.integers(0, UINT32),
        st.one_of(st.none(), st.integers(0, UINT64)), st.lists(texts, max_size=3),
    )

    @FUZZ
    @given(requests)
    def check(request: pb.GenerateRequest) -> None:
        code = live.call("Generate", request)
        if code == grpc.StatusCode.OK:
            assert math.isfinite(request.temperature) and request.temperature >= 0

    check()


def stream_steps(live: Live, requests: list[pb.StepRequest]) -> grpc.StatusCode:
    try:
        for _ in live.stub.StreamSteps(iter(requests), timeout=30):
            pass
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        assert exc.code() in EXPECTED, f"StreamSteps: {exc.code()} {exc.details()}"
        assert len(exc.details()) < 2000, "an error echoed a huge input"
        return exc.code()


def test_fuzz_streams(live):
    @FUZZ
    @given(st.lists(_step_request(live), min_size=1, max_size=4))
    def check(requests: list[pb.StepRequest]) -> None:
        stream_steps(live, requests)

    check()
    # A stream that switches to a huge session id after a valid step.
    valid = pb.StepRequest(session_id=live.target_id, tokens=pb.TokenSequence(ids=[1]))
    switch = pb.StepRequest(session_id="x" * 100_000, tokens=pb.TokenSequence(ids=[1]))
    assert stream_steps(live, [valid, switch]) == grpc.StatusCode.INVALID_ARGUMENT


def test_fuzz_undecodable_bytes(live):
    """Wrong types: bytes of another message or of none at all. Bytes that happen to parse are a
    (strange) valid request; the others are INVALID_ARGUMENT naming the expected message type."""
    methods = ["OpenSession", "Step", "GetState", "ForkSession", "CloseSession", "ListModels", "Generate"]

    def check_error(method: str, exc: grpc.RpcError) -> None:
        assert exc.code() in EXPECTED, f"{method}: {exc.code()} {exc.details()}"
        if exc.code() == grpc.StatusCode.INVALID_ARGUMENT and "protobuf" in exc.details():
            assert "is not a valid cellstream.v1." in exc.details()

    @FUZZ
    @given(st.sampled_from(methods), st.binary(max_size=200))
    def check(method: str, payload: bytes) -> None:
        path = f"/cellstream.v1.Inference/{method}"
        raw = (live.channel.unary_stream if method == "Generate" else live.channel.unary_unary)(path)
        try:
            reply = raw(payload, timeout=30)
            if method == "Generate":
                list(reply)
        except grpc.RpcError as exc:
            check_error(method, exc)

    check()

    @FUZZ
    @given(st.lists(st.binary(max_size=100), min_size=1, max_size=4))
    def check_stream(payloads: list[bytes]) -> None:
        try:
            list(live.channel.stream_stream("/cellstream.v1.Inference/StreamSteps")(iter(payloads), timeout=30))
        except grpc.RpcError as exc:
            check_error("StreamSteps", exc)

    check_stream()

    garbage = live.channel.unary_unary("/cellstream.v1.Inference/Step")
    with pytest.raises(grpc.RpcError) as info:
        garbage(b"\x00", timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == ("request is not a valid cellstream.v1.StepRequest (protobuf wire format); "
                                    "nothing was done")
