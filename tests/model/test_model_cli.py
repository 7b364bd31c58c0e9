"""The train/export command lines, run as real subprocesses (`python -m cellstream.model.train` / `.export`)."""

import math
import re

import pytest
import torch

TRAIN, EXPORT = ("-m", "cellstream.model.train"), ("-m", "cellstream.model.export")
TINY = [
    "--batch-size", "4", "--hidden-size", "32", "--embed-dim", "8", "--layers", "1", "--eval-every", "3",
    "--checkpoint-every", "3", "--eval-dialogues", "4", "--bptt", "64", "--threads", "1", "--quiet",
]  # fmt: skip

FRENCH = (
    "Élodie a mangé une crème brûlée à Noël. Le garçon déçu est allé à la fête du village.\n"
    "Où est la bibliothèque ? Près de l'église, à côté du café.\n"
)


def load(path):
    return torch.load(path, weights_only=False)


def assert_clean_failure(result, *fragments):
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.fixture(scope="module")
def trained(run_module, tmp_path_factory):
    """Six steps on synthetic dialogues; bptt 64 < a dialogue's length, so state carries across windows."""
    out = tmp_path_factory.mktemp("train") / "model.pt"
    result = run_module(*TRAIN, "--steps", "6", *TINY, "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out


def test_train_writes_checkpoint_with_history(trained):
    checkpoint = load(trained)
    assert checkpoint["step"] == 6
    assert [h["step"] for h in checkpoint["history"]] == [3, 6]
    for evaluation in checkpoint["history"]:
        assert math.isfinite(evaluation["loss"]) and evaluation["loss"] > 0
        assert evaluation["answer_accuracy"] == 0.0  # six steps say no answer right (counting: test_model_train)
    assert checkpoint["config"] == {"vocab_size": 260, "embed_dim": 8, "hidden_size": 32, "num_layers": 1}
    assert checkpoint["seed"] == 1234 and "synthetic" in checkpoint["corpus"]
    assert {"model", "optimizer", "tokenizer"} <= set(checkpoint)
    steps = [float(s["step"]) for s in checkpoint["optimizer"]["state"].values()]
    assert steps and set(steps) == {6.0}


def test_export_of_trained_checkpoint(run_module, trained, tmp_path):
    onnx_path = tmp_path / "model.onnx"
    result = run_module(*EXPORT, str(trained), "--out", str(onnx_path))
    assert result.returncode == 0, result.stderr
    assert f"wrote {onnx_path}" in result.stdout
    found = re.search(r"onnxruntime to float64 (\S+) \(torch float32 (\S+)\), onnxruntime to torch float32 (\S+)",
                      result.stdout)
    assert found, result.stdout
    to_float64, torch_to_float64, to_torch = map(float, found.groups())
    assert 0.0 < to_float64 <= max(4 * torch_to_float64, 1e-5) and 0.0 < to_torch <= 1e-4
    assert onnx_path.stat().st_size > 1000


def test_resume_continues_from_checkpoint_step(run_module, trained, tmp_path):
    out = tmp_path / "model2.pt"
    result = run_module(*TRAIN, "--steps", "9", *TINY, "--resume", str(trained), "--out", str(out))
    assert result.returncode == 0, result.stderr
    before, after = load(trained), load(out)
    assert after["step"] == 9
    # The resumed run evaluates at step 9 only: it started at step 6, not from zero.
    assert [h["step"] for h in after["history"]] == [9]
    assert any(not torch.equal(before["model"][k], after["model"][k]) for k in before["model"])
    # Adam's state continued from the checkpoint: its step count went from 6 to 9.
    steps = [float(s["step"]) for s in after["optimizer"]["state"].values()]
    assert steps and set(steps) == {9.0}


@pytest.mark.parametrize("steps", ["6", "4"])
def test_resume_with_nothing_left_to_train_fails_cleanly(run_module, trained, tmp_path, steps):
    out = tmp_path / "never.pt"
    result = run_module(*TRAIN, "--steps", steps, *TINY, "--resume", str(trained), "--out", str(out))
    assert_clean_failure(result, "cellstream train: error:", "already at step 6")
    assert not out.exists()


def test_resume_with_another_model_config_fails_cleanly(run_module, trained, tmp_path):
    result = run_module(
        *TRAIN, "--steps", "9", *TINY, "--hidden-size", "16", "--resume", str(trained),
        "--out", str(tmp_path / "never.pt"),
    )  # fmt: skip
    assert_clean_failure(result, "cellstream train: error:", "model config")


def test_train_on_plain_text_file(run_module, tmp_path):
    text_path = tmp_path / "french.txt"
    text_path.write_text(FRENCH * 30, encoding="utf-8")
    out = tmp_path / "text.pt"
    result = run_module(*TRAIN, "--corpus", str(text_path), "--steps", "4", *TINY, "--out", str(out))
    assert result.returncode == 0, result.stderr
    checkpoint = load(out)
    assert checkpoint["step"] == 4
    assert checkpoint["corpus"] == "text file french.txt"
    losses = [h["loss"] for h in checkpoint["history"]]
    assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses)
    assert all(h["answer_accuracy"] is None for h in checkpoint["history"])


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (
            ["--corpus", "{tmp}/missing.txt"],
            ["cellstream train: error:", "corpus file not found", "missing.txt"],
        ),
        (["--corpus", "{tmp}/empty.txt"], ["cellstream train: error:", "corpus file is empty"]),
        (["--corpus", "{tmp}/latin1.txt"], ["cellstream train: error:", "not valid UTF-8"]),
        (["--steps", "0"], ["--steps", "expected a positive integer, got 0"]),
        (["--lr", "-1"], ["--lr", "expected a positive finite number, got -1"]),
        (["--hidden-size", "abc"], ["--hidden-size", "expected a positive integer, got 'abc'"]),
        (["--resume", "{tmp}/missing.pt"], ["cellstream train: error:", "missing.pt"]),
    ],
    ids=[
        "missing-corpus",
        "empty-corpus",
        "latin1-corpus",
        "steps-0",
        "lr-negative",
        "hidden-abc",
        "missing-resume",
    ],
)
def test_train_rejects_bad_input(run_module, tmp_path, args, fragments):
    (tmp_path / "empty.txt").write_text(" \n\n")
    (tmp_path / "latin1.txt").write_bytes("crème brûlée\n".encode("latin-1"))
    args = [a.format(tmp=tmp_path) for a in args]
    out = tmp_path / "never.pt"
    result = run_module(*TRAIN, "--steps", "2", *TINY, *args, "--out", str(out))
    assert_clean_failure(result, *fragments)
    assert not out.exists()


def test_export_rejects_missing_checkpoint(run_module, tmp_path):
    out = tmp_path / "never.onnx"
    result = run_module(*EXPORT, str(tmp_path / "nope.pt"), "--out", str(out))
    assert_clean_failure(result, "cellstream export: error:", "checkpoint not found", "nope.pt")
    assert not out.exists()
