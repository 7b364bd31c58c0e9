"""The targets table: each target's measured value and the floor the empty gRPC server allows for it."""

from __future__ import annotations

import pytest

from cellstream.bench.targets import evaluate


def run(api: str, sessions: int, calls: int, steps_per_s: float, p50: float, p99: float, batch: float = 1.0,
        cpu: float = 50.0) -> dict:
    return {"api": api, "sessions": sessions, "calls": calls, "steps_per_s": steps_per_s, "p50_ms": p50,
            "p99_ms": p99, "server_cpu_us_per_step": cpu, "mean_batch": batch}


def floor(api: str, calls: int, rate: float, p50: float, p99: float, cpu: float = 100.0) -> dict:
    return {"api": api, "calls": calls, "messages_per_s": rate, "p50_ms": p50, "p99_ms": p99,
            "server_cpu_us_per_message": cpu}


PER_REQUEST_RUNS = [run("unary", 64, 64, 1800, 30, 60, batch=20), run("unary", 256, 256, 1500, 90, 200, batch=12),
                    run("kserve-unary", 64, 64, 1000, 60, 90, batch=30),
                    run("kserve-unary", 256, 256, 1700, 150, 300, batch=40),
                    run("kserve-stream", 256, 256, 5000, 50, 90, cpu=150.0)]


RESULTS = {
    "service": {
        "batching": {"runs": [run("stream", 1, 1, 1000, 0.7, 1.8), run("stream", 256, 256, 4000, 50, 80, cpu=120.0),
                              run("stream-many", 256, 1, 20000, 10, 20), *PER_REQUEST_RUNS]},
        "max_batch_size_1": {"runs": [run("stream", 256, 256, 2000, 100, 160)]},
    },
    "efficiency": [{"config": "batching", "api": "stream", "sessions": 256, "efficiency": 0.05}],
    "model": {"num_layers": 2, "hidden_size": 128},
    "memory": {"bytes_per_session": 3000},
    "startup": {"median_s": 0.7},
    "conversation": {"turns": 50, "stateful_ms": [2.0] * 50, "stateless_ms": [40.0] * 50},
    "floor": [floor("stream", 1, 3000, 0.3, 0.5), floor("stream", 256, 6000, 40, 55, cpu=100.0),
              floor("unary", 1, 1500, 0.5, 1), floor("unary", 64, 2000, 30, 40), floor("unary", 256, 2000, 120, 150),
              # The empty server driven by tritonclient, as the KServe rows are.
              floor("kserve-unary", 64, 1400, 40, 60), floor("kserve-unary", 256, 1800, 130, 170),
              floor("kserve-stream", 256, 5500, 45, 70, cpu=130.0)],
}


def test_each_target_gets_its_measured_value_and_floor():
    checks = {check.name: check for check in evaluate(RESULTS)}
    expected = {  # name: (measured, floor)
        "batching gain, 256 streams": (2.0, 3.0),  # 4000 / 2000; floor: 6000 msgs/s / 2000
        "efficiency, 256 streams": (0.05, 0.075),  # 0.05 x 6000 / 4000
        "single stream p50": (0.7, 0.3),
        "single stream p99": (1.8, 0.5),
        "256 streams p99": (80, 55),
        "stateless / stateful latency, turn 50": (20.0, 80.0),  # 40 / 2; floor: 40 / 0.5
        "idle session memory": (3000, None),
        "start-up to SERVING (median)": (0.7, None),
        "server CPU per step, 256 sessions on one StreamMany": (50.0, None),
        # Issue 15: measured against the empty server of the same transport and level (its floor is the ratio's).
        "unary Step, 64 sessions: mean batch": (20, None),
        "unary Step, 64 sessions: steps/s / floor unary calls/s": (0.9, None),  # 1800 / 2000
        "unary Step, 256 sessions: mean batch": (12, None),
        "unary Step, 256 sessions: steps/s / floor unary calls/s": (0.75, None),
        "KServe ModelInfer, 64 sessions: mean batch": (30, None),
        # Their floor: the same ratio for the empty server under tritonclient (1400 / 2000).
        "KServe ModelInfer, 64 sessions: steps/s / floor unary calls/s": (0.5, 0.7),
        "KServe ModelInfer, 256 sessions: mean batch": (40, None),
        "KServe ModelInfer, 256 sessions: steps/s / floor unary calls/s": (0.85, 0.9),
        "StreamSteps, 256 sessions: server us/step / floor us/msg": (1.2, None),  # 120 / 100
        "KServe ModelStreamInfer, 256 sessions: server us/step / floor us/msg": (1.5, 1.3),  # 130 / 100
    }
    assert set(checks) == set(expected)
    for name, (measured, bound) in expected.items():
        assert checks[name].measured == pytest.approx(measured), name
        assert checks[name].floor == (None if bound is None else pytest.approx(bound)), name
    assert [name for name, check in checks.items() if check.passed] == [
        "unary Step, 64 sessions: mean batch", "unary Step, 64 sessions: steps/s / floor unary calls/s",
        "KServe ModelInfer, 64 sessions: mean batch", "KServe ModelInfer, 256 sessions: mean batch",
        "KServe ModelInfer, 256 sessions: steps/s / floor unary calls/s",
        "StreamSteps, 256 sessions: server us/step / floor us/msg",
        "idle session memory", "start-up to SERVING (median)"]


def test_a_run_without_the_floor_figure_has_no_floors():
    checks = evaluate({key: value for key, value in RESULTS.items() if key != "floor"})
    assert all(check.floor is None for check in checks)
    # Issue 15's ratios are to the empty server itself: without it, they are not measured.
    assert {check.name for check in checks if check.measured is None} == {
        check.name for check in checks if "/ floor" in check.name}
    assert sum("/ floor" in check.name for check in checks) == 6
