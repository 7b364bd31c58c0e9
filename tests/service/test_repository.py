"""The model repository on disk (both layouts, what is not a model, what is wrong), version keys, and the
settings of model control."""

from __future__ import annotations

from pathlib import Path

import pytest

from cellstream.service.cli import build_parser
from cellstream.service.config import SettingsError, load_settings
from cellstream.service.repository import scan
from cellstream.service.versions import describe, key_parts, version_key


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_both_layouts_side_by_side_and_what_is_no_model(tmp_path):
    flat = touch(tmp_path / "chat.onnx")
    touch(tmp_path / "chat.gates.onnx")  # its glass box, not a model
    versioned = {v: touch(tmp_path / "sensor" / str(v) / "model.onnx") for v in (1, 2, 10)}
    touch(tmp_path / "sensor" / "2" / "model.gates.onnx")
    touch(tmp_path / "sensor" / "config.pbtxt")  # Triton's configuration: not read
    for ignored in ("01", "0", "v3", "-1"):  # not version directories
        touch(tmp_path / "sensor" / ignored / "model.onnx")
    (tmp_path / "lost+found").mkdir()  # a volume's: no numbered directory, no model
    touch(tmp_path / "notes" / "readme.txt")
    touch(tmp_path / ".hidden.onnx")
    touch(tmp_path / "weights.bin")
    found = scan(tmp_path)
    assert sorted(found) == ["chat", "sensor"]
    assert found["chat"].versions == {1: flat} and not found["chat"].problems
    assert found["sensor"].versions == versioned and not found["sensor"].problems
    assert found["sensor"].served("all") == versioned
    assert found["sensor"].served("latest:2") == {2: versioned[2], 10: versioned[10]}
    assert found["sensor"].served("latest:5") == versioned


def test_problems_are_named(tmp_path):
    touch(tmp_path / "both.onnx")
    touch(tmp_path / "both" / "1" / "model.onnx")
    touch(tmp_path / "half" / "1" / "model.onnx")
    (tmp_path / "half" / "2").mkdir()  # being copied, say
    touch(tmp_path / "odd@2.onnx")
    found = scan(tmp_path)
    assert found["both"].problems == [f"{tmp_path} has both both.onnx and both/: keep one layout"]
    assert found["half"].problems == [f"{tmp_path / 'half' / '2'} has no model.onnx"]
    assert found["half"].versions == {1: tmp_path / "half" / "1" / "model.onnx"}
    assert found["odd@2"].problems == ["model name 'odd@2' has '@', which names versions in the session store: "
                                       "rename it"]


@pytest.mark.parametrize(("name", "version", "key"), [("chat", 1, "chat"), ("chat", 2, "chat@2"),
                                                       ("a-b.c", 123, "a-b.c@123")])
def test_version_keys(name, version, key):
    assert version_key(name, version) == key
    assert key_parts(key) == (name, version)
    assert describe(key) == f"version {version} of model {name!r}"


def test_model_control_settings():
    settings = load_settings(model_control="explicit", load_model=["chat,sensor", " other "])
    assert settings.load_model == ["chat", "sensor", "other"]
    assert load_settings(default_versions="chat=2, sensor=1").default_versions == {"chat": 2, "sensor": 1}
    refusals = {
        "load_model applies to model_control=explicit": dict(load_model="chat"),
        "load_model '\\*' \\(every model\\) goes alone": dict(model_control="explicit", load_model="*,chat"),
        "version_policy must be `all` or `latest:N`": dict(version_policy="latest:0"),
        "'chat' is not NAME=VERSION": dict(default_versions="chat"),
        "default_versions must name versions >= 1": dict(default_versions="chat=0"),
        "model_control": dict(model_control="sometimes"),
    }
    for message, overrides in refusals.items():
        with pytest.raises(SettingsError, match=message):
            load_settings(**overrides)


def test_load_model_flag_repeats(monkeypatch):
    arguments = build_parser().parse_args(["serve", "--model-control", "explicit", "--load-model", "chat",
                                           "--load-model", "sensor"])
    assert arguments.load_model == ["chat", "sensor"]
    monkeypatch.setenv("CELLSTREAM_MODEL_CONTROL", "explicit")
    monkeypatch.setenv("CELLSTREAM_LOAD_MODEL", "chat,sensor")
    assert load_settings().load_model == ["chat", "sensor"]
