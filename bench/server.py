"""Servers in separate processes on 127.0.0.1 (`cellstream serve`, the empty echo server), timed from spawn
to SERVING."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cellstream.bench.errors import BenchError
from cellstream.bench.procfs import cpu_seconds
from cellstream.bench.scrape import BatchCounters, batch_counters

HOST = "127.0.0.1"
STARTUP_TIMEOUT_SECONDS = 60.0
HEALTH_POLL_SECONDS = 0.005
SHUTDOWN_GRACE_SECONDS = 1.0
# gRPC backs off up to seconds between failed connects by default, which would be timed as start-up.
FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 5),
    ("grpc.min_reconnect_backoff_ms", 5),
    ("grpc.max_reconnect_backoff_ms", 20),
]


@dataclass(frozen=True)
class Snapshot:
    """The server at one instant: its CPU time so far and its batch counters."""

    time: float  # time.monotonic()
    cpu_seconds: float
    batches: BatchCounters


def free_ports(count: int) -> list[int]:
    """Ports free right now on HOST (all held open together, so they differ)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in sockets:
            s.bind((HOST, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class ServedProcess:
    """A server in its own process on HOST, a context manager: started (and timed to SERVING, by gRPC
    health) on enter, stopped with SIGTERM on exit."""

    def __init__(self, argv: list[str], port: int, metrics_url: str | None, log_path: Path) -> None:
        self.argv = argv
        self.port = port
        self.target = f"{HOST}:{port}"
        self.metrics_url = metrics_url  # None: no /metrics, so no batch counters (the echo server)
        self.log_path = log_path
        self.startup_seconds = 0.0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self._process is None:
            raise BenchError("the server is not running")
        return self._process.pid

    def __enter__(self) -> Self:
        with self.log_path.open("wb") as log:
            started = time.monotonic()
            self._process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            self._wait_serving(started + STARTUP_TIMEOUT_SECONDS)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()

    def _wait_serving(self, deadline: float) -> None:
        request = health_pb2.HealthCheckRequest()
        with grpc.insecure_channel(self.target, options=FAST_RECONNECT) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            while True:
                try:
                    if check(request, timeout=1.0).status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass  # not listening yet: keep polling
                if self._process is not None and self._process.poll() is not None:
                    raise BenchError(f"the server exited with code {self._process.returncode}:\n{self.log_tail()}")
                if time.monotonic() > deadline:
                    raise BenchError(f"the server was not SERVING within {STARTUP_TIMEOUT_SECONDS:.0f}s:\n"
                                     f"{self.log_tail()}")
                time.sleep(HEALTH_POLL_SECONDS)

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def snapshot(self) -> Snapshot:
        now = time.monotonic()
        batches = batch_counters(self.metrics_url) if self.metrics_url else BatchCounters(0.0, 0.0)
        return Snapshot(now, cpu_seconds(self.pid), batches)

    def stop(self) -> None:
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.terminate()  # SIGTERM: the server drains and exits by itself
            try:
                self._process.wait(SHUTDOWN_GRACE_SECONDS + 10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None


class ServerProcess(ServedProcess):
    """`cellstream serve` with the harness's settings (and the user's --serve-arg words last)."""

    def __init__(self, model_dir: Path, model: str, settings: dict[str, object], extra_args: tuple[str, ...],
                 log_path: Path) -> None:
        port, metrics_port, self.http_port = free_ports(3)
        flags = {"host": HOST, "port": port, "metrics_host": HOST, "metrics_port": metrics_port,
                 "http_port": self.http_port, "model_dir": model_dir, "default_model": model, "log_level": "WARNING",
                 "shutdown_grace_seconds": SHUTDOWN_GRACE_SECONDS, **settings}
        argv = [sys.executable, "-m", "cellstream.service.cli", "serve"]
        for name, value in flags.items():
            argv += ["--" + name.replace("_", "-"), str(value)]
        argv += extra_args  # argparse keeps the last value of a repeated flag: the user's wins
        super().__init__(argv, port, f"http://{HOST}:{metrics_port}/metrics", log_path)


class EchoProcess(ServedProcess):
    """The empty gRPC server of bench/echo.py; its KServe replies carry `outputs` FP32 values of `output`."""

    def __init__(self, log_path: Path, output: str, outputs: int) -> None:
        [port] = free_ports(1)
        super().__init__([sys.executable, "-m", "cellstream.bench.echo", "--host", HOST, "--port", str(port),
                          "--output", output, "--outputs", str(outputs)], port, None, log_path)
