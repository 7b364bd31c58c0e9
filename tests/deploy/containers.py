"""podman as the image tests drive it: the image built once by deploy/build-image.sh (`make image`), containers
on the host network with the Dockerfile's user, and what a test asks of them."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from manifests import DEPLOY, REPO

from cellstream.bench.server import free_ports

PODMAN = shutil.which("podman")
IMAGE = "localhost/cellstream:test"
SERVING = health_pb2.HealthCheckResponse.SERVING


def engine_env() -> dict[str, str]:
    """The environment podman runs with: deploy/containers.conf unless CONTAINERS_CONF names another, as
    build-image.sh does."""
    return {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", str(DEPLOY / "containers.conf"))}


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    assert PODMAN is not None
    result = subprocess.run([PODMAN, *args], capture_output=True, text=True, timeout=timeout, env=engine_env())
    if check:
        assert result.returncode == 0, f"podman {' '.join(args)}: exit {result.returncode}\n{result.stderr}"
    return result


def build_image(timeout: float) -> tuple[str, float]:
    """`make image` as IMAGE: the image's name and the seconds the build took (the base made first if missing)."""
    started = time.monotonic()
    result = subprocess.run([str(DEPLOY / "build-image.sh")], capture_output=True, text=True, timeout=timeout,
                            cwd=REPO, env={**engine_env(), "IMAGE": IMAGE, "ENGINE": "podman"})
    assert result.returncode == 0, f"make image failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return IMAGE, time.monotonic() - started


@dataclass
class Container:
    """A `cellstream serve` container on the host network, on free loopback ports."""

    name: str
    port: int
    http_port: int
    metrics_port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def logs(self) -> str:
        result = podman("logs", self.name, check=False)
        return result.stdout + result.stderr

    def state(self, field: str) -> str:
        return podman("inspect", "--format", "{{." + field + "}}", self.name).stdout.strip()

    def wait_serving(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                assert self.state("State.Running") == "true", f"the container stopped:\n{self.logs()}"
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise AssertionError(f"not SERVING after {timeout} s:\n{self.logs()}")

    def wait_draining(self, timeout: float = 30) -> None:
        """Until health is no longer SERVING (what the server reports from SIGTERM on)."""
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status != SERVING:
                        return
                except grpc.RpcError:
                    return
                time.sleep(0.02)
        raise AssertionError(f"still SERVING {timeout} s after SIGTERM:\n{self.logs()}")

    def stop(self, grace: int) -> tuple[int, float]:
        """SIGTERM, SIGKILL after `grace` seconds (as the kubelet does): the exit status and seconds taken."""
        started = time.monotonic()
        podman("stop", "--time", str(grace), self.name, timeout=grace + 60)
        return int(self.state("State.ExitCode")), time.monotonic() - started

    def remove(self) -> None:
        podman("rm", "--force", self.name, check=False)


class Containers:
    """Starts containers of `image` for one test; removes them all afterwards."""

    def __init__(self, image: str, user: str, prefix: str) -> None:
        self.image, self.user, self.prefix = image, user, prefix
        self.started: list[Container] = []

    def run(self, env: Mapping[str, str] = {}, volumes: Sequence[str] = ()) -> Container:
        """A container with a read-only root filesystem and nothing writable (no tmpfs either) but `volumes`."""
        port, http_port, metrics_port = free_ports(3)
        container = Container(f"{self.prefix}-{len(self.started)}", port, http_port, metrics_port)
        settings = {"CELLSTREAM_HOST": "127.0.0.1", "CELLSTREAM_PORT": port, "CELLSTREAM_HTTP_PORT": http_port,
                    "CELLSTREAM_METRICS_HOST": "127.0.0.1", "CELLSTREAM_METRICS_PORT": metrics_port,
                    "CELLSTREAM_ORT_INTRA_OP_THREADS": 1, **env}
        options = [option for name, value in settings.items() for option in ("--env", f"{name}={value}")]
        options += [option for volume in volumes for option in ("--volume", volume)]
        podman("run", "--detach", "--name", container.name, "--network=host", "--read-only",
               "--read-only-tmpfs=false", "--user", self.user, *options, self.image)
        self.started.append(container)
        return container

    def remove_all(self) -> None:
        for container in self.started:
            container.remove()


def give_to(directory: Path, user: str) -> None:
    """Make `directory` the container user's (rootless podman maps container uids: chown inside its namespace)."""
    uid, _, gid = user.partition(":")
    if os.geteuid() == 0:
        os.chown(directory, int(uid), int(gid))
    else:
        podman("unshare", "chown", user, str(directory))
