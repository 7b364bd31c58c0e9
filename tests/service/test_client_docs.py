"""The client's examples in README.md and docs/CLIENT.md, run as they stand against a server on the shipped
model (only the target, 127.0.0.1:50051, is pointed at this test's server), printing what their comments say."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "model" / "artifacts"
pytestmark = pytest.mark.timeout(120)


def python_blocks(path: Path, after: str = "") -> list[str]:
    text = path.read_text()
    return re.findall(r"```python\n(.*?)```", text[text.index(after):], re.DOTALL)


@pytest.fixture
async def shipped(start):
    return await start(model_dir=ARTIFACTS, default_model="cellstream-chat")


async def run_block(code: str, port: int) -> str:
    assert "127.0.0.1:50051" in code
    code = code.replace("127.0.0.1:50051", f"127.0.0.1:{port}")
    done = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", code], cwd=REPO, capture_output=True,
                                   text=True, timeout=100)
    assert done.returncode == 0, done.stderr
    return done.stdout


async def test_the_readme_quick_start_runs_as_it_stands(shipped):
    [block] = [b for b in python_blocks(REPO / "README.md", "## Quick start") if "cellstream.Client(" in b][:1]
    assert await run_block(block, shipped.port) == "your name is alice.\n"


async def test_the_client_guide_examples_run_as_they_stand(shipped):
    sync, concurrent = python_blocks(REPO / "docs" / "CLIENT.md")[:2]
    printed = (await run_block(sync, shipped.port)).splitlines()
    assert printed == ["your name is alice.", "(260,)", "i", "(2, 128)", "96"]
    assert (await run_block(concurrent, shipped.port)).strip()  # 256 concurrent steps, then a streamed reply
