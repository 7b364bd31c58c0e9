"""Figure 2: streamed 1-token steps over StreamSteps and unary Step, at each level of concurrent sessions."""

from __future__ import annotations

from bench.jobs import StepLoad
from bench.options import Options
from bench.pool import WorkerPool
from bench.progress import say
from bench.server import ServerProcess
from bench.window import measure_window

CALL_MARGIN_SECONDS = 60.0  # a call outlives the run by this much before gRPC gives up on it


def measure_steps(pool: WorkerPool, server: ServerProcess, api: str, sessions: int,
                  options: Options) -> dict[str, object]:
    timeout = options.warmup_seconds + options.duration_seconds + CALL_MARGIN_SECONDS
    jobs = [StepLoad(api, n, timeout) if n else None for n in pool.spread(sessions)]
    window = measure_window(pool, server, jobs, options.warmup_seconds, options.duration_seconds)
    return {"api": api, "sessions": sessions, **window.summary("step")}


def measure_service(pool: WorkerPool, server: ServerProcess, options: Options, label: str) -> list[dict[str, object]]:
    runs = []
    for api in options.apis:
        for sessions in options.levels:
            say(f"  {label}: {api}, {sessions} sessions")
            runs.append(measure_steps(pool, server, api, sessions, options))
    return runs
