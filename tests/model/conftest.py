"""Fixtures for the model/ tests: tiny random networks, their checkpoints and ONNX exports.

Helpers are handed out as factory fixtures so that no test module imports this conftest by name
(other test directories may hold a conftest.py of their own).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from cellstream.model.export import export_checkpoint
from cellstream.model.network import LSTMLanguageModel, ModelConfig

REPO = Path(__file__).resolve().parents[2]
# The machine has 2 cores and may be training in the background: one intra-op thread avoids
# oversubscription, which makes small-tensor torch calls many times slower.
torch.set_num_threads(1)
SMALL = ModelConfig(vocab_size=260, embed_dim=8, hidden_size=16, num_layers=2)


def _random_model(seed: int, config: ModelConfig = SMALL) -> LSTMLanguageModel:
    torch.manual_seed(seed)
    model = LSTMLanguageModel(config)
    model.eval()
    return model


def _write_checkpoint(model: LSTMLanguageModel, path: Path, seed: int, corpus: str) -> Path:
    torch.save(
        {
            "model": model.state_dict(),
            "config": asdict(model.config),
            "step": 0,
            "seed": seed,
            "corpus": corpus,
            "history": [{"step": 0, "seconds": 0.0, "loss": 5.5, "answer_accuracy": 0.0}],
        },
        path,
    )
    return path


def _export(model: LSTMLanguageModel, directory: Path, seed: int, name: str) -> Path:
    checkpoint = _write_checkpoint(model, directory / f"{name}.pt", seed, "test corpus")
    out = directory / f"{name}.onnx"
    export_checkpoint(checkpoint, out)
    return out


@pytest.fixture
def make_model():
    """make_model(seed, config=SMALL): a randomly initialised model in eval mode, fixed by `seed`."""
    return _random_model


@pytest.fixture
def write_checkpoint():
    """write_checkpoint(model, path, seed, corpus): a checkpoint dict in model/train.py's format
    (without the optimizer state, which export does not read)."""
    return _write_checkpoint


@pytest.fixture
def export_model(tmp_path):
    """export_model(model, seed, name="model"): checkpoint + cellstream.model.export.export_checkpoint -> .onnx path."""

    def export(model: LSTMLanguageModel, seed: int, name: str = "model") -> Path:
        return _export(model, tmp_path, seed, name)

    return export


@pytest.fixture(scope="session")
def exported(tmp_path_factory) -> tuple[LSTMLanguageModel, Path]:
    """One random small model and its ONNX export, shared by the read-only ONNX tests."""
    model = _random_model(11)
    return model, _export(model, tmp_path_factory.mktemp("onnx"), 11, "shared")


@pytest.fixture(scope="session")
def run_module():
    """run_module(*args): `python <args>` from the repository root, output captured as text."""

    def run(*args: str, timeout: float = 100) -> subprocess.CompletedProcess:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        return subprocess.run(
            [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
        )

    return run
