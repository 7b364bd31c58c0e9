"""`make bench-instructions` runs end to end under valgrind and its counts are in the order the work is."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(400)
def test_the_instruction_counts_rank_the_paths_by_their_work():
    done = subprocess.run([sys.executable, "-m", "cellstream.bench.instructions", "--calls", "20", "--steps", "200",
                           "--sessions", "8"], cwd=REPO, capture_output=True, text=True, timeout=390)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    counts = {}
    for line in done.stdout.splitlines()[1:]:
        name, _, count = line.rpartition("  ")
        counts[name.strip()] = int(count.replace(",", ""))
    assert list(counts) == ["echo unary call", "unary Step", "KServe ModelInfer",
                            "in-process step (native_codec.step), 8 sessions",
                            "in-process step (KServeServicer.infer), 8 sessions"]
    # An empty call does less than a step (which runs onnxruntime), a KServe step more than a native one
    # (its larger messages and codec), and a step without gRPC less than the same step through it.
    assert 0 < counts["echo unary call"] < counts["unary Step"] < counts["KServe ModelInfer"]
    native, kserve = list(counts.values())[3:]
    assert 0 < native < kserve
    assert native < counts["unary Step"] and kserve < counts["KServe ModelInfer"]
