"""Figure 0: the floor. The streamed and unary runs of figure 2 (native and KServe), against an empty gRPC server.

An empty grpc.aio server on the same event loop, fed the same bytes by the same client processes at the
same concurrency, costs what gRPC in Python costs on this machine before any work: no service built on
it can answer faster, or step more often, than this. The KServe rows drive it with the real tritonclient,
as figure 2's KServe rows drive cellstream, and it answers with a reply as large as theirs.
"""

from __future__ import annotations

from collections.abc import Sequence

from cellstream.bench.jobs import EchoLoad, Job
from cellstream.bench.options import KSERVE, TRANSPORT, Options
from cellstream.bench.pool import WorkerPool
from cellstream.bench.progress import say
from cellstream.bench.server import ServedProcess
from cellstream.bench.service_load import call_timeout, kserve_jobs
from cellstream.bench.window import measure_window


def measure_floor(pool: WorkerPool, server: ServedProcess, options: Options) -> list[dict[str, object]]:
    runs = []
    transports = dict.fromkeys(TRANSPORT[api] for api in options.apis if api in TRANSPORT)
    levels = sorted({*options.levels, *(options.kserve_levels if set(KSERVE) & set(options.apis) else ())})
    for api in transports:
        for calls in levels:
            say(f"  floor: {api}, {calls} calls")
            jobs = [EchoLoad(api, n, call_timeout(options)) if n else None for n in pool.spread(calls)]
            runs.append(_run(pool, server, api, calls, jobs, options))
    for api in (api for api in KSERVE if api in options.apis):
        for calls in options.kserve_levels:
            say(f"  floor: {api} (tritonclient), {calls} calls")
            runs.append(_run(pool, server, api, calls, kserve_jobs(pool, api, calls, options), options))
    return runs


def _run(pool: WorkerPool, server: ServedProcess, api: str, calls: int, jobs: Sequence[Job | None],
         options: Options) -> dict[str, object]:
    window = measure_window(pool, server, jobs, options.warmup_seconds, options.duration_seconds)
    summary = window.summary("message")
    del summary["mean_batch"]  # nothing is batched
    return {"api": api, "calls": calls, **summary}
