"""The train/export command lines, run as real subprocesses (`python -m cellstream.model.train` / `.export`),
or through the same `main` in this process where a process would add only seconds of imports."""

import math
import random
import re
import shutil

import pytest
import torch

from cellstream.model.curriculum import LAST_STAGE
from cellstream.model.train import main as train_main

TRAIN, EXPORT = ("-m", "cellstream.model.train"), ("-m", "cellstream.model.export")
TINY = [
    "--batch-size", "4", "--hidden-size", "32", "--embed-dim", "8", "--layers", "1", "--eval-every", "3",
    "--checkpoint-every", "3", "--eval-dialogues", "4", "--bptt", "64", "--threads", "1", "--quiet",
]  # fmt: skip

FRENCH = (
    "Élodie a mangé une crème brûlée à Noël. Le garçon déçu est allé à la fête du village.\n"
    "Où est la bibliothèque ? Près de l'église, à côté du café.\n"
)
EVALUATION_KEYS = {"step", "seconds", "loss", "answer_accuracy", "stage_answer_accuracy", "echo_accuracy",
                   "echo_by_length", "probe_accuracy", "stage"}


def load(path):
    return torch.load(path, weights_only=False)


def train_here(capsys, *argv):
    """`cellstream train` in this process: its exit code and what it wrote to stderr."""
    code = train_main([*TINY, *map(str, argv)])
    return code, capsys.readouterr().err


def adam_steps(checkpoint):
    return {float(s["step"]) for s in checkpoint["optimizer"]["state"].values()}


def assert_clean_failure(result, *fragments):
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.fixture(scope="module")
def trained(run_module, tmp_path_factory):
    """Six steps on synthetic dialogues, evaluated and checkpointed every three."""
    out = tmp_path_factory.mktemp("train") / "model.pt"
    result = run_module(*TRAIN, "--steps", "6", *TINY, "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out


def test_train_writes_checkpoint_with_history(trained):
    checkpoint = load(trained)
    assert checkpoint["step"] == 6
    assert [h["step"] for h in checkpoint["history"]] == [3, 6]
    for evaluation in checkpoint["history"]:
        assert set(evaluation) == EVALUATION_KEYS
        assert math.isfinite(evaluation["loss"]) and evaluation["loss"] > 0
        assert evaluation["answer_accuracy"] == 0.0  # six steps say no answer right (counting: test_model_train)
        assert evaluation["stage_answer_accuracy"] == 0.0  # the current stage has questions too
        assert 0.0 <= evaluation["echo_accuracy"] < 0.7 and 0.0 <= evaluation["probe_accuracy"] < 0.5
    # Unmastered, the curriculum follows its schedule: stage s by s/10 of --last-stage-by (60%) of the steps.
    assert [h["stage"] for h in checkpoint["history"]] == [5, 10]
    assert checkpoint["config"] == {"vocab_size": 260, "embed_dim": 8, "hidden_size": 32, "num_layers": 1}
    assert checkpoint["seed"] == 1234 and "synthetic" in checkpoint["corpus"] and "curriculum" in checkpoint["corpus"]
    assert {"model", "probe", "optimizer", "tokenizer", "torch_rng"} <= set(checkpoint)
    assert checkpoint["stage"] == LAST_STAGE == 10
    random.Random().setstate(checkpoint["data_rng"])  # the data stream's state, to continue it
    assert checkpoint["args"]["fresh"] is False and checkpoint["args"]["device"] == "auto"
    assert adam_steps(checkpoint) == {6.0}


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
    assert f"resuming from {trained} at step 6 of 9 (curriculum stage 10)" in result.stderr
    before, after = load(trained), load(out)
    assert after["step"] == 9
    # The resumed run evaluates at step 9 only, after the history it continues: it started at step 6.
    assert [h["step"] for h in after["history"]] == [3, 6, 9]
    assert after["history"][:2] == before["history"]
    assert any(not torch.equal(before["model"][k], after["model"][k]) for k in before["model"])
    # Adam's state continued from the checkpoint: its step count went from 6 to 9.
    assert adam_steps(after) == {9.0}


def test_a_run_continues_from_its_own_out(capsys, trained, tmp_path):
    out = tmp_path / "model.pt"
    shutil.copy(trained, out)
    code, err = train_here(capsys, "--steps", "9", "--out", out)
    assert code == 0, err
    assert f"cellstream train: resuming from {out} at step 6 of 9 (curriculum stage 10)" in err
    before, after = load(trained), load(out)
    assert after["step"] == 9 and [h["step"] for h in after["history"]] == [3, 6, 9]
    assert after["history"][:2] == before["history"]
    seconds = [h["seconds"] for h in after["history"]]
    assert seconds == sorted(seconds)  # the clock continues too
    assert adam_steps(after) == {9.0} and after["stage"] == LAST_STAGE
    assert any(not torch.equal(before["model"][k], after["model"][k]) for k in before["model"])
    # Weights, optimiser, data stream and torch's generator all come from the checkpoint: continuing it again
    # is the same run.
    again = tmp_path / "again.pt"
    shutil.copy(trained, again)
    assert train_here(capsys, "--steps", "9", "--out", again)[0] == 0
    assert all(torch.equal(after["model"][k], load(again)["model"][k]) for k in after["model"])
    assert load(again)["data_rng"] == after["data_rng"] != before["data_rng"]


def test_a_finished_out_is_left_as_it_is(capsys, trained, tmp_path):
    out = tmp_path / "model.pt"
    shutil.copy(trained, out)
    code, err = train_here(capsys, "--steps", "6", "--out", out)
    assert code == 0
    assert f"cellstream train: {out} is already trained (6 of 6 steps); --fresh starts over" in err
    assert out.read_bytes() == trained.read_bytes()


def test_fresh_starts_over_at_the_first_stage_asked(capsys, trained, tmp_path):
    out = tmp_path / "model.pt"
    shutil.copy(trained, out)
    code, err = train_here(capsys, "--steps", "3", "--eval-every", "1", "--last-stage-by", "1", "--fresh",
                           "--first-stage", "2", "--out", out)
    assert code == 0, err
    assert "resuming" not in err
    checkpoint = load(out)
    assert checkpoint["step"] == 3 and [h["step"] for h in checkpoint["history"]] == [1, 2, 3]
    assert checkpoint["args"]["fresh"] and adam_steps(checkpoint) == {3.0}
    # From stage 2, then the schedule's stage when it is later: 9 x step / 3 (the last stage by the end).
    assert [h["stage"] for h in checkpoint["history"]] == [2, 3, 6] and checkpoint["stage"] == 6
    assert "from stage 2" in checkpoint["corpus"]


def test_the_curriculum_starts_on_echoes(capsys, tmp_path):
    out = tmp_path / "model.pt"
    code, err = train_here(capsys, "--steps", "3", "--eval-every", "1", "--last-stage-by", "1", "--out", out)
    assert code == 0, err
    first, second, _ = load(out)["history"]
    # Stage 0 has no questions: it advances on the echoes of its acknowledgements, measured at stage 0.
    assert first["stage"] == 0 and first["stage_answer_accuracy"] is None
    assert 0.0 <= first["echo_accuracy"] < 0.7
    assert second["stage"] == 3 and second["stage_answer_accuracy"] == 0.0


def test_an_out_of_another_model_config_fails_cleanly(capsys, trained, tmp_path):
    out = tmp_path / "model.pt"
    shutil.copy(trained, out)
    code, err = train_here(capsys, "--steps", "9", "--hidden-size", "16", "--out", out)
    assert code == 2
    assert f"cellstream train: error: {out} holds a run of model config" in err
    assert "pass another --out, or --fresh to start over" in err
    assert out.read_bytes() == trained.read_bytes()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_a_gpu_fails_cleanly(capsys, tmp_path):
    out = tmp_path / "never.pt"
    code, err = train_here(capsys, "--steps", "2", "--device", "cuda", "--out", out)
    assert code == 2
    assert "cellstream train: error: --device cuda, but torch sees no CUDA device" in err
    assert not out.exists()


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
    assert all(h["answer_accuracy"] is None and h["probe_accuracy"] is None and h["stage"] is None
               for h in checkpoint["history"])


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
