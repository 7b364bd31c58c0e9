"""The issue's targets, checked against a run's results (shown next to the figures, never asserted)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

from bench.memory import session_bound_bytes
from bench.options import API_STREAM, API_STREAM_MANY

BATCHING, UNBATCHED = "batching", "max_batch_size_1"
SINGLE, BUSY = 1, 256
TURN = 50


@dataclass(frozen=True)
class Check:
    name: str
    requirement: str  # e.g. ">= 4"
    unit: str
    measured: float | None  # None: this run did not measure it (e.g. a level left out)
    passed: bool | None

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def _check(name: str, op: str, bound: float, unit: str, measured: float | None) -> Check:
    compare: Callable[[float, float], bool] = (lambda a, b: a >= b) if op == ">=" else (lambda a, b: a <= b)
    passed = None if measured is None else compare(measured, bound)
    return Check(name, f"{op} {bound:g}", unit, measured, passed)


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


def evaluate(results: dict) -> list[Check]:
    single = _run(results, BATCHING, SINGLE)
    busy = _run(results, BATCHING, BUSY)
    unbatched = _run(results, UNBATCHED, BUSY)
    gain = busy["steps_per_s"] / unbatched["steps_per_s"] if busy and unbatched else None
    model = results["model"]
    bound = session_bound_bytes(model["num_layers"], model["hidden_size"])
    conversation = results["conversation"]
    ratio = None
    if conversation["turns"] >= TURN:
        ratio = conversation["stateless_ms"][TURN - 1] / conversation["stateful_ms"][TURN - 1]
    multiplexed = _run(results, BATCHING, BUSY, API_STREAM_MANY, 1)
    return [
        _check(f"batching gain, {BUSY} streams", ">=", 4, "x", gain),
        _check(f"efficiency, {BUSY} streams", ">=", 0.3, "", _efficiency(results, BUSY)),
        _check("single stream p50", "<=", 0.3, "ms", single and single["p50_ms"]),
        _check("single stream p99", "<=", 1, "ms", single and single["p99_ms"]),
        _check(f"{BUSY} streams p99", "<=", 25, "ms", busy and busy["p99_ms"]),
        _check(f"stateless / stateful latency, turn {TURN}", ">=", 30, "x", ratio),
        _check("idle session memory", "<=", bound, "B", results["memory"]["bytes_per_session"]),
        _check("start-up to SERVING (median)", "<=", 2, "s", results["startup"]["median_s"]),
        _check(f"server CPU per step, {BUSY} sessions on one StreamMany", "<=", 25, "us",
               multiplexed and multiplexed["server_cpu_us_per_step"]),
    ]
