"""`make bench-client` runs end to end and prints its table (figures are the machine's, never asserted)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(180)
def test_the_client_benchmark_prints_every_run():
    done = subprocess.run([sys.executable, "-m", "cellstream.bench.client", "--seconds", "0.5", "--warmup", "0.2",
                           "--sessions", "16"], cwd=REPO, capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and not line.startswith("| run")]
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows] == [
        "client, 16 sessions (StreamMany by itself)", "client, 16 sessions, unary Step",
        "hand-written StreamMany loop, 16 sessions", "client, 1 session (StreamMany)", "client, 1 session, unary Step"]
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert all(re.fullmatch(r"[\d,.]+", cell) for cell in cells[1:]), row
        assert float(cells[1].replace(",", "")) > 0, row  # steps/s measured
    assert re.search(r"client / unary Step: [\d.]+x steps/s; hand-written loop / client: [\d.]+x", done.stdout)
