"""Fixtures shared by tests/service and tests/e2e: a directory of tiny random ONNX models.

The models have random weights on purpose: the service tests check plumbing and exact state carry
(server output == in-process onnxruntime on the same file), never the shipped model's quality.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

TINY_CHAT = "tiny-chat"  # tokens model: vocab 260 (byte tokenizer), 2 layers x 16 units
TINY_FEATURES = "tiny-features"  # features model: 5 floats per step, 2 layers x 12 units, 7 logits


def _export_tokens_model(path: Path) -> None:
    import torch

    from model.export import export_onnx, metadata_for
    from model.network import LSTMLanguageModel, ModelConfig

    torch.manual_seed(1234)
    model = LSTMLanguageModel(ModelConfig(vocab_size=260, embed_dim=8, hidden_size=16, num_layers=2))
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(model, metadata_for(model, {"seed": 0, "step": 0, "corpus": "test"}), path)


def _export_features_model(path: Path) -> None:
    import torch
    from torch import nn

    class FeaturesLSTM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(input_size=5, hidden_size=12, num_layers=2, batch_first=True)
            self.head = nn.Linear(12, 7)

        def forward(
            self, features: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            out, (hn, cn) = self.lstm(features, (h0, c0))
            return self.head(out), hn, cn

    torch.manual_seed(4321)
    model = FeaturesLSTM().eval()
    sample = (torch.zeros(2, 3, 5), torch.zeros(2, 2, 12), torch.zeros(2, 2, 12))
    state_axes = {1: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            sample,
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["features", "h0", "c0"],
            output_names=["logits", "hn", "cn"],
            dynamic_axes={
                "features": {0: "batch", 1: "time"},
                "logits": {0: "batch", 1: "time"},
                "h0": state_axes,
                "c0": state_axes,
                "hn": state_axes,
                "cn": state_axes,
            },
        )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory holding tiny-chat.onnx (tokens) and tiny-features.onnx (features)."""
    import torch

    torch.set_num_threads(1)  # 2 cores, maybe training in the background
    directory = tmp_path_factory.mktemp("tiny-models")
    _export_tokens_model(directory / f"{TINY_CHAT}.onnx")
    _export_features_model(directory / f"{TINY_FEATURES}.onnx")
    return directory
