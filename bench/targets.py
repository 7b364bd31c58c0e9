"""The issue's targets, checked against a run's results (shown next to the figures, never asserted)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

from cellstream.bench.memory import session_bound_bytes
from cellstream.bench.options import (
    API_KSERVE_STREAM,
    API_KSERVE_UNARY,
    API_STREAM,
    API_STREAM_MANY,
    API_UNARY,
    TRANSPORT,
)

BATCHING, UNBATCHED = "batching", "max_batch_size_1"
SINGLE, BUSY = 1, 256
PER_REQUEST_LEVELS = (64, 256)  # issue 15: unary calls at these levels must batch
TURN = 50


@dataclass(frozen=True)
class Check:
    name: str
    requirement: str  # e.g. ">= 4"
    unit: str
    measured: float | None  # None: this run did not measure it (e.g. a level left out)
    passed: bool | None
    floor: float | None = None
    """The best value the empty gRPC server of the floor figure allows for this measure (None: it bounds
    nothing here, or the run did not measure it): a target beyond it is out of reach of any service on
    gRPC in Python on this machine."""

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def _check(name: str, op: str, bound: float, unit: str, measured: float | None, floor: float | None = None) -> Check:
    compare: Callable[[float, float], bool] = (lambda a, b: a >= b) if op == ">=" else (lambda a, b: a <= b)
    passed = None if measured is None else compare(measured, bound)
    return Check(name, f"{op} {bound:g}", unit, measured, passed, floor)


def _floor(results: dict, api: str, calls: int) -> dict | None:
    """The floor figure's run of `api` at `calls` calls."""
    return next((run for run in results.get("floor", ()) if (run["api"], run["calls"]) == (api, calls)), None)


def floor_run(results: dict, api: str, calls: int) -> dict | None:
    """The empty server's run that bounds a per-session `api` at `calls` calls (None for multiplexed apis)."""
    return _floor(results, TRANSPORT[api], calls) if api in TRANSPORT else None


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if numerator is None or not denominator else numerator / denominator


def _run(results: dict, config: str, sessions: int, api: str = API_STREAM, calls: int | None = None) -> dict | None:
    """The run of `api` at `sessions` sessions (over `calls` calls; default: one per session)."""
    calls = sessions if calls is None else calls
    for run in results["service"][config]["runs"]:
        if (run["api"], run["sessions"], run["calls"]) == (api, sessions, calls):
            return run
    return None


def _efficiency(results: dict, sessions: int) -> float | None:
    for row in results["efficiency"]:
        if row["config"] == BATCHING and row["api"] == API_STREAM and row["sessions"] == sessions:
            return row["efficiency"]
    return None


def _get(run: dict | None, key: str) -> float | None:
    return None if run is None else run[key]


def evaluate(results: dict) -> list[Check]:
    return [*_per_request_checks(results), *_stream_checks(results)]


def _per_request_checks(results: dict) -> list[Check]:
    """Issue 15: per-request paths batch (mean batch >= 16), unary steps/s >= 0.8x the empty server's unary
    calls/s, streamed server CPU per step <= 1.3x the empty server's per message, at as many calls. The KServe
    checks' floor is the same ratio for the empty server driven by tritonclient: what that client leaves
    reachable on these cores (the native checks' floor is 1 by definition)."""
    checks = []
    for api, name in ((API_UNARY, "unary Step"), (API_KSERVE_UNARY, "KServe ModelInfer")):
        for sessions in PER_REQUEST_LEVELS:
            run = _run(results, BATCHING, sessions, api)
            floor = floor_run(results, api, sessions)
            reachable = _ratio(_get(_floor(results, api, sessions), "messages_per_s"), _get(floor, "messages_per_s"))
            checks.append(_check(f"{name}, {sessions} sessions: mean batch", ">=", 16, "", _get(run, "mean_batch")))
            checks.append(_check(f"{name}, {sessions} sessions: steps/s / floor unary calls/s", ">=", 0.8, "x",
                                 _ratio(_get(run, "steps_per_s"), _get(floor, "messages_per_s")),
                                 reachable if api == API_KSERVE_UNARY else None))
    for api, name in ((API_STREAM, "StreamSteps"), (API_KSERVE_STREAM, "KServe ModelStreamInfer")):
        run = _run(results, BATCHING, BUSY, api)
        floor = floor_run(results, api, BUSY)
        reachable = _ratio(_get(_floor(results, api, BUSY), "server_cpu_us_per_message"),
                           _get(floor, "server_cpu_us_per_message"))
        checks.append(_check(f"{name}, {BUSY} sessions: server us/step / floor us/msg", "<=", 1.3, "x",
                             _ratio(_get(run, "server_cpu_us_per_step"), _get(floor, "server_cpu_us_per_message")),
                             reachable if api == API_KSERVE_STREAM else None))
    return checks


def _stream_checks(results: dict) -> list[Check]:
    """Issues 4 and 8: batching gain, efficiency and latency of streams, the conversation, memory, start-up,
    and the multiplexed path's CPU."""
    single = _run(results, BATCHING, SINGLE)
    busy = _run(results, BATCHING, BUSY)
    unbatched = _run(results, UNBATCHED, BUSY)
    gain = _ratio(_get(busy, "steps_per_s"), _get(unbatched, "steps_per_s"))
    model = results["model"]
    bound = session_bound_bytes(model["num_layers"], model["hidden_size"])
    conversation = results["conversation"]
    stateless = conversation["stateless_ms"][TURN - 1] if conversation["turns"] >= TURN else None
    ratio = _ratio(stateless, conversation["stateful_ms"][TURN - 1] if stateless else None)
    multiplexed = _run(results, BATCHING, BUSY, API_STREAM_MANY, 1)
    efficiency = _efficiency(results, BUSY)
    # What an empty server allows: as many steps/s as it answers messages, its latencies, and (for the
    # conversation) a stateful turn no faster than one of its unary round trips.
    floor_single, floor_busy = _floor(results, API_STREAM, SINGLE), _floor(results, API_STREAM, BUSY)
    floor_rate = _get(floor_busy, "messages_per_s")
    floor_efficiency = _ratio(efficiency * floor_rate if efficiency and floor_rate else None,
                              _get(busy, "steps_per_s"))
    return [
        _check(f"batching gain, {BUSY} streams", ">=", 4, "x", gain,
               _ratio(floor_rate, _get(unbatched, "steps_per_s"))),
        _check(f"efficiency, {BUSY} streams", ">=", 0.3, "", efficiency, floor_efficiency),
        _check("single stream p50", "<=", 0.3, "ms", _get(single, "p50_ms"), _get(floor_single, "p50_ms")),
        _check("single stream p99", "<=", 1, "ms", _get(single, "p99_ms"), _get(floor_single, "p99_ms")),
        _check(f"{BUSY} streams p99", "<=", 25, "ms", _get(busy, "p99_ms"), _get(floor_busy, "p99_ms")),
        _check(f"stateless / stateful latency, turn {TURN}", ">=", 30, "x", ratio,
               _ratio(stateless, _get(_floor(results, API_UNARY, SINGLE), "p50_ms"))),
        _check("idle session memory", "<=", bound, "B", results["memory"]["bytes_per_session"]),
        _check("start-up to SERVING (median)", "<=", 2, "s", results["startup"]["median_s"]),
        _check(f"server CPU per step, {BUSY} sessions on one StreamMany", "<=", 25, "us",
               _get(multiplexed, "server_cpu_us_per_step")),
    ]
