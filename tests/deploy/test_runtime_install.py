"""The plain install, without a container: the build stage's files, the wheel, a fresh venv with the runtime
dependencies only (deploy/Dockerfile adds the tracing extra; tests/deploy/test_image.py runs the image itself),
then `cellstream serve` from that venv on the shipped model, answered SERVING by `cellstream health`, with no
torch and no OpenTelemetry to be found; and what the wheel installs: the one package `cellstream`, importable
without torch."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import dockerfile
import pytest
from manifests import DOCKERFILE, REPO

from cellstream.bench.server import free_ports

pytestmark = pytest.mark.timeout(180)
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PROJECT["project"]["version"]
# Installed only by the extras: none of them may reach the image.
EXTRAS_ONLY = ("torch", "onnx", "tqdm", "faker", "pytest", "hypothesis", "tritonclient", "grpc_tools",
               "matplotlib", "opentelemetry")


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


@dataclass(frozen=True)
class Install:
    wheel: Path
    venv: Path
    python: Path


@pytest.fixture(scope="module")
def runtime_install(tmp_path_factory: pytest.TempPathFactory) -> Install:
    """The wheel built from the build stage's files, installed without extras into a venv of its own."""
    where = tmp_path_factory.mktemp("install")
    build_context(where / "src")
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
        "--wheel-dir", where / "wheels", where / "src")
    [wheel] = (where / "wheels").glob("cellstream-*.whl")
    venv = where / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    # As the Dockerfile's build stage, but without extras: the server as it runs without the tracing extra.
    run(sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "-c", REPO / "constraints.txt", wheel,
        timeout=150)
    return Install(wheel, venv, python)


def test_the_wheel_installs_one_package_cellstream(runtime_install, tmp_path):
    """service/, model/ and bench/ are folders of the repository; installed, they are cellstream.service,
    cellstream.model and cellstream.bench, and no top-level `service`, `model` or `bench` exists."""
    names = zipfile.ZipFile(runtime_install.wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"cellstream", f"cellstream-{VERSION}.dist-info"}
    packages = {name.rpartition("/")[0].replace("/", ".") for name in names if name.endswith("/__init__.py")}
    assert packages == set(PROJECT["tool"]["setuptools"]["packages"])
    assert "cellstream/py.typed" in names
    assert {"cellstream/service/api/http/page/page.js", "cellstream/model/artifacts/cellstream-chat.onnx"} <= set(names)

    site = Path(run(runtime_install.python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                    cwd=tmp_path, env=runtime_env()).stdout.strip())
    assert site.is_relative_to(runtime_install.venv) and (site / "cellstream" / "service").is_dir()
    for retired in ("service", "model", "bench"):
        assert not (site / retired).exists(), f"a top-level {retired!r} in site-packages"
    record = next(site.glob("cellstream-*.dist-info")) / "RECORD"
    installed = {line.split(",")[0].split("/")[0] for line in record.read_text().splitlines()}
    assert {name for name in installed if not name.startswith("..")} == {"cellstream", record.parent.name}

    # Imported from elsewhere (not the repository), with torch absent: the package, its version, the client, the
    # tokenizer.
    code = ("import sys, cellstream, cellstream.model.tokenizer as t; cellstream.Client, cellstream.AsyncClient; "
            "print(cellstream.__version__, t.VOCAB_SIZE, cellstream.__file__, 'torch' in sys.modules)")
    version, vocab, where, torch_loaded = run(runtime_install.python, "-c", code, cwd=tmp_path,
                                              env=runtime_env()).stdout.split()
    assert (version, vocab, torch_loaded) == (VERSION, "260", "False")
    assert Path(where).is_relative_to(site)


def test_the_runtime_install_serves_the_shipped_model_without_torch(runtime_install, tmp_path):
    venv, python = runtime_install.venv, runtime_install.python
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
    before = sorted(p for directory in (venv, models) for p in directory.rglob("*"))
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
    after = sorted(p for directory in (venv, models) for p in directory.rglob("*"))
    assert after == before, "the server wrote into its install or model directory (the image's are read-only)"


def test_without_the_tracing_extra_a_server_asked_to_trace_refuses_to_start(runtime_install, tmp_path):
    """Tracing asked for (an OTLP endpoint) where OpenTelemetry is not installed: exit 2, naming the extra."""
    port, metrics_port = free_ports(2)
    env = runtime_env(OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:4318", CELLSTREAM_PORT=str(port),
                      CELLSTREAM_METRICS_PORT=str(metrics_port), CELLSTREAM_HTTP_PORT="0",
                      CELLSTREAM_MODEL_DIR=str(REPO / "model" / "artifacts"))
    refused = subprocess.run([runtime_install.venv / "bin" / "cellstream", "serve", "--host", "127.0.0.1"],
                             capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert refused.stderr.strip() == (
        "cellstream serve: tracing is configured (OTEL_EXPORTER_OTLP_ENDPOINT), but OpenTelemetry is not "
        "installed: install the tracing extra (pip install 'cellstream[tracing]'), or unset the OTEL_* variables")
