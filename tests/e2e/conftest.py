"""Fixtures for tests that run `cellstream serve` as real processes (and real redis-server ones, from
tests/conftest.py, as is the in-process onnxruntime reference `ref` their outputs must equal)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cellstream.bench.server import free_ports

REPO = Path(__file__).resolve().parents[2]
CHAT = "tiny-chat"
SERVING = health_pb2.HealthCheckResponse.SERVING


class ServerProcess:
    """`python -m cellstream.service.cli serve` on free loopback ports; `flags` are settings (snake_case names)."""

    def __init__(self, model_dir: Path, log: Path, **flags: object) -> None:
        # Held open together: two ports picked one after the other can be the same one.
        self.port, self.metrics_port = free_ports(2)
        self.log_path = log
        # No HTTP port unless a test asks: the default, 8080, is one per machine (two replicas collide on it).
        settings = {"host": "127.0.0.1", "port": self.port, "metrics_host": "127.0.0.1",
                    "metrics_port": self.metrics_port, "http_port": 0, "model_dir": model_dir, "default_model": CHAT,
                    "ort_intra_op_threads": 1, **flags}
        args = [item for name, value in settings.items() for item in ("--" + name.replace("_", "-"), str(value))]
        env = {k: v for k, v in os.environ.items() if not k.startswith("CELLSTREAM_")}
        self._log = log.open("w")
        self.proc = subprocess.Popen([sys.executable, "-m", "cellstream.service.cli", "serve", *args], cwd=REPO,
                                     env=env, stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    async def wait_serving(self, timeout: float = 60, credentials: grpc.ChannelCredentials | None = None) -> None:
        deadline = time.monotonic() + timeout
        channel = (grpc.aio.secure_channel(self.target, credentials) if credentials
                   else grpc.aio.insecure_channel(self.target))
        async with channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, f"server exited early:\n{self.log()}"
                try:
                    response = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                    if response.status == SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.1)
        raise AssertionError(f"server not SERVING after {timeout}s:\n{self.log()}")

    async def wait_exit(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return self.proc.returncode
            await asyncio.sleep(0.05)
        return None

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS in /proc status")

    def metric(self, name: str) -> float:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            for line in response.read().decode().splitlines():
                if line.startswith(name + " ") or line.startswith(name + "{"):
                    return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"no metric {name}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


@pytest.fixture(scope="session")
def server_process_class() -> type[ServerProcess]:
    """ServerProcess itself, for fixtures of a wider scope than serve_process (the caller kills it)."""
    return ServerProcess


@pytest.fixture
def serve_process(tiny_model_dir: Path, tmp_path: Path) -> Callable[..., ServerProcess]:
    """serve_process(**settings) -> a started ServerProcess (not yet waited for); all killed afterwards."""
    started: list[ServerProcess] = []

    def _start(**flags: object) -> ServerProcess:
        process = ServerProcess(tiny_model_dir, tmp_path / f"server-{len(started)}.log", **flags)
        started.append(process)
        return process

    yield _start
    for process in started:
        process.kill()


