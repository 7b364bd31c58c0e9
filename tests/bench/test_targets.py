"""The targets table: each target's measured value and the floor the empty gRPC server allows for it."""

from __future__ import annotations

import pytest

from bench.targets import evaluate


def run(api: str, sessions: int, calls: int, steps_per_s: float, p50: float, p99: float) -> dict:
    return {"api": api, "sessions": sessions, "calls": calls, "steps_per_s": steps_per_s, "p50_ms": p50,
            "p99_ms": p99, "server_cpu_us_per_step": 50.0}


def floor(api: str, calls: int, rate: float, p50: float, p99: float) -> dict:
    return {"api": api, "calls": calls, "messages_per_s": rate, "p50_ms": p50, "p99_ms": p99}


RESULTS = {
    "service": {
        "batching": {"runs": [run("stream", 1, 1, 1000, 0.7, 1.8), run("stream", 256, 256, 4000, 50, 80),
                              run("stream-many", 256, 1, 20000, 10, 20)]},
        "max_batch_size_1": {"runs": [run("stream", 256, 256, 2000, 100, 160)]},
    },
    "efficiency": [{"config": "batching", "api": "stream", "sessions": 256, "efficiency": 0.05}],
    "model": {"num_layers": 2, "hidden_size": 128},
    "memory": {"bytes_per_session": 3000},
    "startup": {"median_s": 0.7},
    "conversation": {"turns": 50, "stateful_ms": [2.0] * 50, "stateless_ms": [40.0] * 50},
    "floor": [floor("stream", 1, 3000, 0.3, 0.5), floor("stream", 256, 6000, 40, 55), floor("unary", 1, 1500, 0.5, 1)],
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
    }
    assert set(checks) == set(expected)
    for name, (measured, bound) in expected.items():
        assert checks[name].measured == pytest.approx(measured), name
        assert checks[name].floor == (None if bound is None else pytest.approx(bound)), name
    assert [name for name, check in checks.items() if check.passed] == ["idle session memory",
                                                                        "start-up to SERVING (median)"]


def test_a_run_without_the_floor_figure_has_no_floors():
    checks = evaluate({key: value for key, value in RESULTS.items() if key != "floor"})
    assert all(check.floor is None for check in checks)
    assert all(check.measured is not None for check in checks)
