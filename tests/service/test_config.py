"""J. Settings validation, env variables, the `serve` CLI, and the engine's refusal of bad graphs."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from cellstream.bench.server import free_ports
from cellstream.service.config import Settings, SettingsError, load_settings
from cellstream.service.engine import Engine
from cellstream.service.errors import ModelLoadError
from cellstream.service.model_control import read_versions
from cellstream.service.server import start_server

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELLSTREAM_")}
    return subprocess.run(
        [sys.executable, "-m", "cellstream.service.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"port": -1}, "port"),
        ({"port": 70000}, "port"),
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_queue_size": 0}, "max_queue_size"),
        ({"when_full": "drop"}, "when_full"),
        ({"session_ttl_seconds": 0}, "session_ttl_seconds"),
        ({"log_level": "LOUD"}, "log_level"),
        ({"no_such_setting": 1}, "no_such_setting"),
    ],
)
def test_bad_settings_name_the_field(overrides, field):
    with pytest.raises(SettingsError) as info:
        load_settings(**overrides)
    message = str(info.value)
    assert message.startswith(f"{field}:"), message
    assert repr(next(iter(overrides.values()))) in message


def test_ttl_bound_is_checked():
    with pytest.raises(SettingsError, match=r"session_ttl_seconds .* exceeds max_session_ttl_seconds"):
        load_settings(session_ttl_seconds=100, max_session_ttl_seconds=10)


def test_environment_is_honoured_and_overrides_win(monkeypatch):
    monkeypatch.setenv("CELLSTREAM_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("CELLSTREAM_WHEN_FULL", "reject")
    settings = load_settings()
    assert settings.max_batch_size == 7 and settings.when_full == "reject"
    assert load_settings(max_batch_size=9).max_batch_size == 9
    assert load_settings(max_batch_size=None).max_batch_size == 7, "None means: not given"
    monkeypatch.setenv("CELLSTREAM_MAX_BATCH_SIZE", "0")
    with pytest.raises(SettingsError, match="max_batch_size"):
        load_settings()


def test_serve_help_lists_every_setting():
    result = run_cli("serve", "--help")
    assert result.returncode == 0, result.stderr
    help_text = " ".join(result.stdout.split())
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in help_text, name
        assert f"CELLSTREAM_{name.upper()}" in help_text, name


@contextlib.contextmanager
def ports_taken(count: int) -> Iterator[list[int]]:
    """`count` free loopback ports, held (listening) by this test: a server that binds one fails."""
    sockets = [socket.create_server(("127.0.0.1", 0)) for _ in range(count)]
    try:
        yield [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def serve_on_taken_ports(model_dir: Path, *flags: str) -> subprocess.CompletedProcess:
    """`cellstream serve` on ports this test holds: an error about anything but the ports was found before
    binding (no port is a default one either: the machine's 8080, 50051, 8000 may be anyone's)."""
    with ports_taken(3) as (port, metrics_port, http_port):
        return run_cli("serve", "--host", "127.0.0.1", "--port", str(port), "--metrics-host", "127.0.0.1",
                       "--metrics-port", str(metrics_port), "--http-port", str(http_port), "--model-dir",
                       str(model_dir), *flags)


def test_serve_with_missing_model_dir_fails_cleanly_before_binding(tmp_path):
    missing = tmp_path / "nowhere"
    result = serve_on_taken_ports(missing)
    assert result.returncode == 2
    assert "model directory not found" in result.stderr and str(missing) in result.stderr, result.stderr
    assert "bind" not in result.stderr, "a port was bound before the model directory was checked"
    assert "Traceback" not in result.stderr + result.stdout


@pytest.fixture
def own_models(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """A directory of a user's own models (none named cellstream-chat): demand and spotter."""
    directory = tmp_path / "own"
    directory.mkdir()
    for name, source in (("demand", "tiny-features"), ("spotter", "tiny-chat")):
        (directory / f"{name}.onnx").symlink_to(tiny_model_dir / f"{source}.onnx")
    return directory


def test_serve_on_own_models_without_a_default_names_the_flag_before_binding(own_models):
    result = serve_on_taken_ports(own_models)
    assert result.returncode == 2
    assert (f"2 models in {own_models} (demand, spotter) and no default model: choose the one used by requests "
            "that name none with --default-model NAME (or CELLSTREAM_DEFAULT_MODEL)") in result.stderr, result.stderr
    assert "bind" not in result.stderr and "Traceback" not in result.stderr
    wrong = serve_on_taken_ports(own_models, "--default-model", "forecast")
    assert wrong.returncode == 2
    assert (f"default model 'forecast' (--default-model, CELLSTREAM_DEFAULT_MODEL) is not among the models in "
            f"{own_models}: demand, spotter") in wrong.stderr, wrong.stderr


async def test_the_only_model_of_a_directory_is_the_default(own_models, caplog):
    (own_models / "spotter.onnx").unlink()
    settings = load_settings(model_dir=own_models, host="127.0.0.1", port=0, metrics_host="127.0.0.1", metrics_port=0)
    with caplog.at_level(logging.INFO, logger="cellstream.service.model_control"):
        running = await start_server(settings)
    try:
        registry = running.dataplane.registry
        assert registry.default == "demand" and registry.resolve("").name == "demand"
    finally:
        await running.stop(0)
    assert "default model: demand (no default_model set: the only model, or cellstream-chat)" in caplog.text


def test_models_named_by_load_model_are_checked_before_binding(own_models, tmp_path):
    """Explicit model control: the models start-up loads are those load_model names, each of them there; a
    repository of versions (NAME/VERSION/model.onnx) counts its models by name."""
    absent = serve_on_taken_ports(own_models, "--model-control", "explicit", "--load-model", "forecast")
    assert absent.returncode == 2
    assert f"load_model names ['forecast'], which {own_models} does not hold" in absent.stderr, absent.stderr
    assert "bind" not in absent.stderr and "Traceback" not in absent.stderr
    several = serve_on_taken_ports(own_models, "--model-control", "explicit", "--load-model", "demand,spotter")
    assert several.returncode == 2
    assert ("2 models named by load_model (demand, spotter) and no default model: choose the one used by requests "
            "that name none with --default-model NAME") in several.stderr, several.stderr
    versioned = tmp_path / "versioned"
    for name, version in (("demand", 1), ("demand", 2), ("spotter", 1)):
        (versioned / name / str(version)).mkdir(parents=True)
        (versioned / name / str(version) / "model.onnx").symlink_to(own_models / f"{name}.onnx")
    unnamed = serve_on_taken_ports(versioned)
    assert unnamed.returncode == 2
    assert f"2 models in {versioned} (demand, spotter) and no default model" in unnamed.stderr, unnamed.stderr
    assert "bind" not in unnamed.stderr


def test_serve_with_invalid_flag_value_fails_cleanly():
    result = run_cli("serve", "--port", "-1", "--max-batch-size", "0")
    assert result.returncode == 2
    assert "invalid settings" in result.stderr
    assert "port" in result.stderr and "max_batch_size" in result.stderr
    assert "Traceback" not in result.stderr


def _graph(path: Path, inputs: list, outputs: list[str], feed: str) -> Path:
    """A small graph whose outputs are copies of the input `feed`, with the given inputs."""
    nodes = [helper.make_node("Identity", [feed], [name]) for name in outputs]
    out_infos = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs]
    graph = helper.make_graph(nodes, "bad", inputs, out_infos)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_engine_refuses_graph_without_h0(tmp_path):
    tokens = helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", "time"])
    c0 = helper.make_tensor_value_info("c0", TensorProto.FLOAT, [2, "batch", 4])
    path = _graph(tmp_path / "no-h0.onnx", [tokens, c0], ["logits", "hn", "cn"], "c0")
    with pytest.raises(ModelLoadError) as info:
        Engine(path)
    message = str(info.value)
    assert message.startswith("no-h0.onnx:")
    assert "missing input 'h0': a stateful LSTM takes h and C as h0 and c0" in message


def test_engine_refuses_graph_without_cn(tmp_path):
    tokens = helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", "time"])
    h0 = helper.make_tensor_value_info("h0", TensorProto.FLOAT, [2, "batch", 4])
    c0 = helper.make_tensor_value_info("c0", TensorProto.FLOAT, [2, "batch", 4])
    path = _graph(tmp_path / "no-cn.onnx", [tokens, h0, c0], ["logits", "hn"], "h0")
    with pytest.raises(ModelLoadError, match=r"no-cn\.onnx: .*missing output 'cn'"):
        Engine(path)


def test_engine_refuses_dynamic_state_size(tmp_path):
    tokens = helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", "time"])
    h0 = helper.make_tensor_value_info("h0", TensorProto.FLOAT, [2, "batch", "hidden"])
    c0 = helper.make_tensor_value_info("c0", TensorProto.FLOAT, [2, "batch", "hidden"])
    path = _graph(tmp_path / "dynamic.onnx", [tokens, h0, c0], ["logits", "hn", "cn"], "h0")
    with pytest.raises(ModelLoadError, match="h0's hidden size \\(axis 2\\) is 'hidden'; it must be a fixed number"):
        Engine(path)


def test_engine_refuses_missing_and_unreadable_files(tmp_path):
    with pytest.raises(ModelLoadError, match="model file not found"):
        Engine(tmp_path / "absent.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not an onnx graph")
    with pytest.raises(ModelLoadError, match=r"garbage\.onnx: onnxruntime cannot load it"):
        Engine(garbage)


async def test_start_up_checks_the_model_directory(tmp_path, tiny_model_dir):
    common = dict(host="127.0.0.1", port=0, metrics_host="127.0.0.1", metrics_port=0)
    with pytest.raises(ModelLoadError, match="model directory not found"):
        await start_server(load_settings(model_dir=tmp_path / "absent", **common))
    with pytest.raises(ModelLoadError, match=r"no \.onnx models"):
        await start_server(load_settings(model_dir=tmp_path, **common))
    with pytest.raises(ModelLoadError, match=r"default model 'nope' .* is not among the models"):
        await start_server(load_settings(model_dir=tiny_model_dir, default_model="nope", **common))
    loaded = read_versions(tiny_model_dir, None, "all", 1)
    assert sorted(engine.spec.key for engine, _ in loaded) == ["tiny-chat", "tiny-features"]
    engine = next(engine for engine, _ in loaded if engine.spec.name == "tiny-chat")
    logits, hn, cn = engine.run(
        np.zeros((3, 4), np.int64), np.zeros((2, 3, 16), np.float32), np.zeros((2, 3, 16), np.float32)
    )
    assert logits.shape == (3, 4, 260) and hn.shape == cn.shape == (2, 3, 16)


async def test_start_server_with_bad_default_fails_and_frees_ports(tiny_model_dir):
    port, metrics_port = free_ports(2)
    ports = {"port": port, "metrics_port": metrics_port}
    common = dict(host="127.0.0.1", metrics_host="127.0.0.1", model_dir=tiny_model_dir, **ports)
    with pytest.raises(ModelLoadError, match="default model 'nope'"):
        await start_server(load_settings(default_model="nope", **common))
    # Both ports were released: a correct server binds them again.
    running = await start_server(load_settings(default_model="tiny-chat", **common))
    try:
        assert (running.port, running.metrics_port) == (ports["port"], ports["metrics_port"])
    finally:
        await running.stop(0)
