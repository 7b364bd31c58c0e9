"""Q. Security on a live server: bearer tokens on every API (not health), session ownership,
per-principal limits, token-file reloads, TLS and mutual TLS with certificates made at test time."""

from __future__ import annotations

import asyncio
import logging
import ssl
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.grpc import InferInput
from tritonclient.grpc import aio as triton_aio
from tritonclient.utils import InferenceServerException

import cellstream
from cellstream import AsyncClient
from cellstream.bench.server import free_ports
from cellstream.connection import tls_credentials
from cellstream.service._proto.cellstream.v1 import inference_pb2 as pb
from cellstream.service._proto.cellstream.v1 import inference_pb2_grpc as pb_grpc
from cellstream.service._proto.inference import grpc_service_pb2, grpc_service_pb2_grpc
from cellstream.service.auth import SecurityConfigError
from cellstream.service.config import SettingsError, load_settings
from cellstream.service.server import start_server

pytestmark = pytest.mark.timeout(90)
ALICE, BOB, CAROL = "alice-token-0123456789abcdef", "bob-token-0123456789abcdef", "carol-token-0123456789abcdef"
SERVING = health_pb2.HealthCheckResponse.SERVING


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def issue(directory: Path, name: str, ca: str, usage: str, san: str = "") -> None:
    """name.key + name.pem, signed by ca.key/ca.pem, for `usage` (serverAuth or clientAuth)."""
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{name}.key",
            "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=directory)
    extensions = directory / f"{name}.ext"
    extensions.write_text(f"extendedKeyUsage={usage}\n" + (f"subjectAltName={san}\n" if san else ""))
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "1", "-extfile", extensions.name, cwd=directory)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1, a client certificate, and a client from another CA."""
    directory = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "rogue-ca"):
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "1", "-subj", f"/CN={ca}", cwd=directory)
    issue(directory, "server", "ca", "serverAuth", "IP:127.0.0.1,DNS:localhost")
    issue(directory, "client", "ca", "clientAuth")
    issue(directory, "rogue", "rogue-ca", "clientAuth")
    return directory


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"# principal token\nalice {ALICE}\nbob   {BOB}  # the second user\n")
    return path


def unauthenticated(error: grpc.aio.AioRpcError | cellstream.CellstreamError, reason: str) -> None:
    """The refusal of a call without a known token (as the stub or the client reports it)."""
    if isinstance(error, cellstream.CellstreamError):
        assert isinstance(error, cellstream.Unauthenticated) and error.applied is False, error
        code, details = error.code, error.message
    else:
        code, details = error.code(), error.details()
    assert code == grpc.StatusCode.UNAUTHENTICATED, error
    assert reason in details
    for secret in (ALICE, BOB, CAROL, "wrong-token"):
        assert secret not in details


async def client_error(call: object) -> cellstream.CellstreamError:
    """The CellstreamError a client call raised (fails if it succeeded)."""
    with pytest.raises(cellstream.CellstreamError) as info:
        await asyncio.wait_for(call, 30)  # type: ignore[arg-type]
    return info.value


async def test_every_api_needs_a_known_token_but_health_does_not(start, token_file, scrape, rpc_error):
    server = await start(auth_token_file=token_file)
    target = f"127.0.0.1:{server.port}"
    async with AsyncClient(target) as anonymous, AsyncClient(target, token="wrong-token-0123456789") as wrong, \
            AsyncClient(target, token=ALICE) as alice, grpc.aio.insecure_channel(target) as channel:
        unauthenticated(await client_error(anonymous.open_session()), "missing credentials")
        unauthenticated(await client_error(anonymous.models()), "missing credentials")
        unauthenticated(await client_error(wrong.open_session()), "unknown or revoked bearer token")
        basic = pb_grpc.InferenceStub(channel).ListModels(
            pb.ListModelsRequest(), metadata=(("authorization", f"Basic {ALICE}"),), timeout=10)
        unauthenticated(await rpc_error(basic), "malformed credentials")

        # The other inference API registered on the server is covered as well.
        kserve = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        unauthenticated(await rpc_error(kserve.ServerLive(grpc_service_pb2.ServerLiveRequest(), timeout=10)),
                        "missing credentials")
        live = await kserve.ServerLive(grpc_service_pb2.ServerLiveRequest(), timeout=10,
                                       metadata=(("authorization", f"Bearer {ALICE}"),))
        assert live.live

        # Probes and tools need no token.
        health = health_pb2_grpc.HealthStub(channel)
        assert (await health.Check(health_pb2.HealthCheckRequest(), timeout=10)).status == SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = [r async for r in reflect.ServerReflectionInfo(
            [reflection_pb2.ServerReflectionRequest(list_services="")], timeout=10)]
        assert replies[0].list_services_response.service

        assert await alice.models()
        async with alice.session() as session:  # the token rides the client's multiplexed streams too
            assert (await session.step([1, 2])).position == 2
            assert await session.reply("hi", max_tokens=2) is not None
    samples = await scrape(server)
    assert samples.get("cellstream_calls_refused_total", reason="unauthenticated") == 5
    for secret in (ALICE, BOB, "wrong-token"):
        assert secret not in samples.text


async def test_a_session_belongs_to_its_principal(start, connect, token_file, rpc_error, step, reply):
    server = await start(auth_token_file=token_file)
    stub = connect(server)
    as_alice, as_bob = (("authorization", f"Bearer {ALICE}"),), (("authorization", f"Bearer {BOB}"),)
    session = await stub.OpenSession(pb.OpenSessionRequest(), metadata=as_alice)
    await stub.Step(step(session.session_id, tokens=[1, 2, 3]), metadata=as_alice)
    unknown = "0" * 32
    for call in (lambda sid: stub.Step(step(sid, tokens=[4]), metadata=as_bob),
                 lambda sid: stub.GetState(pb.SessionRef(session_id=sid), metadata=as_bob),
                 lambda sid: stub.ForkSession(pb.ForkSessionRequest(session_id=sid), metadata=as_bob),
                 lambda sid: stub.CloseSession(pb.SessionRef(session_id=sid), metadata=as_bob)):
        theirs = await rpc_error(call(session.session_id))
        missing = await rpc_error(call(unknown))
        assert theirs.code() == missing.code() == grpc.StatusCode.NOT_FOUND
        # Word for word the answer for an id that does not exist: existence is not revealed.
        assert theirs.details().replace(session.session_id, unknown) == missing.details()
    stream = stub.StreamSteps(metadata=as_bob)
    await stream.write(step(session.session_id, tokens=[4]))
    assert await stream.code() == grpc.StatusCode.NOT_FOUND
    generate = stub.Generate(pb.GenerateRequest(session_id=session.session_id, prompt="hi"), metadata=as_bob)
    assert (await rpc_error(generate.read())).code() == grpc.StatusCode.NOT_FOUND

    state = await stub.GetState(pb.SessionRef(session_id=session.session_id), metadata=as_alice)
    assert state.position == 3, "another principal's calls changed the session"
    fork = await stub.ForkSession(pb.ForkSessionRequest(session_id=session.session_id), metadata=as_alice)
    assert (await stub.Step(step(fork.session_id, tokens=[4]), metadata=as_alice)).position == 4
    refused = await rpc_error(stub.GetState(pb.SessionRef(session_id=fork.session_id), metadata=as_bob))
    assert refused.code() == grpc.StatusCode.NOT_FOUND
    # Through the client: another principal's session cannot even be attached to.
    async with AsyncClient(f"127.0.0.1:{server.port}", token=BOB) as bob:
        with pytest.raises(cellstream.NotFound):
            await bob.attach(session.session_id)


async def test_kserve_sequences_belong_to_their_principal(start, token_file):
    server = await start(auth_token_file=token_file)
    target = f"127.0.0.1:{server.port}"
    triton = triton_aio.InferenceServerClient(target)
    as_alice, as_bob = {"authorization": f"Bearer {ALICE}"}, {"authorization": f"Bearer {BOB}"}

    def tokens(*ids: int) -> InferInput:
        infer_input = InferInput("tokens", [1, len(ids)], "INT64")
        infer_input.set_data_from_numpy(np.array([ids], np.int64))
        return infer_input

    try:
        # The same sequence id for two principals: two sequences, neither disturbs the other.
        await triton.infer("tiny-chat", [tokens(1, 2)], sequence_id=7, sequence_start=True, headers=as_alice)
        with pytest.raises(InferenceServerException, match="must carry the START flag"):
            await triton.infer("tiny-chat", [tokens(3)], sequence_id=7, headers=as_bob)
        await triton.infer("tiny-chat", [tokens(9)], sequence_id=7, sequence_start=True, headers=as_bob)
        assert server.dataplane.store.count() == 2
        await triton.infer("tiny-chat", [tokens(3)], sequence_id=7, sequence_end=True, headers=as_alice)
        await triton.infer("tiny-chat", [tokens(8)], sequence_id=7, sequence_end=True, headers=as_bob)
        assert server.dataplane.store.count() == 0, "sequence_end did not close the caller's sequence"
    finally:
        await triton.close()


async def test_sessions_per_principal_are_bounded(start, token_file):
    server = await start(auth_token_file=token_file, max_sessions_per_principal=2)
    target = f"127.0.0.1:{server.port}"
    async with AsyncClient(target, token=ALICE) as alice, AsyncClient(target, token=BOB) as bob:
        first = await alice.session()
        await alice.session()
        error = await client_error(alice.session())
        assert isinstance(error, cellstream.ResourceExhausted) and "max_sessions_per_principal" in error.message
        assert isinstance(await client_error(first.fork()), cellstream.ResourceExhausted)
        await bob.session()
        await first.close()
        await alice.session()


async def test_token_file_changes_apply_and_a_broken_one_is_ignored(start, token_file, caplog):
    server = await start(auth_token_file=token_file)
    target = f"127.0.0.1:{server.port}"
    async with AsyncClient(target, token=BOB) as bob, AsyncClient(target, token=CAROL) as carol:
        await bob.models()
        token_file.write_text(f"alice {ALICE}\ncarol {CAROL}\n")  # bob revoked, carol added
        await asyncio.sleep(1.2)
        await carol.models()
        unauthenticated(await client_error(bob.models()), "unknown or revoked")

        with caplog.at_level(logging.ERROR, logger="cellstream.service.auth"):
            token_file.write_text("carol short\n")
            await asyncio.sleep(1.2)
            await carol.models()  # the previous tokens stay in force
        assert "shorter than 16 characters; keeping the previous 2 tokens" in caplog.text
        assert CAROL not in caplog.text and "short" not in caplog.text.replace("shorter", "")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read the token file"),
        ("", "no tokens"),
        ("alice\n", r"line 1: expected `<principal> <token> \[<scope> \.\.\.\]`, found 1 field"),
        (f"alice {ALICE} extra\n", r"line 1: unknown scope 'extra'; scopes: admin \(the model repository calls"),
        (f"al/ice {ALICE}\n", "line 1: principal must be"),
        (f"alice {ALICE}\nbob {ALICE}\n", "line 2: token for 'bob' is already given"),
    ],
)
async def test_unusable_token_files_stop_start_up(tiny_model_dir, tmp_path, content, message):
    path = tmp_path / "tokens"
    if content is not None:
        path.write_text(content)
    settings = load_settings(host="127.0.0.1", port=0, metrics_host="127.0.0.1", metrics_port=0,
                             model_dir=tiny_model_dir, default_model="tiny-chat", auth_token_file=path)
    with pytest.raises(SecurityConfigError, match=message) as info:
        await start_server(settings)
    assert ALICE not in str(info.value)


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (("junk", "server.key"), "TLS certificate .* is not PEM"),
        (("server.pem", "missing.key"), "cannot read the TLS key"),
        (("server.pem", "client.key"), "cannot serve TLS on 127.0.0.1:0: check that"),
    ],
)
async def test_unusable_tls_files_stop_start_up(tiny_model_dir, pki, tmp_path, files, message):
    (tmp_path / "junk").write_text("not a certificate")
    cert, key = ((pki if (pki / name).exists() else tmp_path) / name for name in files)
    settings = load_settings(host="127.0.0.1", port=0, metrics_host="127.0.0.1", metrics_port=0,
                             model_dir=tiny_model_dir, default_model="tiny-chat", tls_cert_path=cert,
                             tls_key_path=key)
    with pytest.raises(SecurityConfigError, match=message):
        await start_server(settings)
    with pytest.raises(SettingsError, match="tls_cert_path and tls_key_path go together"):
        load_settings(tls_cert_path=cert)


async def test_tls_and_mutual_tls(start, pki, token_file, rpc_error):
    tls = await start(tls_cert_path=pki / "server.pem", tls_key_path=pki / "server.key")
    target = f"127.0.0.1:{tls.port}"
    async with AsyncClient(target, ca=pki / "ca.pem") as client, client.session() as session:
        assert (await session.step([1])).position == 1
    async with AsyncClient(target, timeout=5, max_attempts=1) as plaintext:
        assert isinstance(await client_error(plaintext.models()), cellstream.Unavailable)

    mutual = await start(tls_cert_path=pki / "server.pem", tls_key_path=pki / "server.key",
                         tls_client_ca_path=pki / "ca.pem", auth_token_file=token_file)
    target = f"127.0.0.1:{mutual.port}"
    async with AsyncClient(target, ca=pki / "ca.pem", cert=pki / "client.pem", key=pki / "client.key",
                           token=ALICE) as client:
        session = await client.session()
        assert (await session.step([1, 2])).position == 2
        assert len([c async for c in session.generate("hi", max_tokens=2)]) >= 1
    refused = {
        "no client certificate": {"ca": pki / "ca.pem"},
        "a certificate from another CA": {"ca": pki / "ca.pem", "cert": pki / "rogue.pem", "key": pki / "rogue.key"},
    }
    for what, files in refused.items():
        async with AsyncClient(target, token=ALICE, timeout=5, max_attempts=1, **files) as client:
            assert isinstance(await client_error(client.models()), cellstream.Unavailable), what
        credentials = tls_credentials(**files)
        async with grpc.aio.secure_channel(target, credentials) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            assert (await rpc_error(health.Check(health_pb2.HealthCheckRequest(), timeout=5))).code() == \
                grpc.StatusCode.UNAVAILABLE, f"{what}: the handshake, not the token check, must refuse it"


async def test_chat_cli_with_token_and_tls(start, pki, tmp_path, token_file):
    server = await start(tls_cert_path=pki / "server.pem", tls_key_path=pki / "server.key",
                         auth_token_file=token_file)
    secret = tmp_path / "alice.token"
    secret.write_text(ALICE + "\n")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cellstream.service.cli", "chat", "--target", f"127.0.0.1:{server.port}",
        "--max-tokens", "3", "--token-file", str(secret), "--ca", str(pki / "ca.pem"),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(b"hello\n\n"), 60)
    assert process.returncode == 0, err.decode()
    assert out.decode().count("bot> ") == 1


async def test_the_http_face_has_the_same_tls_tokens_and_ownership(start, pki, token_file):
    """The HTTP port under the gRPC port's settings: mutual TLS, bearer tokens (health open), and sessions and
    KServe sequences that belong to their principal (another's is not found, word for word)."""
    [port] = free_ports(1)
    server = await start(http_port=port, tls_cert_path=pki / "server.pem", tls_key_path=pki / "server.key",
                         tls_client_ca_path=pki / "ca.pem", auth_token_file=token_file)
    context = ssl.create_default_context(cafile=pki / "ca.pem")
    context.load_cert_chain(pki / "client.pem", pki / "client.key")
    alice, bob = ({"Authorization": f"Bearer {token}"} for token in (ALICE, BOB))
    async with httpx.AsyncClient(base_url=f"https://127.0.0.1:{server.http_port}", verify=context, timeout=10) as http:
        assert (await http.get("/v2/health/ready")).status_code == 200
        missing = await http.get("/v1/models")
        assert (missing.status_code, missing.headers["www-authenticate"]) == (401, "Bearer")
        assert "missing credentials: send the header `authorization: Bearer <token>`" in missing.json()["error"]
        wrong = await http.get("/v1/models", headers={"Authorization": "Bearer wrong-token-0123456789"})
        assert wrong.status_code == 401 and "unknown or revoked bearer token" in wrong.json()["error"]
        assert all(secret not in wrong.text for secret in (ALICE, BOB, "wrong-token"))

        sid = (await http.post("/v1/sessions", headers=alice)).json()["session_id"]
        assert (await http.post(f"/v1/sessions/{sid}/step", headers=alice, json={"text": "hi"})).status_code == 200
        unknown = await http.get("/v1/sessions/feedfeedfeedfeed/state", headers=bob)
        for method, path, body in (("POST", f"/v1/sessions/{sid}/step", {"text": "x"}),
                                   ("GET", f"/v1/sessions/{sid}/state", None), ("DELETE", f"/v1/sessions/{sid}", None),
                                   ("POST", f"/v1/sessions/{sid}/fork", {})):
            refused = await http.request(method, path, headers=bob, json=body)
            assert refused.status_code == 404, (method, path)
            assert refused.json()["error"] == unknown.json()["error"].replace("feedfeedfeedfeed", sid)
        assert (await http.get(f"/v1/sessions/{sid}/state", headers=alice)).json()["position"] == "2"

        infer = {"inputs": [{"name": "tokens", "datatype": "INT64", "shape": [1, 1], "data": [3]}],
                 "parameters": {"sequence_id": 7, "sequence_start": True}}
        assert (await http.post("/v2/models/tiny-chat/infer", headers=alice, json=infer)).status_code == 200
        del infer["parameters"]["sequence_start"]
        others = await http.post("/v2/models/tiny-chat/infer", headers=bob, json=infer)
        assert others.status_code == 400 and "START flag" in others.json()["error"]
        assert (await http.post("/v2/models/tiny-chat/infer", headers=alice, json=infer)).status_code == 200

    no_certificate = ssl.create_default_context(cafile=pki / "ca.pem")
    async with httpx.AsyncClient(verify=no_certificate, timeout=5) as http:
        with pytest.raises(httpx.TransportError):
            await http.get(f"https://127.0.0.1:{server.http_port}/v2/health/live")
    async with httpx.AsyncClient(timeout=5) as http:
        with pytest.raises(httpx.TransportError):
            await http.get(f"http://127.0.0.1:{server.http_port}/v2/health/live")
