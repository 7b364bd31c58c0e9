"""The image's install, reproduced without Docker: the build stage's files, the wheel, a fresh venv with
the runtime dependencies only (as deploy/Dockerfile installs them), then `cellstream serve` from that
venv on the shipped model, answered SERVING by `cellstream health`, with no torch to be found."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dockerfile
import pytest
from manifests import DOCKERFILE, REPO

from bench.server import free_ports

pytestmark = pytest.mark.timeout(180)
# Installed only by the extras: none of them may reach the image.
EXTRAS_ONLY = ("torch", "onnx", "tqdm", "pytest", "hypothesis", "tritonclient", "grpc_tools", "matplotlib")


def run(*argv: str | Path, timeout: float = 120, **kwargs: object) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, f"{argv}:\n{result.stdout}\n{result.stderr}"
    return result


def build_context(destination: Path) -> None:
    """The files the build stage's COPY instructions take, laid out as under its WORKDIR."""
    destination.mkdir()
    for instruction in dockerfile.parse(DOCKERFILE)[0].all("COPY"):
        *sources, target = instruction.words()
        for source in sources:
            path = REPO / source
            where = destination / target if target != "./" else destination / path.name
            if path.is_dir():
                shutil.copytree(path, where, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(path, where)


def runtime_env(**extra: str) -> dict[str, str]:
    """The environment the image sets, without this test run's Python path or settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELLSTREAM_") and k != "PYTHONPATH"}
    return {**env, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1", **extra}


def wait_serving(health: list[str], env: dict[str, str], server: subprocess.Popen, log: Path) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert server.poll() is None, f"the server exited:\n{log.read_text()}"
        result = subprocess.run(health, capture_output=True, text=True, timeout=30, env=env)
        if result.returncode == 0:
            return result.stdout
        time.sleep(0.3)
    raise AssertionError(f"not SERVING after 60 s:\n{log.read_text()}")


def test_the_runtime_install_serves_the_shipped_model_without_torch(tmp_path):
    build_context(tmp_path / "src")
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
        "--wheel-dir", tmp_path / "wheels", tmp_path / "src")
    [wheel] = (tmp_path / "wheels").glob("cellstream-*.whl")
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    # As the Dockerfile's build stage: the wheel without extras, under the project's constraints.
    run(sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "-c", REPO / "constraints.txt", wheel,
        timeout=150)
    found = run(python, "-c", f"import importlib.util as u; print([m for m in {EXTRAS_ONLY!r} if u.find_spec(m)])",
                cwd=tmp_path, env=runtime_env())
    assert found.stdout.strip() == "[]"
    torch = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True, cwd=tmp_path,
                           env=runtime_env(), timeout=30)
    assert torch.returncode != 0 and "No module named 'torch'" in torch.stderr

    models = tmp_path / "models"  # COPY model/artifacts/*.onnx /opt/cellstream/models/
    models.mkdir()
    for model in (REPO / "model" / "artifacts").glob("*.onnx"):
        shutil.copy2(model, models)
    port, metrics_port, http_port = free_ports(3)
    env = runtime_env(CELLSTREAM_MODEL_DIR=str(models), CELLSTREAM_PORT=str(port))
    before = sorted(p for p in tmp_path.rglob("*") if venv in p.parents or models in p.parents)
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        server = subprocess.Popen([venv / "bin" / "cellstream", "serve", "--host", "127.0.0.1", "--metrics-host",
                                   "127.0.0.1", "--metrics-port", str(metrics_port), "--http-port", str(http_port),
                                   "--ort-intra-op-threads", "1"],
                                  cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        # No --target: the image's HEALTHCHECK finds the port through CELLSTREAM_PORT.
        answer = wait_serving([str(venv / "bin" / "cellstream"), "health"], env, server, log)
        assert f"127.0.0.1:{port}: SERVING" in answer
        served = run(venv / "bin" / "cellstream", "health", "--target", f"127.0.0.1:{port}",
                     "--service", "cellstream.v1.Inference", cwd=tmp_path, env=env)
        assert "SERVING" in served.stdout
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=10) as ready:
            assert ready.status == 200  # the HTTP face comes with the runtime install
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/page/page.js", timeout=10) as script:
            assert script.status == 200  # and so do the gate page's files (package data)
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0, log.read_text()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)
    assert "cellstream-chat" in log.read_text()
    after = sorted(p for p in tmp_path.rglob("*") if venv in p.parents or models in p.parents)
    assert after == before, "the server wrote into its install or model directory (the image's are read-only)"
