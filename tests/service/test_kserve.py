"""M. The KServe v2 / Open Inference Protocol API through the real tritonclient: health and metadata,
Triton-style sequences (unary and streamed) equal to in-process onnxruntime on the whole sequence,
batching together with native Steps, and client-held state on stateless calls.

Exactness is judged as everywhere else: scaled max difference <= 1e-5 (cellstream.model.parity).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import InferInput, InferRequestedOutput, service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from cellstream.service._proto.cellstream.v1 import inference_pb2 as pb
from cellstream.service.sequences import sequence_key

CHAT, FEATURES = "tiny-chat", "tiny-features"
LAYERS, CHAT_HIDDEN, FEATURES_HIDDEN = 2, 16, 12


def plan(seed: int, chunk: int | None = None) -> list[np.ndarray]:
    """A random token sequence cut into chunks of `chunk` tokens, or of random sizes 1-4."""
    rng = np.random.default_rng(seed)
    sequence = rng.integers(0, 260, size=int(rng.integers(12, 24)) if chunk is None else 5 * chunk)
    chunks, start = [], 0
    while start < len(sequence):
        size = chunk or int(rng.integers(1, 5))
        chunks.append(sequence[start : start + size])
        start += size
    return chunks


def tensor(name: str, array: np.ndarray) -> InferInput:
    infer_input = InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    infer_input.set_data_from_numpy(array)
    return infer_input


def tokens(chunk: np.ndarray) -> InferInput:
    """One row of tokens, shape [1, T]."""
    return tensor("tokens", np.asarray(chunk, np.int64).reshape(1, -1))


def wanted(*names: str) -> list[InferRequestedOutput]:
    return [InferRequestedOutput(name) for name in names]


async def test_health_and_metadata(server, triton):
    assert await triton.is_server_live()
    assert await triton.is_server_ready()
    assert await triton.is_model_ready(CHAT)
    assert await triton.is_model_ready(FEATURES, "1")
    assert not await triton.is_model_ready("no-such-model")
    assert not await triton.is_model_ready(CHAT, "2")

    metadata = await triton.get_server_metadata()
    assert metadata.name == "cellstream"
    assert metadata.version
    assert {"sequence", "sequence(string_id)"} <= set(metadata.extensions)

    def described(tensors) -> list[tuple[str, str, list[int]]]:
        return [(t.name, t.datatype, list(t.shape)) for t in tensors]

    chat = await triton.get_model_metadata(CHAT)
    assert (chat.name, list(chat.versions)) == (CHAT, ["1"])
    assert described(chat.inputs) == [("tokens", "INT64", [-1, -1]), ("h0", "FP32", [LAYERS, -1, CHAT_HIDDEN]),
                                      ("c0", "FP32", [LAYERS, -1, CHAT_HIDDEN])]
    assert described(chat.outputs) == [("logits", "FP32", [-1, -1, 260]), ("hn", "FP32", [LAYERS, -1, CHAT_HIDDEN]),
                                       ("cn", "FP32", [LAYERS, -1, CHAT_HIDDEN])]
    features = await triton.get_model_metadata(FEATURES, as_json=True)
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in features["inputs"]] == [
        ("features", "FP32", [-1, -1, 5]), ("h0", "FP32", [LAYERS, -1, FEATURES_HIDDEN]),
        ("c0", "FP32", [LAYERS, -1, FEATURES_HIDDEN]),
    ]
    assert features["outputs"][0] == {"name": "logits", "datatype": "FP32", "shape": ["-1", "-1", "7"]}

    with pytest.raises(InferenceServerException) as info:
        await triton.get_model_metadata("no-such-model")
    assert info.value.status() == "StatusCode.NOT_FOUND"
    assert "'no-such-model' is not served" in info.value.message() and CHAT in info.value.message()

    server.kserve.drain()  # what stop() does first: readiness goes, liveness stays
    assert await triton.is_server_live()
    assert not await triton.is_server_ready()
    assert not await triton.is_model_ready(CHAT)


async def test_32_interleaved_sequences_match_onnxruntime(server, triton, ref, close, scrape):
    # The int 7 and the string "7" are different sequences: both run at once here.
    ids = [*range(1, 17), *(str(i) for i in range(1, 17))]
    plans = {sid: plan(seed) for seed, sid in enumerate(ids)}
    answered: list[object] = []  # sequence ids in the order their responses arrived

    async def run(sid: int | str, chunks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        logits = []
        for k, chunk in enumerate(chunks):
            last = k == len(chunks) - 1
            result = await triton.infer(
                CHAT, [tokens(chunk)], outputs=wanted("logits", "hn", "cn") if last else None, request_id=f"{sid}/{k}",
                sequence_id=sid, sequence_start=k == 0, sequence_end=last,
            )
            answered.append(sid)
            assert result.get_response().id == f"{sid}/{k}"
            assert result.as_numpy("logits").shape == (1, len(chunk), 260)
            logits.append(result.as_numpy("logits")[0])
        return np.concatenate(logits), result.as_numpy("hn")[:, 0], result.as_numpy("cn")[:, 0]

    results = await asyncio.wait_for(asyncio.gather(*(run(sid, plans[sid]) for sid in ids)), 90)

    for sid, (logits, h, c) in zip(ids, results, strict=True):
        want, want_h, want_c = ref.run(CHAT, np.concatenate(plans[sid]))
        close(logits, want, f"sequence {sid!r} logits")
        close(h, want_h, f"sequence {sid!r} h")
        close(c, want_c, f"sequence {sid!r} c")
    # Interleaved: some sequence's responses have other sequences' responses between them.
    first = {sid: answered.index(sid) for sid in ids}
    last = {sid: len(answered) - 1 - answered[::-1].index(sid) for sid in ids}
    assert any(last[sid] - first[sid] + 1 > len(plans[sid]) for sid in ids)

    assert server.dataplane.store.count() == 0, "sequence_end left sequences behind"
    samples = await scrape(server)
    assert samples.get("cellstream_sessions_opened_total") == len(ids)
    assert samples.get("cellstream_sessions_closed_total") == len(ids)
    steps = sum(len(chunks) for chunks in plans.values())
    assert samples.get("cellstream_requests_total", method="ModelInfer", code="OK") == steps
    assert samples.get("cellstream_tokens_total", model=CHAT) == sum(len(np.concatenate(p)) for p in plans.values())


async def test_stream_keeps_order_per_sequence_and_survives_an_error(server, ref, close):
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.port}")
    received: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: received.put((result, error)))
    ids = [11, 12, "alpha", "beta"]
    plans = {sid: plan(100 + n) for n, sid in enumerate(ids)}
    sent: dict[object, list[str]] = {sid: [] for sid in ids}  # request ids per sequence, in send order
    requests = 0
    for k in range(max(len(chunks) for chunks in plans.values())):
        for sid, chunks in plans.items():
            if k >= len(chunks):
                continue
            client.async_stream_infer(CHAT, [tokens(chunks[k])], request_id=f"{sid}/{k}", sequence_id=sid,
                                      sequence_start=k == 0, sequence_end=k == len(chunks) - 1)
            sent[sid].append(f"{sid}/{k}")
            requests += 1
            if sid == 12 and k == 1:  # a bad step in the middle of sequence 12: refused, state kept
                client.async_stream_infer(CHAT, [tokens([5, 999, 6])], request_id="bad", sequence_id=12)
                sent[sid].append("bad")
                client.async_stream_infer(CHAT, [tokens([1])], request_id="orphan", sequence_id="never-started")
                requests += 2

    responses = [await asyncio.to_thread(received.get, timeout=30) for _ in range(requests)]
    await asyncio.to_thread(client.stop_stream)
    await asyncio.to_thread(client.close)
    assert received.empty(), "the stream reported more than one response per request"

    errors = [error.message() for result, error in responses if error is not None]
    assert len(errors) == 2, errors
    bad = next(e for e in errors if e.startswith("request 'bad'"))
    assert "INVALID_ARGUMENT: tokens[0][1] = 999 is outside the vocabulary" in bad
    orphan = next(e for e in errors if e.startswith("request 'orphan'"))
    assert "'never-started'" in orphan and "must carry the START flag" in orphan

    order = [result.get_response().id if error is None else error.message().split("'")[1]
             for result, error in responses]
    logits: dict[object, list[np.ndarray]] = {sid: [] for sid in ids}
    for result, error in responses:
        if error is None:
            sid = result.get_response().id.split("/")[0]
            logits[int(sid) if sid.isdigit() else sid].append(result.as_numpy("logits")[0])
    for sid in ids:
        assert [rid for rid in order if rid in sent[sid]] == sent[sid], f"sequence {sid!r} answered out of order"
        want, _, _ = ref.run(CHAT, np.concatenate(plans[sid]))
        close(np.concatenate(logits[sid]), want, f"sequence {sid!r} logits")
    assert server.dataplane.store.count() == 0


class HoldFirstBatch:
    """The model's engine, but its first run says it started, then waits (in the ORT worker thread)
    until `backlog` steps queue behind it."""

    def __init__(self, batcher, backlog: int) -> None:
        self.batcher, self.engine, self.backlog = batcher, batcher.engine, backlog
        self.spec = self.engine.spec
        self.calls = 0
        self.started = threading.Event()

    def run(self, inputs, h0, c0):
        self.calls += 1
        if self.calls == 1:
            self.started.set()
            deadline = time.monotonic() + 20
            while self.batcher.queued < self.backlog and time.monotonic() < deadline:
                time.sleep(0.001)
        return self.engine.run(inputs, h0, c0)


async def test_native_steps_and_kserve_sequences_batch_together(server, stub, triton, ref, close, arrays, scrape, step):
    plans = [plan(200 + n, chunk=2) for n in range(8)]  # equal lengths: any steps may share a batch
    sessions = [(await stub.OpenSession(pb.OpenSessionRequest())).session_id for _ in range(4)]
    sequences: list[int | str] = [21, 22, "left", "right"]
    logits: list[list[np.ndarray]] = [[] for _ in plans]
    for n, sid in enumerate(sessions):
        response = await stub.Step(step(sid, tokens=plans[n][0].tolist(), all_steps=True))
        logits[n].append(np.asarray(response.logits, np.float32).reshape(-1, 260))
    for n, sid in enumerate(sequences, start=4):
        result = await triton.infer(CHAT, [tokens(plans[n][0])], sequence_id=sid, sequence_start=True)
        logits[n].append(result.as_numpy("logits")[0])

    # From here the first onnxruntime call, a native step, holds until the seven others queue behind it.
    batcher = server.dataplane.batchers[CHAT]
    hold = HoldFirstBatch(batcher, backlog=7)
    batcher.engine = hold
    batcher.inline_max_tokens = 0  # the held engine blocks: never on the event loop
    store, batches = server.dataplane.store, []
    load_many = store.load_many

    async def recording(session_ids: list[str]) -> list:
        batches.append(list(session_ids))
        return await load_many(session_ids)

    store.load_many = recording
    before = await scrape(server)

    async def native(n: int, sid: str) -> None:
        for chunk in plans[n][1:]:
            response = await stub.Step(step(sid, tokens=chunk.tolist(), all_steps=True))
            logits[n].append(np.asarray(response.logits, np.float32).reshape(-1, 260))

    async def kserve(n: int, sid: int | str) -> None:
        for chunk in plans[n][1:]:
            result = await triton.infer(CHAT, [tokens(chunk)], sequence_id=sid)
            logits[n].append(result.as_numpy("logits")[0])

    first = asyncio.create_task(native(0, sessions[0]))
    assert await asyncio.to_thread(hold.started.wait, 20)
    await asyncio.wait_for(asyncio.gather(first, *(native(n, sid) for n, sid in enumerate(sessions) if n),
                                          *(kserve(n, sid) for n, sid in enumerate(sequences, start=4))), 60)

    mixed = [b for b in batches if any(s.startswith("kserve/") for s in b) and any("/" not in s for s in b)]
    assert mixed, f"no batch held both a native session and a KServe sequence: {batches}"
    assert max(len(b) for b in mixed) >= 7
    after = await scrape(server)
    count = after.get("cellstream_batch_size_count", model=CHAT) - before.get("cellstream_batch_size_count", model=CHAT)
    total = after.get("cellstream_batch_size_sum", model=CHAT) - before.get("cellstream_batch_size_sum", model=CHAT)
    assert total == 8 * 4, "every step runs in exactly one batch"
    assert count < total, f"no batching: {count} batches for {total} steps"

    for n, chunks in enumerate(plans):
        want, want_h, want_c = ref.run(CHAT, np.concatenate(chunks))
        close(np.concatenate(logits[n]), want, f"{'native' if n < 4 else 'kserve'} {n} logits")
    for n, sid in enumerate(sessions):
        _, want_h, want_c = ref.run(CHAT, np.concatenate(plans[n]))
        got_h, got_c = arrays(await stub.GetState(pb.SessionRef(session_id=sid)))
        close(got_h, want_h, f"native {n} h")
        close(got_c, want_c, f"native {n} c")


async def test_stateless_calls_carry_client_held_state(server, triton, ref, close, scrape):
    rng = np.random.default_rng(7)
    sequence = rng.integers(0, 260, size=(3, 12))  # a batch of three rows, carried together
    h = c = None
    logits = []
    for start in range(0, 12, 4):
        inputs = [tensor("tokens", sequence[:, start : start + 4])]
        if h is not None:
            inputs += [tensor("h0", h), tensor("c0", c)]
        result = await triton.infer(CHAT, inputs, outputs=wanted("cn", "logits", "hn"))
        assert [o.name for o in result.get_response().outputs] == ["cn", "logits", "hn"]
        h, c = result.as_numpy("hn"), result.as_numpy("cn")
        assert h.shape == (LAYERS, 3, CHAT_HIDDEN)
        logits.append(result.as_numpy("logits"))
    logits = np.concatenate(logits, axis=1)
    for row in range(3):
        want, want_h, want_c = ref.run(CHAT, sequence[row])
        close(logits[row], want, f"row {row} logits")
        close(h[:, row], want_h, f"row {row} h")
        close(c[:, row], want_c, f"row {row} c")

    # The features model, from a state the client made up: state in, state out, nothing stored.
    features = rng.normal(size=(2, 6, 5)).astype(np.float32)
    h0 = rng.normal(scale=0.5, size=(LAYERS, 2, FEATURES_HIDDEN)).astype(np.float32)
    c0 = rng.normal(scale=0.5, size=(LAYERS, 2, FEATURES_HIDDEN)).astype(np.float32)
    result = await triton.infer(FEATURES, [tensor("features", features), tensor("h0", h0), tensor("c0", c0)],
                                outputs=wanted("logits", "hn", "cn"))
    for row in range(2):
        want, want_h, want_c = ref.run(FEATURES, features[row], h0[:, row], c0[:, row])
        close(result.as_numpy("logits")[row], want, f"features row {row} logits")
        close(result.as_numpy("hn")[:, row], want_h, f"features row {row} h")
        close(result.as_numpy("cn")[:, row], want_c, f"features row {row} c")

    # Without outputs named, only the logits come back; without h0/c0 the state is zero.
    result = await triton.infer(FEATURES, [tensor("features", features)])
    assert [o.name for o in result.get_response().outputs] == ["logits"]
    close(result.as_numpy("logits")[1], ref.run(FEATURES, features[1])[0], "zero-state features logits")

    assert server.dataplane.store.count() == 0
    samples = await scrape(server)
    assert samples.get("cellstream_sessions_opened_total") == 0


async def test_features_model_sequence(server, triton, ref, close):
    features = np.random.default_rng(3).normal(size=(9, 5)).astype(np.float32)
    logits = []
    for k, (start, stop) in enumerate(((0, 2), (2, 3), (3, 9))):
        result = await triton.infer(FEATURES, [tensor("features", features[None, start:stop])], sequence_id="f",
                                    sequence_start=k == 0, sequence_end=k == 2)
        logits.append(result.as_numpy("logits")[0])
    close(np.concatenate(logits), ref.run(FEATURES, features)[0], "features sequence logits")


async def test_typed_contents_and_raw_contents_agree(server):
    """tritonclient sends raw_input_contents; other clients send typed contents: both are accepted."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        ids = [3, 1, 4, 1, 5, 9]
        typed = service_pb2.ModelInferRequest(model_name=CHAT)
        typed.inputs.add(name="tokens", datatype="INT64", shape=[1, 6]).contents.int64_contents.extend(ids)
        raw = service_pb2.ModelInferRequest(model_name=CHAT, raw_input_contents=[np.array(ids, "<i8").tobytes()])
        raw.inputs.add(name="tokens", datatype="INT64", shape=[1, 6])
        first, second = await stub.ModelInfer(typed, timeout=30), await stub.ModelInfer(raw, timeout=30)
        assert first.raw_output_contents[0] == second.raw_output_contents[0]
        assert (first.model_name, first.model_version, list(first.outputs[0].shape)) == (CHAT, "1", [1, 6, 260])

        values = np.linspace(-1, 1, 10, dtype=np.float32)
        typed = service_pb2.ModelInferRequest(model_name=FEATURES)
        typed.inputs.add(name="features", datatype="FP32", shape=[1, 2, 5]).contents.fp32_contents.extend(values)
        raw = service_pb2.ModelInferRequest(model_name=FEATURES, raw_input_contents=[values.astype("<f4").tobytes()])
        raw.inputs.add(name="features", datatype="FP32", shape=[1, 2, 5])
        first, second = await stub.ModelInfer(typed, timeout=30), await stub.ModelInfer(raw, timeout=30)
        assert first.raw_output_contents[0] == second.raw_output_contents[0]
        assert len(first.raw_output_contents[0]) == 2 * 7 * 4


async def test_priority_and_timeout_are_accepted(server, triton, ref, close):
    chunk = np.array([7, 8, 9])
    result = await triton.infer(CHAT, [tokens(chunk)], priority=1, timeout=10_000_000)
    close(result.as_numpy("logits")[0], ref.run(CHAT, chunk)[0], "logits with priority and timeout")


async def test_stream_through_the_aio_client(server, triton, ref, close):
    chunks = plan(300)

    async def requests():
        for k, chunk in enumerate(chunks):
            yield {"model_name": CHAT, "inputs": [tokens(chunk)], "sequence_id": "aio", "request_id": str(k),
                   "sequence_start": k == 0, "sequence_end": k == len(chunks) - 1}

    logits = []
    async for result, error in triton.stream_infer(requests()):
        assert error is None, error
        assert result.get_response().id == str(len(logits))
        logits.append(result.as_numpy("logits")[0])
    assert len(logits) == len(chunks)
    close(np.concatenate(logits), ref.run(CHAT, np.concatenate(chunks))[0], "aio stream logits")


async def test_a_cancelled_stream_applies_nothing(server, stub, triton, gate, ref, close, scrape):
    await triton.infer(CHAT, [tokens([1, 2, 3])], sequence_id="kept", sequence_start=True)
    before = await stub.GetState(pb.SessionRef(session_id=sequence_key(CHAT, "kept")))
    batcher = server.dataplane.batchers[CHAT]
    held = gate(server)
    busy = asyncio.create_task(triton.infer(CHAT, [tokens([9])]))  # holds the model
    assert await asyncio.to_thread(held.running.wait, 20)

    async def requests():
        yield {"model_name": CHAT, "inputs": [tokens([4, 5])], "sequence_id": "kept"}
        await asyncio.sleep(30)  # the stub keeps the stream open, then goes away

    stream = triton.stream_infer(requests())
    deadline = time.monotonic() + 20
    while batcher.queued < 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert batcher.queued == 1, "the streamed step never reached the batcher"
    stream.cancel()
    deadline = time.monotonic() + 20  # until the server has seen the stream go: the queued step's caller is gone
    while not batcher._queue[0].future.cancelled() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert batcher._queue[0].future.cancelled()
    held.open.set()
    await busy

    assert await stub.GetState(pb.SessionRef(session_id=sequence_key(CHAT, "kept"))) == before
    samples = await scrape(server)
    assert samples.get("cellstream_steps_dropped_total", model=CHAT, reason="cancelled") == 1
    result = await triton.infer(CHAT, [tokens([4, 5])], sequence_id="kept", sequence_end=True)
    close(result.as_numpy("logits")[0], ref.run(CHAT, np.array([1, 2, 3, 4, 5]))[0][-2:], "after the cancelled stream")
