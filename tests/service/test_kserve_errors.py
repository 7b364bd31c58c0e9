"""N. Every request the KServe API refuses gets a precise status and a message naming the tensor,
parameter or rule, and changes no state: the live sequences and sessions read the same through the
native GetState before and after (bit for bit), the store holds as many sessions, and the sequences
then carry on exactly as if the refused requests had never been sent.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import grpc
import numpy as np
import pytest
from tritonclient.grpc import InferInput, InferRequestedOutput, service_pb2, service_pb2_grpc
from tritonclient.grpc import aio as triton_aio
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from cellstream.service._proto.cellstream.v1 import inference_pb2 as pb
from cellstream.service.sequences import sequence_key

CHAT, FEATURES = "tiny-chat", "tiny-features"
INVALID, NOT_FOUND, DEADLINE = "INVALID_ARGUMENT", "NOT_FOUND", "DEADLINE_EXCEEDED"


def tensor(name: str, array: np.ndarray) -> InferInput:
    infer_input = InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    infer_input.set_data_from_numpy(array)
    return infer_input


def tokens(*ids: int) -> InferInput:
    return tensor("tokens", np.array([ids], np.int64))


def state(name: str, batch: int = 1, layers: int = 2, hidden: int = 16, fill: float = 0.1) -> InferInput:
    return tensor(name, np.full((layers, batch, hidden), fill, np.float32))


@pytest.fixture
def refused(server, connect):
    """refused(call, code, *fragments, keys=) -> the message, after checking the status, that the
    message holds every fragment, and that no listed session (nor the store's count) changed."""
    native = connect(server)

    async def states(keys: list[str]) -> list[pb.State]:
        return [await native.GetState(pb.SessionRef(session_id=key)) for key in keys]

    async def _refused(call, code: str, *fragments: str, keys: list[str]) -> str:
        before = await states(keys)
        count = server.dataplane.store.count()
        try:
            await asyncio.wait_for(call, 30)
        except InferenceServerException as exc:  # tritonclient
            status, message = exc.status(), exc.message()
        except grpc.aio.AioRpcError as exc:  # the raw stubs
            status, message = str(exc.code()), exc.details()
        else:
            pytest.fail(f"the request succeeded; expected {code} with {fragments}")
        assert status == f"StatusCode.{code}", f"{status}: {message}"
        for fragment in fragments:
            assert fragment in message, f"{fragment!r} not in {message!r}"
        assert await states(keys) == before, "a refused request changed a session"
        assert server.dataplane.store.count() == count, "a refused request created or removed a session"
        return message

    return _refused


@pytest.fixture
async def stub(server):
    """The raw stubs tritonclient ships, for requests its client will not build."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def request(model: str = CHAT, ids: tuple[int, ...] = (1, 2), **parameters: object) -> service_pb2.ModelInferRequest:
    """A raw ModelInferRequest with tokens [1, T] as typed contents and the given parameters."""
    message = service_pb2.ModelInferRequest(model_name=model)
    message.inputs.add(name="tokens", datatype="INT64", shape=[1, len(ids)]).contents.int64_contents.extend(ids)
    for key, value in parameters.items():
        setattr(message.parameters[key], *value)
    return message


async def test_refused_requests_change_nothing(server, connect, triton, stub, refused, ref, close, scrape, step):
    # Live state worth protecting: an int and a string sequence, a features sequence, a native session.
    fed = {5: [10, 20, 30], "s": [40, 50]}
    await triton.infer(CHAT, [tokens(*fed[5])], sequence_id=5, sequence_start=True)
    await triton.infer(CHAT, [tokens(*fed["s"])], sequence_id="s", sequence_start=True)
    await triton.infer(FEATURES, [tensor("features", np.ones((1, 2, 5), np.float32))], sequence_id="f",
                       sequence_start=True)
    cellstream_stub = connect(server)
    native = (await cellstream_stub.OpenSession(pb.OpenSessionRequest())).session_id
    await cellstream_stub.Step(step(native, tokens=[1, 2, 3]))
    keys = [sequence_key(CHAT, 5), sequence_key(CHAT, "s"), sequence_key(FEATURES, "f"), native]
    counts: Counter = Counter()

    async def check(call, code: str, *fragments: str) -> None:
        await refused(call, code, *fragments, keys=keys)
        counts[code] += 1

    infer = triton.infer
    # Sequences: START rule (never started; "5" is not 5; ids are per model), batch size 1, no h0/c0.
    await check(infer(CHAT, [tokens(1)], sequence_id=404), INVALID, "sequence 404 of model 'tiny-chat' is not active",
                "the first request of a sequence must carry the START flag")
    await check(infer(CHAT, [tokens(1)], sequence_id="5"), INVALID, "sequence '5'", "START flag")
    await check(infer(FEATURES, [tensor("features", np.ones((1, 1, 5), np.float32))], sequence_id=5), INVALID,
                "sequence 5 of model 'tiny-features' is not active")
    await check(infer(CHAT, [tensor("tokens", np.ones((2, 3), np.int64))], sequence_id=5), INVALID,
                "sequence requests must have batch size 1", "batch size 2")
    await check(infer(CHAT, [tokens(1), state("h0"), state("c0")], sequence_id=5), INVALID,
                "h0/c0", "cannot come with sequence_id 5")
    # A refused START does not replace the live sequence; a refused END does not close it.
    await check(infer(CHAT, [tokens(1, 260)], sequence_id=5, sequence_start=True), INVALID, "tokens[0][1] = 260")
    await check(infer(CHAT, [tokens(1, 260)], sequence_id="s", sequence_end=True), INVALID, "tokens[0][1] = 260")

    # Tensors: names, datatypes, shapes, data length, values.
    await check(infer(CHAT, [tensor("tokenz", np.ones((1, 2), np.int64))]), INVALID,
                "unknown input 'tokenz' for model 'tiny-chat'; its inputs are tokens, h0, c0")
    await check(infer(CHAT, [tokens(1)], outputs=[InferRequestedOutput("probs")]), INVALID,
                "unknown output 'probs'", "logits, hn, cn")
    await check(infer(CHAT, [tokens(1)], outputs=[InferRequestedOutput("logits")] * 2), INVALID,
                "output 'logits' is requested twice")
    await check(infer(CHAT, [tensor("tokens", np.ones((1, 2), np.int32))]), INVALID,
                "input 'tokens' has datatype 'INT32'; model 'tiny-chat' takes INT64")
    await check(infer(CHAT, [tokens(1), state("c0"), tensor("h0", np.zeros((2, 1, 16), np.float64))]),
                INVALID, "input 'h0' has datatype 'FP64'")
    short = tokens(1, 2, 3, 4).set_shape([1, 5])  # 4 values sent under a 5-value shape
    await check(infer(CHAT, [short]), INVALID, "input 'tokens' has 32 bytes in raw_input_contents",
                "shape [1, 5] of INT64 needs 40")
    await check(infer(CHAT, [tensor("tokens", np.ones(4, np.int64))]), INVALID,
                "input 'tokens' has shape [4]; model 'tiny-chat' takes [-1, -1] (batch, time)")
    await check(infer(CHAT, [tokens(3, -1)]), INVALID, "tokens[0][1] = -1 is outside the vocabulary [0, 260)")
    await check(infer(CHAT, [tensor("tokens", np.ones((1, 0), np.int64))]), INVALID, "tokens[0] is empty")
    await check(infer(CHAT, [tensor("tokens", np.ones((0, 3), np.int64))]), INVALID, "batch size 0")
    await check(infer(CHAT, [tensor("tokens", np.ones((257, 1), np.int64))]), INVALID,
                "batch size 257, more than max_batch_size (256)")
    await check(infer(FEATURES, [tensor("features", np.ones((1, 3, 4), np.float32))]), INVALID,
                "input 'features' has shape [1, 3, 4]; model 'tiny-features' takes [-1, -1, 5]")
    nan = np.ones((1, 2, 5), np.float32)
    nan[0, 1, 2] = np.nan
    await check(infer(FEATURES, [tensor("features", nan)]), INVALID, "features[0]", "[7] is nan", "finite")
    await check(infer(CHAT, [tokens(1), state("h0")]), INVALID, "input 'h0' without 'c0'")
    await check(infer(CHAT, [tokens(1), state("h0", layers=3), state("c0")]), INVALID,
                "input 'h0' has shape [3, 1, 16]; model 'tiny-chat' takes [2, -1, 16]")
    await check(infer(CHAT, [tensor("tokens", np.ones((2, 1), np.int64)), state("h0"), state("c0")]), INVALID,
                "input 'h0' has batch size 1", "'tokens' has batch size 2")
    await check(infer(CHAT, [tokens(1), state("h0"), state("c0", fill=np.inf)]), INVALID,
                "input 'c0' has NaN or Inf")
    await check(infer(CHAT, [state("h0"), state("c0")]), INVALID, "missing input 'tokens'")
    shared = InferInput("tokens", [1, 2], "INT64").set_shared_memory("region", 16)
    await check(infer(CHAT, [shared]), INVALID, "input 'tokens' has parameter 'shared_memory_region'")
    await check(infer(CHAT, [tokens(1)], outputs=[InferRequestedOutput("logits", class_count=3)]), INVALID,
                "output 'logits' has parameter 'classification'")

    # Models and versions.
    await check(infer("nope", [tokens(1)]), NOT_FOUND, "model 'nope' is not served", "tiny-chat")
    await check(infer(CHAT, [tokens(1)], model_version="2"), NOT_FOUND,
                "has no version 2 loaded; its loaded versions: 1 (READY)")

    # What tritonclient never sends: typed contents of the wrong length, raw data for some inputs
    # only, both kinds at once, a repeated input, parameters of the wrong type or sign.
    bad = request(ids=(1, 2, 3))
    bad.inputs[0].shape[:] = [1, 4]
    await check(stub.ModelInfer(bad, timeout=30), INVALID,
                "input 'tokens' has 3 values in contents.int64_contents; shape [1, 4] needs 4")
    bad = request()
    bad.inputs.add(name="h0", datatype="FP32", shape=[2, 1, 16])
    bad.raw_input_contents.append(np.zeros(32, "<f4").tobytes())
    await check(stub.ModelInfer(bad, timeout=30), INVALID, "raw_input_contents has 1 entries for 2 inputs")
    bad = request()
    bad.raw_input_contents.append(np.array([1, 2], "<i8").tobytes())
    await check(stub.ModelInfer(bad, timeout=30), INVALID, "both contents and raw_input_contents")
    bad = request()
    bad.inputs.append(bad.inputs[0])
    await check(stub.ModelInfer(bad, timeout=30), INVALID, "input 'tokens' is given twice")
    for parameters, fragment in (
        ({"sequence_id": ("int64_param", 5), "sequence_start": ("int64_param", 1)},
         "parameter 'sequence_start' must be a bool, got int64_param"),
        ({"sequence_id": ("double_param", 5.0)}, "parameter 'sequence_id' must be an int64 or a string"),
        ({"sequence_id": ("string_param", "x" * 257)}, "string ids are limited to 256"),
        ({"sequence_end": ("bool_param", True)}, "sequence_id is absent, 0 or ''; the flags need a sequence id"),
        ({"timeout": ("int64_param", -5)}, "parameter 'timeout' is -5; it must be >= 0 (microseconds)"),
        ({"timeout": ("string_param", "1s")}, "parameter 'timeout' must be an int64 or uint64 (microseconds)"),
        ({"priority": ("double_param", 1.5)}, "parameter 'priority' must be an int64 or uint64"),
    ):
        await check(stub.ModelInfer(request(**parameters), timeout=30), INVALID, fragment)

    samples = await scrape(server)
    for code, n in counts.items():
        assert samples.get("cellstream_requests_total", method="ModelInfer", code=code) == n

    # The sequences carry on exactly as if nothing had been refused.
    for sid, ids in fed.items():
        more = [7, 8, 9]
        result = await triton.infer(CHAT, [tokens(*more)], sequence_id=sid, sequence_end=True)
        close(result.as_numpy("logits")[0], ref.run(CHAT, np.array(ids + more))[0][len(ids):], f"sequence {sid!r}")


async def test_ended_and_expired_sequences_need_start_again(start, ref, close, scrape, clock):
    running = await start(session_ttl_seconds=0.5, clock=clock)
    async with triton_aio.InferenceServerClient(f"127.0.0.1:{running.port}") as triton:
        await triton.infer(CHAT, [tokens(1, 2)], sequence_id="done", sequence_start=True)
        await triton.infer(CHAT, [tokens(3)], sequence_id="done", sequence_end=True)
        with pytest.raises(InferenceServerException) as info:
            await triton.infer(CHAT, [tokens(4)], sequence_id="done")
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "sequence 'done'" in info.value.message() and "must carry the START flag" in info.value.message()

        await triton.infer(CHAT, [tokens(1, 2)], sequence_id=9, sequence_start=True)
        clock.advance(0.8)  # idle past the TTL
        with pytest.raises(InferenceServerException) as info:
            await triton.infer(CHAT, [tokens(3)], sequence_id=9)
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "idle longer than 0.5 s" in info.value.message() and "START flag" in info.value.message()

        # START again: a fresh sequence from zero state.
        result = await triton.infer(CHAT, [tokens(3)], sequence_id=9, sequence_start=True, sequence_end=True)
        close(result.as_numpy("logits")[0], ref.run(CHAT, np.array([3]))[0], "restarted sequence")
    samples = await scrape(running)
    assert samples.get("cellstream_sessions_expired_total") == 1
    assert running.dataplane.store.count() == 0


async def test_a_start_replaces_a_live_sequence(server, triton, ref, close):
    await triton.infer(CHAT, [tokens(1, 2, 3)], sequence_id=3, sequence_start=True)
    result = await triton.infer(CHAT, [tokens(4, 5)], sequence_id=3, sequence_start=True)
    close(result.as_numpy("logits")[0], ref.run(CHAT, np.array([4, 5]))[0], "restarted from zero state")
    result = await triton.infer(CHAT, [tokens(6)], sequence_id=3, sequence_end=True)
    close(result.as_numpy("logits")[0], ref.run(CHAT, np.array([4, 5, 6]))[0][-1:], "continued from the restart")
    assert server.dataplane.store.count() == 0


async def test_timeout_passing_before_compute_drops_the_request(server, triton, gate, refused, ref, close, scrape):
    await triton.infer(CHAT, [tokens(1, 2)], sequence_id=8, sequence_start=True)
    held = gate(server)
    busy = asyncio.create_task(triton.infer(CHAT, [tokens(9, 9)]))  # holds the model while the next one waits
    assert await asyncio.to_thread(held.running.wait, 20)

    async def open_later() -> None:
        await asyncio.sleep(0.3)
        held.open.set()

    opener = asyncio.create_task(open_later())
    started = time.monotonic()
    await refused(triton.infer(CHAT, [tokens(3)], sequence_id=8, timeout=50_000), DEADLINE,
                  "deadline passed after", "timeout parameter: 50000 µs", "nothing was applied",
                  keys=[sequence_key(CHAT, 8)])
    assert time.monotonic() - started >= 0.25, "refused before the queue wait, not by it"
    await opener
    await busy
    samples = await scrape(server)
    assert samples.get("cellstream_steps_dropped_total", model=CHAT, reason="deadline") == 1
    assert samples.get("cellstream_requests_total", method="ModelInfer", code=DEADLINE) == 1
    result = await triton.infer(CHAT, [tokens(3)], sequence_id=8, sequence_end=True)
    close(result.as_numpy("logits")[0], ref.run(CHAT, np.array([1, 2, 3]))[0][-1:], "sequence after the timeout")


async def test_a_reply_too_large_to_send_is_refused_before_the_step(start, connect):
    # tiny-chat's logits: 260 x 4 = 1,040 bytes a step; (20,000 - 4,096) // 1,040 = 15 steps fit in a reply.
    running = await start(max_message_bytes=20_000)
    async with triton_aio.InferenceServerClient(f"127.0.0.1:{running.port}") as triton:
        with pytest.raises(InferenceServerException) as refused:
            await triton.infer(CHAT, [tokens(*[1] * 16)], sequence_id=7, sequence_start=True)
        assert refused.value.status() == f"StatusCode.{INVALID}"
        assert "every step's output of 16 steps of model 'tiny-chat' (1040 bytes a step) would exceed " \
               "max_message_bytes (20000): at most 15 steps per request" in refused.value.message()
        assert running.dataplane.store.count() == 0  # no sequence began
        rows = tensor("tokens", np.ones((2, 8), np.int64))  # 16 steps over two stateless rows: refused alike
        with pytest.raises(InferenceServerException, match="at most 15 steps per request"):
            await triton.infer(CHAT, [rows])
        result = await triton.infer(CHAT, [tokens(*[1] * 15)], sequence_id=7, sequence_start=True)
        assert result.as_numpy("logits").shape == (1, 15, 260)
    assert (await connect(running).GetState(pb.SessionRef(session_id=sequence_key(CHAT, 7)))).position == 15
