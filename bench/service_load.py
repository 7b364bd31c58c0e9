"""Figure 2: 1-token steps over StreamSteps and unary Step at each level of concurrent sessions, and over
the multiplexed StreamMany and StepMany (many sessions per message) spread over a few calls."""

from __future__ import annotations

from cellstream.bench.jobs import HttpLoad, KServeLoad, ManyLoad, StepLoad
from cellstream.bench.options import API_KSERVE_HTTP, API_KSERVE_STREAM, KSERVE, KSERVE_OUTPUT, MULTIPLEXED, Options
from cellstream.bench.pool import WorkerPool
from cellstream.bench.progress import say
from cellstream.bench.server import HOST, ServerProcess
from cellstream.bench.stats import split_evenly
from cellstream.bench.window import measure_window

CALL_MARGIN_SECONDS = 60.0  # a call outlives the run by this much before gRPC gives up on it


def call_timeout(options: Options) -> float:
    return options.warmup_seconds + options.duration_seconds + CALL_MARGIN_SECONDS


def measure_steps(pool: WorkerPool, server: ServerProcess, api: str, sessions: int,
                  options: Options) -> dict[str, object]:
    """One stream (or unary call in flight) per session."""
    jobs = [StepLoad(api, n, call_timeout(options)) if n else None for n in pool.spread(sessions)]
    window = measure_window(pool, server, jobs, options.warmup_seconds, options.duration_seconds)
    return {"api": api, "sessions": sessions, "calls": sessions, **window.summary("step")}


def kserve_jobs(pool: WorkerPool, api: str, sessions: int, options: Options) -> list[KServeLoad | None]:
    """`sessions` KServe sequences of tritonclient, unary or one stream each, spread over the client processes."""
    return [KServeLoad(n, api == API_KSERVE_STREAM, options.model, KSERVE_OUTPUT, call_timeout(options)) if n else None
            for n in pool.spread(sessions)]


def measure_kserve(pool: WorkerPool, server: ServerProcess, api: str, sessions: int,
                   options: Options) -> dict[str, object]:
    """`sessions` KServe sequences stepped by tritonclient, unary or one stream each."""
    jobs = kserve_jobs(pool, api, sessions, options)
    window = measure_window(pool, server, jobs, options.warmup_seconds, options.duration_seconds)
    return {"api": api, "sessions": sessions, "calls": sessions, **window.summary("step")}


def measure_http(pool: WorkerPool, server: ServerProcess, sessions: int, options: Options) -> dict[str, object]:
    """`sessions` KServe sequences stepped over the HTTP port by tritonclient.http, a request in flight each."""
    url = f"{HOST}:{server.http_port}"
    jobs = [HttpLoad(url, n, options.model, KSERVE_OUTPUT, call_timeout(options)) if n else None
            for n in pool.spread(sessions)]
    window = measure_window(pool, server, jobs, options.warmup_seconds, options.duration_seconds)
    return {"api": API_KSERVE_HTTP, "sessions": sessions, "calls": sessions, **window.summary("step")}


def many_jobs(api: str, sessions: int, calls: int, per_process: list[int], timeout: float) -> list[ManyLoad | None]:
    """`calls` calls spread over the client processes (`per_process` each), `sessions` spread over the calls."""
    shares = iter(split_evenly(sessions, calls))
    return [ManyLoad(api, tuple(next(shares) for _ in range(n)), timeout) if n else None for n in per_process]


def measure_many(pool: WorkerPool, server: ServerProcess, api: str, sessions: int, calls: int,
                 options: Options) -> dict[str, object]:
    """`sessions` sessions over `calls` multiplexed calls: each message carries a step of each of its sessions."""
    jobs = many_jobs(api, sessions, calls, pool.spread(calls), call_timeout(options))
    window = measure_window(pool, server, jobs, options.warmup_seconds, options.duration_seconds)
    return {"api": api, "sessions": sessions, "calls": calls, **window.summary("step")}


def measure_service(pool: WorkerPool, server: ServerProcess, options: Options, label: str) -> list[dict[str, object]]:
    runs = []
    for api in options.apis:
        if api in MULTIPLEXED:
            for calls in options.many_calls:
                for sessions in (n for n in options.many_levels if n >= calls):  # every call has a session
                    say(f"  {label}: {api}, {sessions} sessions over {calls} call(s)")
                    runs.append(measure_many(pool, server, api, sessions, calls, options))
            continue
        if api in KSERVE:
            for sessions in options.kserve_levels:
                say(f"  {label}: {api}, {sessions} sequences")
                runs.append(measure_kserve(pool, server, api, sessions, options))
            continue
        if api == API_KSERVE_HTTP:
            for sessions in options.http_levels:
                say(f"  {label}: {api}, {sessions} sequences over HTTP")
                runs.append(measure_http(pool, server, sessions, options))
            continue
        for sessions in options.levels:
            say(f"  {label}: {api}, {sessions} sessions")
            runs.append(measure_steps(pool, server, api, sessions, options))
    return runs
