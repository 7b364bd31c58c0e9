"""The model repository calls over every face: KServe gRPC and REST through the real tritonclient (grpc and
http), the native LoadModel/UnloadModel and their JSON routes; guarded by the admin token scope, audited in
the log, and refused with a status that says why when they cannot apply."""

from __future__ import annotations

import asyncio
import logging

import grpc
import httpx
import pytest
import tritonclient.http as httpclient
from tritonclient.grpc import aio as triton_aio
from tritonclient.utils import InferenceServerException

from cellstream.bench.server import free_ports
from cellstream.service._proto.cellstream.v1 import inference_pb2 as pb
from cellstream.service._proto.cellstream.v1 import inference_pb2_grpc as pb_grpc
from cellstream.service._proto.inference import grpc_service_pb2 as kserve_pb
from cellstream.service._proto.inference import grpc_service_pb2_grpc

pytestmark = pytest.mark.timeout(120)
CHAT = "tiny-chat"
ADMIN_TOKEN, USER_TOKEN = "ops-token-0123456789abcdef", "alice-token-0123456789abcd"


@pytest.fixture
async def served(start, repository):
    """A server of tiny-chat versions 1 and 2 under explicit control, with an HTTP port."""
    repository.add(CHAT, 1, "v1")
    repository.add(CHAT, 2, "v2")
    [port] = free_ports(1)
    return await start(model_dir=repository.path, model_control="explicit", load_model="*", default_model=CHAT,
                       http_port=port)


async def test_tritonclient_http_repository_calls_work_unchanged(served, repository):
    def conversation() -> dict:
        with httpclient.InferenceServerClient(f"127.0.0.1:{served.http_port}", network_timeout=30) as client:
            seen = {"extensions": client.get_server_metadata()["extensions"],
                    "index": client.get_model_repository_index(),
                    "v1 ready": client.is_model_ready(CHAT, "1"), "v2 ready": client.is_model_ready(CHAT, "2"),
                    "versions": client.get_model_metadata(CHAT)["versions"]}
            repository.remove(CHAT, 2)
            client.load_model(CHAT)
            seen["after load"] = client.get_model_repository_index()
            seen["v2 after load"] = client.is_model_ready(CHAT, "2")
            client.unload_model(CHAT)
            seen["after unload"] = client.get_model_repository_index()
            seen["ready after unload"] = client.is_model_ready(CHAT)
            for name, call in (("missing", lambda: client.load_model("no-such-model")),
                               ("config", lambda: client.load_model(CHAT, config="{}"))):
                try:
                    call()
                    seen[name] = None
                except InferenceServerException as exc:
                    seen[name] = (exc.status(), exc.message())
            return seen

    seen = await asyncio.to_thread(conversation)
    assert "model_repository" in seen["extensions"]
    assert seen["index"] == [{"name": CHAT, "version": "1", "state": "READY", "reason": "0 live sessions"},
                             {"name": CHAT, "version": "2", "state": "READY", "reason": "0 live sessions"}]
    assert (seen["v1 ready"], seen["v2 ready"], seen["versions"]) == (True, True, ["1", "2"])
    assert seen["after load"] == [{"name": CHAT, "version": "1", "state": "READY", "reason": "0 live sessions"}]
    assert seen["v2 after load"] is False
    assert seen["after unload"] == [{"name": CHAT, "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"}]
    assert seen["ready after unload"] is False
    assert seen["missing"][0] == "404" and "'no-such-model' is not in the model repository" in seen["missing"][1]
    assert seen["config"][0] == "400" and "config and file: parameters" in seen["config"][1]


async def test_repository_calls_over_grpc_and_json(served, repository, rpc_error):
    async with triton_aio.InferenceServerClient(f"127.0.0.1:{served.port}") as triton, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{served.http_port}", timeout=30) as http:
        ready = await triton.get_model_repository_index(as_json=True)
        assert [(m["name"], m["version"], m["state"]) for m in ready["models"]] == [(CHAT, "1", "READY"),
                                                                                 (CHAT, "2", "READY")]
        await triton.unload_model(CHAT)
        assert not await triton.is_model_ready(CHAT, "1") and not await triton.is_model_ready(CHAT)
        only_ready = await http.post("/v2/repository/index", json={"ready": True})
        assert (only_ready.status_code, only_ready.json()) == (200, [])
        await triton.load_model(CHAT)
        assert await triton.is_model_ready(CHAT, "2")

        # A version named in the path runs that version; the response says which ran.
        body = {"inputs": [{"name": "tokens", "datatype": "INT64", "shape": [1, 2], "data": [104, 105]}]}
        for path, version in ((f"/v2/models/{CHAT}/versions/1/infer", "1"), (f"/v2/models/{CHAT}/infer", "2")):
            inferred = await http.post(path, json=body)
            assert (inferred.status_code, inferred.json()["model_version"]) == (200, version)
        opened = (await http.post("/v1/sessions", json={"model": CHAT, "model_version": 1})).json()
        assert opened["model_version"] == "1"
        assert (await http.delete(f"/v1/sessions/{opened['session_id']}")).status_code == 200

        # The native API's equivalents, over gRPC and as JSON.
        unloaded = await http.post(f"/v1/models/{CHAT}/unload")
        assert unloaded.status_code == 200 and unloaded.json() == {"model": CHAT, "versions": []}
        loaded = await http.post(f"/v1/models/{CHAT}/load")
        assert [(v["version"], v["state"]) for v in loaded.json()["versions"]] == [("1", "READY"), ("2", "READY")]
        empty = await http.post("/v2/repository/models//load")
        assert empty.status_code == 404
        async with grpc.aio.insecure_channel(f"127.0.0.1:{served.port}") as channel:
            native = pb_grpc.InferenceStub(channel)
            nameless = await rpc_error(native.LoadModel(pb.LoadModelRequest(model=""), timeout=30))
            assert nameless.code() == grpc.StatusCode.INVALID_ARGUMENT and "name the model to load" in \
                nameless.details()
            kserve = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
            elsewhere = await rpc_error(kserve.RepositoryIndex(kserve_pb.RepositoryIndexRequest(
                repository_name="elsewhere"), timeout=30))
            assert elsewhere.code() == grpc.StatusCode.INVALID_ARGUMENT and "serves one model repository" in \
                elsewhere.details()


async def test_repository_calls_need_the_admin_scope_and_are_audited(start, repository, tmp_path, caplog,
                                                                     rpc_error, connect, step):
    repository.add(CHAT, 1, "v1")
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice {USER_TOKEN}\nops {ADMIN_TOKEN} admin  # may load and unload models\n")
    [port] = free_ports(1)
    running = await start(model_dir=repository.path, model_control="explicit", load_model="*", default_model=CHAT,
                          auth_token_file=tokens, http_port=port)
    target, admin = f"127.0.0.1:{running.port}", {"authorization": f"Bearer {ADMIN_TOKEN}"}
    stub = connect(running)
    alice, ops = ((("authorization", f"Bearer {token}"),) for token in (USER_TOKEN, ADMIN_TOKEN))
    with caplog.at_level(logging.INFO, logger="cellstream.audit"):
        async with triton_aio.InferenceServerClient(target) as triton, \
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{running.http_port}", timeout=30) as http:
            session = await stub.OpenSession(pb.OpenSessionRequest(), metadata=alice)
            for call in (stub.LoadModel(pb.LoadModelRequest(model=CHAT), metadata=alice),
                         stub.UnloadModel(pb.UnloadModelRequest(model=CHAT), metadata=alice)):
                denied = await rpc_error(call)
                assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
                assert "needs a token with the scope 'admin', which the token of 'alice' does not have" in \
                    denied.details()
            user = {"authorization": f"Bearer {USER_TOKEN}"}
            with pytest.raises(InferenceServerException, match="scope 'admin'"):
                await triton.get_model_repository_index(headers=user)
            refused = await http.post(f"/v2/repository/models/{CHAT}/unload", headers=user)
            assert refused.status_code == 403 and "scope 'admin'" in refused.json()["error"]
            assert (await stub.ListModels(pb.ListModelsRequest(), metadata=alice)).models, \
                "everything else stays open to alice"

            repository.add(CHAT, 2, "v2")
            assert [v.version for v in (await stub.LoadModel(pb.LoadModelRequest(model=CHAT), metadata=ops)).versions] \
                == [1, 2]
            index = await triton.get_model_repository_index(headers=admin)
            assert {m.version for m in index.models} == {"1", "2"}
            unloaded = await http.post(f"/v2/repository/models/{CHAT}/unload", headers=admin)
            assert unloaded.status_code == 200
            assert (await stub.Step(step(session.session_id, tokens=[1, 2]), metadata=alice)).position == 2, \
                "v1 drains: alice goes on"
    audit = [record.getMessage() for record in caplog.records if record.name == "cellstream.audit"]
    assert audit[0].startswith("repository load 'tiny-chat' by alice: refused, PERMISSION_DENIED: ")
    assert audit[1].startswith("repository unload 'tiny-chat' by alice: refused, PERMISSION_DENIED: ")
    assert audit[2].startswith("repository index by alice: refused, PERMISSION_DENIED")
    assert audit[3].startswith("repository unload 'tiny-chat' by alice: refused, PERMISSION_DENIED")
    assert audit[4:] == ["repository load 'tiny-chat' by ops: OK: loaded 2",
                         "repository unload 'tiny-chat' by ops: OK: draining 1; released 2"]
    for secret in (USER_TOKEN, ADMIN_TOKEN):
        assert secret not in caplog.text
