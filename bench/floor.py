"""Figure 0: the floor. The streamed and unary runs of figure 2, against an empty gRPC server.

An empty grpc.aio server on the same event loop, fed the same bytes by the same client processes at the
same concurrency, costs what gRPC in Python costs on this machine before any work: no service built on
it can answer faster, or step more often, than this.
"""

from __future__ import annotations

from bench.jobs import EchoLoad
from bench.options import MULTIPLEXED, Options
from bench.pool import WorkerPool
from bench.progress import say
from bench.server import ServedProcess
from bench.service_load import call_timeout
from bench.window import measure_window


def measure_floor(pool: WorkerPool, server: ServedProcess, options: Options) -> list[dict[str, object]]:
    runs = []
    for api in (api for api in options.apis if api not in MULTIPLEXED):
        for calls in options.levels:
            say(f"  floor: {api}, {calls} calls")
            jobs = [EchoLoad(api, n, call_timeout(options)) if n else None for n in pool.spread(calls)]
            window = measure_window(pool, server, jobs, options.warmup_seconds, options.duration_seconds)
            summary = window.summary("message")
            del summary["mean_batch"]  # nothing is batched
            runs.append({"api": api, "calls": calls, **summary})
    return runs
