"""The benchmark harness runs end to end (`cellstream bench --quick`) and its results.json holds every figure.

Only the harness is checked: the figures depend on the machine and its load, and are never asserted.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FIGURES = ("floor", "limit", "service", "efficiency", "conversation", "generate", "memory", "startup")
RUN_KEYS = {"steps_per_s", "p50_ms", "p99_ms", "mean_batch", "server_cpu_us_per_step", "client_cpu_us_per_step",
            "calls"}
MULTIPLEXED = {"stream-many", "step-many"}
KSERVE = {"kserve-unary", "kserve-stream"}
NATIVE = {"stream", "unary", *MULTIPLEXED}
TRANSPORT = {"stream": "stream", "unary": "unary", "kserve-stream": "stream", "kserve-unary": "unary"}
FLOOR_KEYS = {"messages_per_s", "p50_ms", "p99_ms", "server_cpu_us_per_message", "client_cpu_us_per_message",
              "calls"}


def expected_runs(options: dict, config: str = "batching") -> set[tuple[str, int, int]]:
    """(api, sessions, calls) of every service run: a call per session, or multiplexed over a few calls. The
    unbatched server (the batching gain's baseline) runs the native APIs only."""
    runs = set()
    for api in options["apis"]:
        if config != "batching" and api not in NATIVE:
            continue
        if api in MULTIPLEXED:
            runs |= {(api, n, c) for c in options["many_calls"] for n in options["many_levels"] if n >= c}
        elif api == "kserve-http":
            runs |= {(api, n, n) for n in options["http_levels"]}
        elif api in KSERVE:
            runs |= {(api, n, n) for n in options["kserve_levels"]}
        else:
            runs |= {(api, n, n) for n in options["levels"]}
    return runs


def numbers(value: object) -> Iterator[float]:
    """Every number in a JSON value, however deeply nested."""
    if isinstance(value, dict):
        for item in value.values():
            yield from numbers(item)
    elif isinstance(value, list):
        for item in value:
            yield from numbers(item)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield value


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, str]:
    out = tmp_path_factory.mktemp("bench")
    result = subprocess.run(
        [sys.executable, "-m", "cellstream.service.cli", "bench", "--quick", "--out-dir", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=280,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return json.loads((out / "results.json").read_text()), out, result.stdout


@pytest.mark.timeout(300)
def test_every_figure_is_present_finite_and_positive(quick_run):
    results, _, _ = quick_run
    for figure in FIGURES:
        values = list(numbers(results[figure]))
        assert values, f"{figure} holds no numbers"
        bad = [v for v in values if not (math.isfinite(v) and v > 0)]
        assert not bad, f"{figure} has non-finite or non-positive numbers: {bad}"


@pytest.mark.timeout(300)
def test_each_figure_has_its_rows(quick_run):
    results, _, _ = quick_run
    options = results["options"]
    assert [p["batch"] for p in results["limit"]["steps"]] == options["limit_batches"]
    assert results["limit"]["prefill"]["tokens_per_s"] > 0
    assert set(options["apis"]) >= MULTIPLEXED, "the default run measures the multiplexed APIs"
    assert set(options["apis"]) >= KSERVE, "the default run measures the KServe faces (tritonclient)"
    for config in ("batching", "max_batch_size_1"):
        runs = results["service"][config]["runs"]
        assert len(runs) == len(expected_runs(options, config))
        assert {(r["api"], r["sessions"], r["calls"]) for r in runs} == expected_runs(options, config)
        assert all(set(r) >= RUN_KEYS for r in runs)
    # The empty server's streams and unary calls at every level a per-session api of either face ran at, and
    # driven by tritonclient at every KServe level.
    floor_levels = {*options["levels"], *options["kserve_levels"]}
    assert {(r["api"], r["calls"]) for r in results["floor"]} == {
        (TRANSPORT[api], n) for api in options["apis"] if api in TRANSPORT for n in floor_levels} | {
        (api, n) for api in KSERVE for n in options["kserve_levels"]}
    assert all(set(r) >= FLOOR_KEYS for r in results["floor"])
    assert len(results["efficiency"]) == len(expected_runs(options)) + len(expected_runs(options, "unbatched"))
    assert all("efficiency" in row for row in results["efficiency"])
    conversation = results["conversation"]
    assert len(conversation["stateful_ms"]) == len(conversation["stateless_ms"]) == options["turns"]
    assert "ratio_at_final_turn" in conversation
    assert [r["replies"] for r in results["generate"]] == options["generate_levels"]
    assert all("tokens_per_s" in r for r in results["generate"])
    assert {"bytes_per_session", "rss_before_bytes", "rss_after_bytes"} <= set(results["memory"])
    assert len(results["startup"]["samples_s"]) == 3


@pytest.mark.timeout(300)
def test_machine_model_targets_and_plots_are_reported(quick_run):
    results, out, stdout = quick_run
    machine = results["machine"]
    assert machine["cpu_model"] and machine["cores"] >= 1 and machine["python"]
    assert {"onnxruntime", "grpcio", "protobuf"} <= set(machine["versions"])
    assert {"name", "num_layers", "hidden_size", "vocab_size"} <= set(results["model"])
    assert len(results["targets"]) == 19  # issue 15's ten per-request checks, issues 4 and 8's nine
    [cpu] = [t for t in results["targets"] if "StreamMany" in t["name"]]
    assert cpu["requirement"] == "<= 25" and cpu["measured"] > 0
    assert all({"name", "requirement", "measured", "passed"} <= set(t) for t in results["targets"])
    assert results["plots"]
    assert all((out / name).stat().st_size > 0 for name in results["plots"])
    assert "Targets" in stdout
