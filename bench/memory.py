"""Figure 6: resident bytes per idle session, and start-up time to SERVING."""

from __future__ import annotations

import statistics

from cellstream.bench.jobs import OpenIdle
from cellstream.bench.pool import WorkerPool
from cellstream.bench.procfs import rss_bytes
from cellstream.bench.server import ServerProcess
from cellstream.bench.window import READY_TIMEOUT_SECONDS

WARMUP_SESSIONS = 200  # per client process, opened before the first RSS reading
OPEN_CONCURRENCY = 64  # OpenSession calls in flight per client process
OPEN_TIMEOUT_SECONDS = 30.0
MIN_OPENS_PER_SECOND = 200  # bounds the wait for all sessions; far below what the server does


def session_bound_bytes(num_layers: int, hidden_size: int) -> int:
    """The issue's bound: twice the float32 h and C of one session, plus 1 KiB."""
    return 2 * (2 * num_layers * hidden_size * 4) + 1024


def measure_idle_memory(pool: WorkerPool, server: ServerProcess, sessions: int, num_layers: int,
                        hidden_size: int) -> dict[str, object]:
    jobs = [OpenIdle(n, WARMUP_SESSIONS, OPEN_CONCURRENCY, OPEN_TIMEOUT_SECONDS) for n in pool.spread(sessions)]
    pool.start(server.target, jobs, READY_TIMEOUT_SECONDS)
    before = rss_bytes(server.pid)
    pool.go()
    pool.results(READY_TIMEOUT_SECONDS + sessions / MIN_OPENS_PER_SECOND)
    after = rss_bytes(server.pid)
    return {
        "sessions": sessions,
        "rss_before_bytes": before,
        "rss_after_bytes": after,
        "bytes_per_session": (after - before) / sessions,
        "state_bytes_per_session": 2 * num_layers * hidden_size * 4,
        "bound_bytes_per_session": session_bound_bytes(num_layers, hidden_size),
    }


def startup_summary(samples: list[float]) -> dict[str, object]:
    """Every server start of the run was timed from spawn to SERVING."""
    return {"samples_s": samples, "median_s": statistics.median(samples), "max_s": max(samples)}
