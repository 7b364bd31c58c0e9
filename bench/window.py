"""One measured run: load from the client processes, the server observed over a window inside it."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from cellstream.bench.errors import BenchError
from cellstream.bench.jobs import Events, Job
from cellstream.bench.pool import WorkerPool
from cellstream.bench.server import ServedProcess
from cellstream.bench.stats import percentile_ms

READY_TIMEOUT_SECONDS = 120.0  # opening 1024 sessions and their streams on a busy 2-core box
FINISH_TIMEOUT_SECONDS = 60.0  # in-flight operations after stop


@dataclass(frozen=True)
class Window:
    events: Events  # operations that ended inside the window
    seconds: float
    server_cpu_seconds: float
    client_cpu_seconds: float  # of the client processes that generated the load
    batches: float  # onnxruntime calls
    batch_steps: float  # session steps in them

    @property
    def mean_batch(self) -> float:
        return self.batch_steps / self.batches if self.batches else math.nan

    def summary(self, per: str) -> dict[str, float]:
        """Rate, latency percentiles, mean batch, and server and client CPU per counted unit (`per`: step,
        token). Server and clients share the machine's cores: the client's CPU says how much of them the load
        generator itself took."""
        latencies = self.events.latencies
        total = self.events.total
        return {
            f"{per}s": total,
            f"{per}s_per_s": total / self.seconds,
            "p50_ms": percentile_ms(latencies, 50),
            "p99_ms": percentile_ms(latencies, 99),
            "mean_batch": self.mean_batch,
            f"server_cpu_us_per_{per}": self.server_cpu_seconds / total * 1e6,
            f"client_cpu_us_per_{per}": self.client_cpu_seconds / total * 1e6,
        }


def measure_window(pool: WorkerPool, server: ServedProcess, jobs: Sequence[Job | None], warmup: float,
                   duration: float) -> Window:
    pool.start(server.target, jobs, READY_TIMEOUT_SECONDS)
    pool.go()
    time.sleep(warmup)
    before, clients_before = server.snapshot(), pool.cpu_seconds()
    time.sleep(duration)
    after, clients_after = server.snapshot(), pool.cpu_seconds()
    pool.stop()
    events = Events.merge(pool.results(FINISH_TIMEOUT_SECONDS)).ended_within(before.time, after.time)
    if not events.end:
        raise BenchError(f"nothing completed within the {duration}s window; lengthen --duration")
    return Window(events, after.time - before.time, after.cpu_seconds - before.cpu_seconds,
                  clients_after - clients_before, after.batches.batches - before.batches.batches,
                  after.batches.steps - before.batches.steps)
