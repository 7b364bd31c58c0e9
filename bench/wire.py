"""Requests serialised once, sent as bytes: the load generator must cost far less CPU than the server.

Multicallables built with no serializers send and receive raw bytes, so a client step is one
write and one read with no protobuf work at all (a StreamSteps request after the first may omit the
session id, so every stream sends the very same bytes).
"""

from __future__ import annotations

import grpc

from cellstream.service._proto.cellstream.v1 import inference_pb2 as pb

METHOD = "/cellstream.v1.Inference/"
OPEN_SESSION = METHOD + "OpenSession"
CLOSE_SESSION = METHOD + "CloseSession"
STEP = METHOD + "Step"
STREAM_STEPS = METHOD + "StreamSteps"
STEP_MANY = METHOD + "StepMany"
STREAM_MANY = METHOD + "StreamMany"
GENERATE = METHOD + "Generate"

STEP_TOKEN = ord("a")  # any valid byte: the benchmark measures cost, not what the model says
OPEN_REQUEST = pb.OpenSessionRequest().SerializeToString()


def step_request(session_id: str = "", *, token: int = STEP_TOKEN) -> bytes:
    """A 1-token step that asks for nothing back but the position."""
    return pb.StepRequest(session_id=session_id, tokens=pb.TokenSequence(ids=[token])).SerializeToString()


def step_batch(session_ids: list[str], *, token: int = STEP_TOKEN) -> bytes:
    """A 1-token step for each session, in one StepBatch."""
    items = [pb.StepRequest(session_id=sid, tokens=pb.TokenSequence(ids=[token])) for sid in session_ids]
    return pb.StepBatch(items=items).SerializeToString()


def outcomes(reply: bytes) -> int:
    """How many item outcomes a StepBatchResult holds; an item that failed fails the run."""
    items = pb.StepBatchResult.FromString(reply).items
    for item in items:
        if item.HasField("error"):
            raise RuntimeError(f"a multiplexed step failed: code {item.error.code}: {item.error.message}")
    return len(items)


def text_request(session_id: str, text: str) -> bytes:
    """A step feeding text that asks for the next-token logits, as a chat client would."""
    return pb.StepRequest(session_id=session_id, text=text, want=pb.Outputs(logits=True)).SerializeToString()


def generate_request(session_id: str, prompt: str, max_tokens: int) -> bytes:
    """A greedy reply of at most max_tokens tokens, with no stop sequence to cut it short."""
    return pb.GenerateRequest(session_id=session_id, prompt=prompt, max_tokens=max_tokens).SerializeToString()


def close_request(session_id: str) -> bytes:
    return pb.SessionRef(session_id=session_id).SerializeToString()


def generated_tokens(chunk: bytes) -> int:
    return len(pb.GenerateChunk.FromString(chunk).tokens)


async def open_session(channel: grpc.aio.Channel, timeout: float) -> str:
    reply = await channel.unary_unary(OPEN_SESSION)(OPEN_REQUEST, timeout=timeout)
    return pb.SessionInfo.FromString(reply).session_id


async def finish(call: grpc.aio.StreamStreamCall, what: str) -> None:
    """Half-close a stream and wait for its status: anything but OK fails the run."""
    await call.done_writing()
    code = await call.code()
    if code != grpc.StatusCode.OK:
        raise RuntimeError(f"{what} ended with {code.name}: {await call.details()}")
