"""Long-lived client processes the parent hands jobs to, and starts and stops together.

They are spawned once per benchmark (not per run): a spawned Python with grpc takes about a second
to start on this machine, and forking a parent that already holds grpc channels is unsafe.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnProcess
from types import TracebackType

from cellstream.bench import worker
from cellstream.bench.errors import BenchError
from cellstream.bench.gate import READY
from cellstream.bench.jobs import Assignment, Job
from cellstream.bench.procfs import cpu_seconds
from cellstream.bench.stats import split_evenly

POLL_SECONDS = 0.1
SPAWN_TIMEOUT_SECONDS = 60.0


def _died(process: SpawnProcess) -> BenchError:
    process.join(1)
    return BenchError(f"{process.name} exited with code {process.exitcode} (its traceback is printed above)")


def _receive(process: SpawnProcess, conn: Connection, deadline: float) -> object:
    while not conn.poll(POLL_SECONDS):
        if not process.is_alive():
            raise _died(process)
        if time.monotonic() > deadline:
            raise BenchError(f"{process.name} did not answer in time")
    try:
        return conn.recv()
    except EOFError:  # it died: the pipe's end became readable
        raise _died(process) from None


def _expect_ready(process: SpawnProcess, conn: Connection, deadline: float) -> None:
    if _receive(process, conn, deadline) != READY:
        raise BenchError(f"{process.name} answered out of turn")


class WorkerPool:
    def __init__(self, size: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._go = context.Event()
        self._stop = context.Event()
        self._workers: list[tuple[SpawnProcess, Connection]] = []
        self._busy: list[tuple[SpawnProcess, Connection]] = []
        for k in range(size):
            parent, child = context.Pipe()
            process = context.Process(target=worker.main, args=(child, self._go, self._stop),
                                      name=f"bench-client-{k}", daemon=True)
            process.start()
            child.close()
            self._workers.append((process, parent))
        # Their imports would compete with whatever the parent measures next (a server's start-up).
        deadline = time.monotonic() + SPAWN_TIMEOUT_SECONDS
        for process, conn in self._workers:
            _expect_ready(process, conn, deadline)

    @property
    def size(self) -> int:
        return len(self._workers)

    def spread(self, sessions: int) -> list[int]:
        """Sessions per client process: as even as possible, no process with none unless sessions < size."""
        used = min(self.size, sessions)
        return split_evenly(sessions, used) + [0] * (self.size - used)

    def start(self, target: str, jobs: Sequence[Job | None], timeout: float) -> None:
        """Hand each process its job (None: it idles); return once every busy one is prepared."""
        self._go.clear()
        self._stop.clear()
        self._busy = []
        for (process, conn), job in zip(self._workers, jobs, strict=True):
            if job is not None:
                conn.send(Assignment(target, job))
                self._busy.append((process, conn))
        deadline = time.monotonic() + timeout
        for process, conn in self._busy:
            _expect_ready(process, conn, deadline)

    def go(self) -> None:
        self._go.set()

    def cpu_seconds(self) -> float:
        """CPU time the client processes have used so far (the idle ones' is near zero)."""
        return sum(cpu_seconds(process.pid) for process, _ in self._workers if process.pid is not None)

    def stop(self) -> None:
        self._stop.set()

    def results(self, timeout: float) -> list[object]:
        """What each busy process returned, once it finished its job."""
        deadline = time.monotonic() + timeout
        return [_receive(process, conn, deadline) for process, conn in self._busy]

    def close(self) -> None:
        # A process still waiting to start, or still loading, finishes its job and then reads None.
        self._go.set()
        self._stop.set()
        for process, conn in self._workers:
            if process.is_alive():
                conn.send(None)
        for process, _ in self._workers:
            process.join(5)
            if process.is_alive():
                process.terminate()
                process.join(5)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()
