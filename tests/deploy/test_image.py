"""The image itself, built by `make image` (deploy/build-image.sh: on a stand-in base made once where no registry
is reachable) and run with podman as Kubernetes would run it: the host's network, a read-only root filesystem
with nothing writable besides its volumes, the Dockerfile's numeric user. It answers over gRPC, HTTP and
/metrics, its HEALTHCHECK passes, SIGTERM drains what is in flight within the manifests' grace period, and a
session continues exactly in a new container, from the snapshot volume or from Redis.

Built once per test session (podman's layer cache makes an unchanged rebuild take seconds); the first build on a
machine also makes the base (about 3 minutes in all, docs/DEPLOY.md)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import urllib.request
from collections.abc import AsyncIterator

import dockerfile
import grpc
import numpy as np
import pytest
from containers import PODMAN, Containers, build_image, give_to, podman
from manifests import DOCKERFILE, environment, find, server_container

from cellstream.bench.otlp import TraceSink
from cellstream.service._proto.cellstream.v1 import inference_pb2 as pb
from cellstream.service._proto.cellstream.v1 import inference_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.skipif(PODMAN is None, reason="podman is not installed (.ci/run installs it: apt-get "
                                                         "install podman runc buildah mmdebstrap)"),
              pytest.mark.timeout(900)]  # the first test builds the image, and on a new machine its base
RUNTIME = dockerfile.parse(DOCKERFILE)[-1]
USER = RUNTIME.one("USER").arguments
MAX_IMAGE_BYTES = 350 * 10**6
# Installed only by extras the image leaves out.
NOT_IN_IMAGE = ("torch", "onnx", "tqdm", "pytest", "hypothesis", "tritonclient", "grpc_tools", "matplotlib")
COMPILERS = ("gcc", "cc", "c++", "g++", "clang", "make")


@contextlib.asynccontextmanager
async def inference(target: str) -> AsyncIterator[pb_grpc.InferenceStub]:
    """The generated cellstream.v1 stub on a channel to `target` (the RPCs as they are on the wire)."""
    async with grpc.aio.insecure_channel(target) as channel:
        yield pb_grpc.InferenceStub(channel)


def tokens(*ids: int, session_id: str = "", logits: bool = False) -> pb.StepRequest:
    return pb.StepRequest(session_id=session_id, tokens=pb.TokenSequence(ids=ids), want=pb.Outputs(logits=logits))


@pytest.fixture(scope="session")
def image() -> str:
    name, seconds = build_image(timeout=840)
    print(f"make image: {seconds:.0f} s")
    return name


@pytest.fixture
def containers(image, request):
    started = Containers(image, USER, f"cellstream-test-{os.getpid()}-{request.node.name[:40].replace('[', '-')}"
                         .rstrip("]").replace("]", ""))
    yield started
    started.remove_all()


def test_the_image_holds_the_server_and_its_runtime_only(image):
    size = int(podman("image", "inspect", "--format", "{{.Size}}", image).stdout)
    assert size <= MAX_IMAGE_BYTES, f"the image has {size / 1e6:.0f} MB, more than {MAX_IMAGE_BYTES / 1e6:.0f}"
    config = json.loads(podman("image", "inspect", "--format", "{{json .Config}}", image).stdout)
    assert config["User"] == USER and config["Entrypoint"] == ["cellstream", "serve"]
    healthcheck = json.loads(podman("inspect", "--format", "{{json .HealthCheck}}", image).stdout)
    assert healthcheck["Test"] == ["CMD", *RUNTIME.one("HEALTHCHECK").exec_form()]

    def inside(*command: str) -> str:
        return podman("run", "--rm", "--network=host", "--read-only", "--entrypoint", command[0], image,
                      *command[1:]).stdout

    assert inside("python", "-m", "pip", "check").strip() == "No broken requirements found."
    found = inside("python", "-c", "import importlib.util as u; "
                   f"print([m for m in {NOT_IN_IMAGE!r} if u.find_spec(m)], bool(u.find_spec('opentelemetry.sdk')))")
    assert found.strip() == "[] True", "extras other than tracing are in the image, or tracing is not"
    compilers = podman("run", "--rm", "--network=host", "--entrypoint", "sh", image, "-c",
                       f"for c in {' '.join(COMPILERS)}; do command -v $c; done", check=False)
    assert compilers.stdout.strip() == "", f"compilers in the image: {compilers.stdout}"


def test_it_serves_read_only_as_its_user_and_its_healthcheck_passes(containers):
    with TraceSink() as sink:
        container = containers.run({"OTEL_EXPORTER_OTLP_ENDPOINT": sink.http_endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50",
                                    "CELLSTREAM_LOG_FORMAT": "json"})
        container.wait_serving()
        health = podman("healthcheck", "run", container.name, check=False)
        assert health.returncode == 0 and container.state("State.Health.Status") == "healthy", health.stdout
        assert podman("top", container.name, "user").stdout.split()[1:] == [USER.partition(":")[0]]

        async def chat() -> str:
            async with inference(container.target) as stub:
                session = (await stub.OpenSession(pb.OpenSessionRequest(), timeout=30)).session_id
                await stub.Step(pb.StepRequest(session_id=session, text="user: my name is alice.\nbot: hello alice!\n"),
                                timeout=30)
                turn = pb.GenerateRequest(session_id=session, prompt="user: what is my name?\nbot: ", stop=["\n"],
                                          max_tokens=40)
                return "".join([chunk.text async for chunk in stub.Generate(turn, timeout=30)])

        assert "alice" in asyncio.run(chat())
        body = json.dumps({"inputs": [{"name": "tokens", "datatype": "INT64", "shape": [1, 3], "data": [104, 105, 10]}],
                           "parameters": {"sequence_id": "image", "sequence_start": True}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{container.http_port}/v2/models/cellstream-chat/infer",
                                         body, {"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert json.loads(response.read())["outputs"][0]["shape"] == [1, 3, 260]
        with urllib.request.urlopen(f"http://127.0.0.1:{container.metrics_port}/metrics", timeout=30) as response:
            scrape = response.read().decode()
        assert 'cellstream_requests_total{code="OK",method="Generate"} 1.0' in scrape
        assert 'cellstream_http_requests_total{code="200",route="/v2/models/{model}/infer"} 1.0' in scrape
        # Traced from inside the image (the tracing extra), exported over OTLP/HTTP to the host.
        spans = sink.wait_for(lambda spans: any(s.name.endswith("/Generate") for s in spans))
        assert {s.resource["service.name"] for s in spans} == {"cellstream"}
    lines = [line for line in container.logs().splitlines() if line.startswith("{")]
    assert any(json.loads(line)["message"].startswith("serving ['cellstream-chat'") for line in lines), lines


def test_sigterm_drains_in_flight_calls_and_exits_0_within_the_grace_period(containers, rendered):
    deployment = find(rendered["single"], "Deployment", "cellstream")["spec"]["template"]["spec"]
    pause = server_container(rendered["single"])["lifecycle"]["preStop"]["sleep"]["seconds"]
    # The kubelet sends SIGTERM after the preStop pause, and SIGKILL at terminationGracePeriodSeconds.
    budget = deployment["terminationGracePeriodSeconds"] - pause
    container = containers.run()
    container.wait_serving()

    async def drain() -> tuple[list[int], grpc.StatusCode, int, float]:
        async with inference(container.target) as stub:
            session = (await stub.OpenSession(pb.OpenSessionRequest(), timeout=60)).session_id
            stream = stub.StreamSteps(timeout=60)
            await stream.write(tokens(1, session_id=session))
            positions = [(await stream.read()).position]
            stopping = asyncio.create_task(asyncio.to_thread(container.stop, budget))
            await asyncio.to_thread(container.wait_draining)
            with pytest.raises(grpc.aio.AioRpcError) as refused:  # a new call while it drains
                await stub.Step(tokens(2, session_id=session), timeout=60)
            for token in (3, 4, 5):  # the stream in flight goes on
                await stream.write(tokens(token))
                positions.append((await stream.read()).position)
            await stream.done_writing()
            assert await stream.code() == grpc.StatusCode.OK
            exit_status, seconds = await stopping
            return positions, refused.value.code(), exit_status, seconds

    positions, refusal, exit_status, seconds = asyncio.run(drain())
    assert positions == [1, 2, 3, 4]
    assert refusal == grpc.StatusCode.UNAVAILABLE
    assert exit_status == 0, container.logs()
    assert seconds < budget, f"took {seconds:.1f} s to stop, the pod has {budget} s after its preStop pause"
    assert "signal received: draining" in container.logs()


@pytest.mark.parametrize("store", ["snapshot", "redis"])
def test_a_session_continues_exactly_in_a_new_container(store, containers, rendered, tmp_path, request):
    if store == "snapshot":  # as overlays/single mounts it
        single = server_container(rendered["single"])
        snapshot = environment(rendered["single"], single)["CELLSTREAM_SNAPSHOT_PATH"]
        [mount] = [m["mountPath"] for m in single["volumeMounts"] if snapshot.startswith(m["mountPath"] + "/")]
        volume = tmp_path / "sessions"
        volume.mkdir()
        give_to(volume, USER)
        env, volumes = {"CELLSTREAM_SNAPSHOT_PATH": snapshot}, [f"{volume}:{mount}"]
    else:
        redis = request.getfixturevalue("redis_server")  # on the host: the container shares its network
        env, volumes = {"CELLSTREAM_STATE_STORE": redis.url}, []
    first = containers.run(env, volumes)
    first.wait_serving()

    async def before() -> tuple[str, pb.State, list[float]]:
        async with inference(first.target) as stub:
            session = (await stub.OpenSession(pb.OpenSessionRequest(ttl_seconds=600), timeout=30)).session_id
            await stub.Step(pb.StepRequest(session_id=session, text="user: my name is alice.\nbot: hello alice!\n"
                                                                    "user: i live in paris.\n"), timeout=30)
            # What the next step gives, without moving the session:
            fork = (await stub.ForkSession(pb.ForkSessionRequest(session_id=session), timeout=30)).session_id
            expected = list((await stub.Step(tokens(98, session_id=fork, logits=True), timeout=30)).logits)
            await stub.CloseSession(pb.SessionRef(session_id=fork), timeout=30)
            return session, await stub.GetState(pb.SessionRef(session_id=session), timeout=30), expected

    session, state, expected = asyncio.run(before())
    exit_status, _ = first.stop(30)
    assert exit_status == 0, first.logs()
    if store == "snapshot":
        assert (volume / "sessions.snap").exists(), first.logs()
    second = containers.run(env, volumes)
    second.wait_serving()

    async def after() -> tuple[pb.State, list[float]]:
        async with inference(second.target) as stub:
            restored = await stub.GetState(pb.SessionRef(session_id=session), timeout=30)
            return restored, list((await stub.Step(tokens(98, session_id=session, logits=True), timeout=30)).logits)

    restored, logits = asyncio.run(after())
    assert restored.position == state.position > 0
    assert np.array_equal(np.asarray(restored.h, np.float32), np.asarray(state.h, np.float32))
    assert np.array_equal(np.asarray(restored.c, np.float32), np.asarray(state.c, np.float32))
    assert len(logits) == 260 and np.array_equal(np.asarray(logits, np.float32), np.asarray(expected, np.float32))
    if store == "snapshot":
        assert "restored 1 sessions" in second.logs() and not (volume / "sessions.snap").exists()
