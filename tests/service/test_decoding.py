"""T. Requests that are not valid protobuf: INVALID_ARGUMENT naming the expected message on every
service (not gRPC's UNKNOWN plus a logged traceback), and a stream keeps what it did before."""

from __future__ import annotations

import logging

import grpc
import pytest

from cellstream.service._proto.cellstream.v1 import inference_pb2 as pb

pytestmark = pytest.mark.timeout(60)
CORRUPT = b"\x00"  # field number 0: never valid protobuf


@pytest.mark.parametrize(
    ("method", "message"),
    [
        ("/cellstream.v1.Inference/Step", "cellstream.v1.StepRequest"),
        ("/cellstream.v1.Inference/OpenSession", "cellstream.v1.OpenSessionRequest"),
        ("/inference.GRPCInferenceService/ModelInfer", "inference.ModelInferRequest"),
        ("/grpc.health.v1.Health/Check", "grpc.health.v1.HealthCheckRequest"),
    ],
)
async def test_undecodable_unary_requests(channel, rpc_error, scrape, server, caplog, method, message):
    with caplog.at_level(logging.ERROR):
        error = await rpc_error(channel.unary_unary(method)(CORRUPT, timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == f"request is not a valid {message} (protobuf wire format); nothing was done"
    assert "Traceback" not in caplog.text and "DecodeError" not in caplog.text
    assert (await scrape(server)).get("cellstream_calls_refused_total", reason="undecodable") == 1


async def test_a_stream_answers_the_good_messages_before_a_bad_one(stub, channel, step):
    session = await stub.OpenSession(pb.OpenSessionRequest())
    good = step(session.session_id, tokens=[1, 2]).SerializeToString()
    call = channel.stream_stream("/cellstream.v1.Inference/StreamSteps")(iter([good, good, CORRUPT, good]), timeout=10)
    replies = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for reply in call:
            replies.append(reply)
    assert len(replies) == 2
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cellstream.v1.StepRequest" in info.value.details()
    assert (await stub.GetState(pb.SessionRef(session_id=session.session_id))).position == 4
