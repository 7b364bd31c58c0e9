"""`make bench-gates` runs end to end and prints its table (figures are the machine's, never asserted)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(180)
def test_the_gates_benchmark_prints_every_case():
    done = subprocess.run([sys.executable, "-m", "cellstream.bench.gates", "--seconds", "0.5"], cwd=REPO,
                          capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and not line.startswith("| large")]
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows] == [
        "none", "plain, 256 bytes", "gated, 256 bytes", "plain, 4096 bytes (max_tokens_per_request)",
        "plain, 4029 bytes, every step's logits"]
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert all(re.fullmatch(r"[\d,.]+", cell) for cell in cells[2:]), row  # steps/s and latencies measured
        assert float(cells[2].replace(",", "")) > 0, row
    assert all(re.fullmatch(r"[\d.]+", row.strip("|").split("|")[1].strip()) for row in rows[1:])
