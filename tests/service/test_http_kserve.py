"""The KServe v2 REST face through the real tritonclient.http: health and metadata, stateless calls
(JSON and binary tensors both ways) and client-held state, a Triton sequence stepped alternately over
HTTP and gRPC, and HTTP steps batched with gRPC steps. Exact (cellstream.model.parity's 1e-5) against in-process
onnxruntime on the whole sequence.

tritonclient.http blocks (gevent): each conversation runs in one worker thread while the server serves
on the test's event loop.
"""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from cellstream.bench.server import free_ports
from cellstream.service._proto.cellstream.v1 import inference_pb2 as pb
from cellstream.service.sequences import sequence_key

CHAT, FEATURES = "tiny-chat", "tiny-features"
LAYERS, CHAT_HIDDEN, FEATURES_HIDDEN = 2, 16, 12

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def server(start):
    [port] = free_ports(1)
    return await start(http_port=port)


def http_client(running) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(f"127.0.0.1:{running.http_port}", network_timeout=30)


def tensor(module, name: str, array: np.ndarray, binary: bool = True):
    infer_input = module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    if module is httpclient:
        infer_input.set_data_from_numpy(array, binary_data=binary)
    else:
        infer_input.set_data_from_numpy(array)
    return infer_input


def outputs(names: tuple[str, ...], binary: bool) -> list[httpclient.InferRequestedOutput]:
    return [httpclient.InferRequestedOutput(name, binary_data=binary) for name in names]


async def test_health_and_metadata_through_tritonclient_http(server):
    def conversation() -> dict:
        with http_client(server) as client:
            seen = {
                "live": client.is_server_live(), "ready": client.is_server_ready(),
                "model ready": client.is_model_ready(CHAT), "version ready": client.is_model_ready(FEATURES, "1"),
                "unknown ready": client.is_model_ready("no-such-model"), "v2 ready": client.is_model_ready(CHAT, "2"),
                "server": client.get_server_metadata(), "chat": client.get_model_metadata(CHAT),
                "features": client.get_model_metadata(FEATURES, "1"),
            }
            with pytest.raises(InferenceServerException) as info:
                client.get_model_metadata("no-such-model")
            seen["unknown"] = info.value
            server.kserve.drain()  # what stop() does first: readiness goes, liveness stays
            seen["live after"], seen["ready after"] = client.is_server_live(), client.is_server_ready()
            seen["model ready after"] = client.is_model_ready(CHAT)
            return seen

    seen = await asyncio.to_thread(conversation)
    assert seen["live"] and seen["ready"] and seen["model ready"] and seen["version ready"]
    assert not seen["unknown ready"] and not seen["v2 ready"]
    assert seen["server"]["name"] == "cellstream"
    assert {"sequence", "sequence(string_id)"} <= set(seen["server"]["extensions"])
    chat = seen["chat"]
    assert (chat["name"], chat["versions"], chat["platform"]) == (CHAT, ["1"], "onnxruntime_onnx")
    assert chat["inputs"] == [{"name": "tokens", "datatype": "INT64", "shape": [-1, -1]},
                              {"name": "h0", "datatype": "FP32", "shape": [LAYERS, -1, CHAT_HIDDEN]},
                              {"name": "c0", "datatype": "FP32", "shape": [LAYERS, -1, CHAT_HIDDEN]}]
    assert [o["name"] for o in chat["outputs"]] == ["logits", "hn", "cn"]
    assert seen["features"]["inputs"][0] == {"name": "features", "datatype": "FP32", "shape": [-1, -1, 5]}
    assert seen["unknown"].status() == "404"
    assert "'no-such-model' is not served" in seen["unknown"].message() and CHAT in seen["unknown"].message()
    assert seen["live after"] and not seen["ready after"] and not seen["model ready after"]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
async def test_stateless_calls_with_client_held_state(server, ref, close, binary):
    """A batch of three rows carried in pieces by the client (h0/c0 in, hn/cn out), with tensors as Triton's
    binary data or as JSON both ways; then the features model from a state the client made up."""
    rng = np.random.default_rng(11)
    sequence = rng.integers(0, 260, size=(3, 12))
    features = rng.normal(size=(2, 6, 5)).astype(np.float32)
    h0 = rng.normal(scale=0.5, size=(LAYERS, 2, FEATURES_HIDDEN)).astype(np.float32)
    c0 = rng.normal(scale=0.5, size=(LAYERS, 2, FEATURES_HIDDEN)).astype(np.float32)
    wanted = outputs(("logits", "hn", "cn"), binary)

    def conversation() -> tuple[np.ndarray, np.ndarray, np.ndarray, httpclient.InferResult, httpclient.InferResult]:
        with http_client(server) as client:
            h = c = None
            logits = []
            for start in range(0, 12, 4):
                inputs = [tensor(httpclient, "tokens", sequence[:, start : start + 4], binary)]
                if h is not None:
                    inputs += [tensor(httpclient, "h0", h, binary), tensor(httpclient, "c0", c, binary)]
                result = client.infer(CHAT, inputs, outputs=wanted)
                h, c = result.as_numpy("hn"), result.as_numpy("cn")
                logits.append(result.as_numpy("logits"))
            made_up = client.infer(FEATURES, [tensor(httpclient, "features", features, binary),
                                              tensor(httpclient, "h0", h0, binary),
                                              tensor(httpclient, "c0", c0, binary)], outputs=wanted)
            default = client.infer(FEATURES, [tensor(httpclient, "features", features, binary)])
            return np.concatenate(logits, axis=1), h, c, made_up, default

    logits, h, c, made_up, default = await asyncio.to_thread(conversation)
    assert h.shape == (LAYERS, 3, CHAT_HIDDEN)
    for row in range(3):
        want, want_h, want_c = ref.run(CHAT, sequence[row])
        close(logits[row], want, f"row {row} logits")
        close(h[:, row], want_h, f"row {row} h")
        close(c[:, row], want_c, f"row {row} c")
    for row in range(2):
        want, want_h, want_c = ref.run(FEATURES, features[row], h0[:, row], c0[:, row])
        close(made_up.as_numpy("logits")[row], want, f"features row {row} logits")
        close(made_up.as_numpy("hn")[:, row], want_h, f"features row {row} h")
    # Without outputs named: only the logits, in binary (tritonclient asks for binary_data_output); zero state.
    assert [o["name"] for o in default.get_response()["outputs"]] == ["logits"]
    assert "binary_data_size" in default.get_response()["outputs"][0]["parameters"]
    close(default.as_numpy("logits")[1], ref.run(FEATURES, features[1])[0], "zero-state features logits")
    assert server.dataplane.store.count() == 0, "a stateless call stored something"


async def test_a_sequence_stepped_alternately_over_http_and_grpc(server, ref, close):
    """The same Triton sequences (a string id and an int id), their requests sent over HTTP and gRPC in
    turn, with tritonclient's HTTP and gRPC clients: one sequence, equal to one run of the whole input."""
    rng = np.random.default_rng(5)
    plans = {sid: np.array_split(rng.integers(0, 260, size=21), 7) for sid in ("mixed", 7)}

    def conversation(sid: int | str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        over_grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{server.port}")
        with http_client(server) as over_http, over_grpc:
            logits = []
            chunks = plans[sid]
            for k, chunk in enumerate(chunks):
                last = k == len(chunks) - 1
                module, client = (httpclient, over_http) if k % 2 == (sid == 7) else (grpcclient, over_grpc)
                wanted = [module.InferRequestedOutput(n) for n in ("logits", "hn", "cn")] if last else None
                result = client.infer(CHAT, [tensor(module, "tokens", chunk.reshape(1, -1))], outputs=wanted,
                                      request_id=f"{sid}/{k}", sequence_id=sid, sequence_start=k == 0,
                                      sequence_end=last)
                logits.append(result.as_numpy("logits")[0])
            return np.concatenate(logits), result.as_numpy("hn")[:, 0], result.as_numpy("cn")[:, 0]

    for sid, (logits, h, c) in zip(plans, await asyncio.gather(*(asyncio.to_thread(conversation, s) for s in plans)),
                                   strict=True):
        want, want_h, want_c = ref.run(CHAT, np.concatenate(plans[sid]))
        close(logits, want, f"sequence {sid!r} logits")
        close(h, want_h, f"sequence {sid!r} h")
        close(c, want_c, f"sequence {sid!r} c")
    assert server.dataplane.store.count() == 0, "sequence_end over either transport closes the sequence"


async def test_http_steps_batch_with_grpc_steps(server, stub, gate, eventually, ref, close, step):
    """While the model is held, a KServe sequence step over HTTP and a native Step over gRPC queue; they run
    in one batch when it is released."""
    held, other = [(await stub.OpenSession(pb.OpenSessionRequest())).session_id for _ in range(2)]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.http_port}", timeout=30) as http:
        body = {"inputs": [{"name": "tokens", "datatype": "INT64", "shape": [1, 2], "data": [[5, 6]]}],
                "parameters": {"sequence_id": "batched", "sequence_start": True}}
        first = await http.post(f"/v2/models/{CHAT}/infer", json=body)
        assert first.status_code == 200, first.text
        batcher = server.dataplane.batchers[CHAT]
        hold = gate(server)
        holding = asyncio.ensure_future(stub.Step(step(held, tokens=[1, 2])))
        await asyncio.to_thread(hold.running.wait, 20)
        store, batches = server.dataplane.store, []
        load_many = store.load_many

        async def recording(session_ids: list[str]) -> list:
            batches.append(list(session_ids))
            return await load_many(session_ids)

        store.load_many = recording
        body["parameters"] = {"sequence_id": "batched"}
        body["inputs"][0]["data"] = [[7, 8]]
        stepped = asyncio.create_task(http.post(f"/v2/models/{CHAT}/infer", json=body))
        native = asyncio.ensure_future(stub.Step(step(other, tokens=[9, 10])))
        await eventually(lambda: batcher.queued == 2, "the HTTP and the gRPC step queued behind the held batch")
        hold.open.set()
        response, _, _ = await asyncio.wait_for(asyncio.gather(stepped, native, holding), 30)
    assert response.status_code == 200, response.text
    key = sequence_key(CHAT, "batched")
    assert any(key in batch and other in batch for batch in batches), batches
    got = np.asarray(response.json()["outputs"][0]["data"], np.float32).reshape(2, 260)
    close(got, ref.run(CHAT, np.array([5, 6, 7, 8]))[0][2:], "the HTTP sequence step's logits")
