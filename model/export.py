"""Export a checkpoint to ONNX with explicit state inputs/outputs: `cellstream export`.

Graph: tokens int64 (B, T), h0/c0 float32 (L, B, H) -> logits float32 (B, T, V), hn/cn (L, B, H),
batch and time dynamic. The metadata carries everything the service needs to serve it without torch.
After writing, the file is checked against torch under onnxruntime and rejected if they differ.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from model import tokenizer
from model.network import LSTMLanguageModel, ModelConfig
from model.parity import TOLERANCE, scaled_max_diff

FORMAT_VERSION = "1"
OPSET = 17
PARITY_SHAPES = ((1, 1), (1, 17), (3, 5), (8, 1), (16, 33))


class ExportError(RuntimeError):
    """The exported graph is unusable: unchecked, or different from torch."""


def load_checkpoint(path: Path) -> tuple[LSTMLanguageModel, dict]:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    checkpoint = torch.load(path, weights_only=False)
    model = LSTMLanguageModel(ModelConfig(**checkpoint["config"]))
    model.load_state_dict(checkpoint["model"])
    model.eval()
    return model, checkpoint


def metadata_for(model: LSTMLanguageModel, checkpoint: dict) -> dict[str, str]:
    config = model.config
    history = checkpoint.get("history") or [{}]
    return {
        "cellstream.format_version": FORMAT_VERSION,
        "cellstream.input_kind": "tokens",
        "cellstream.tokenizer": tokenizer.KIND,
        "cellstream.vocab_size": str(config.vocab_size),
        "cellstream.special_tokens": json.dumps(tokenizer.SPECIAL_TOKENS, sort_keys=True),
        "cellstream.num_layers": str(config.num_layers),
        "cellstream.hidden_size": str(config.hidden_size),
        "cellstream.embed_dim": str(config.embed_dim),
        "cellstream.training_seed": str(checkpoint.get("seed", "")),
        "cellstream.training_steps": str(checkpoint.get("step", "")),
        "cellstream.corpus": str(checkpoint.get("corpus", "")),
        "cellstream.eval": json.dumps(history[-1], sort_keys=True),
    }


def export_onnx(model: LSTMLanguageModel, metadata: dict[str, str], out: Path) -> None:
    """Write the graph (legacy TorchScript exporter: one file, truly dynamic output shapes)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    h0, c0 = model.zero_state(2)
    sample = (torch.zeros((2, 3), dtype=torch.long), h0, c0)
    state_axes = {1: "batch"}
    with warnings.catch_warnings():
        # Chosen on purpose: the dynamo exporter bakes the sample's time length into `logits`, and
        # the batch-size warning does not apply because h0/c0 are graph inputs.
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*batch_size other than 1.*")
        torch.onnx.export(
            model, sample, str(out), dynamo=False, opset_version=OPSET,
            input_names=["tokens", "h0", "c0"], output_names=["logits", "hn", "cn"],
            dynamic_axes={
                "tokens": {0: "batch", 1: "time"}, "h0": state_axes, "c0": state_axes,
                "logits": {0: "batch", 1: "time"}, "hn": state_axes, "cn": state_axes,
            },
        )
    graph = onnx.load(str(out))
    for key, value in metadata.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value
    graph.producer_name = "cellstream"
    onnx.checker.check_model(graph, full_check=True)
    onnx.save(graph, str(out))


def check_parity(model: LSTMLanguageModel, path: Path, seed: int = 0) -> float:
    """Largest scaled |onnxruntime - torch| over logits, hn, cn for several shapes; raises above tolerance."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    config = model.config
    worst = 0.0
    for batch, time in PARITY_SHAPES:
        tokens = rng.integers(0, config.vocab_size, size=(batch, time), dtype=np.int64)
        state_shape = (config.num_layers, batch, config.hidden_size)
        h0 = rng.normal(0, 0.5, state_shape).astype(np.float32)
        c0 = rng.normal(0, 0.5, state_shape).astype(np.float32)
        got = session.run(None, {"tokens": tokens, "h0": h0, "c0": c0})
        with torch.no_grad():
            want = model(torch.from_numpy(tokens), torch.from_numpy(h0), torch.from_numpy(c0))
        for name, g, w in zip(("logits", "hn", "cn"), got, want, strict=True):
            diff = scaled_max_diff(g, w.numpy())
            worst = max(worst, diff)
            if diff > TOLERANCE:
                raise ExportError(
                    f"onnxruntime and torch differ on {name} by {diff:.3g} > {TOLERANCE} "
                    f"(batch {batch}, time {time})"
                )
    return worst


def export_checkpoint(checkpoint_path: Path, out: Path) -> float:
    model, checkpoint = load_checkpoint(checkpoint_path)
    export_onnx(model, metadata_for(model, checkpoint), out)
    return check_parity(model, out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cellstream export", description="Export a checkpoint to ONNX.")
    parser.add_argument("checkpoint", type=Path, help="checkpoint written by `cellstream train`")
    parser.add_argument("--out", type=Path, default=Path("model/artifacts/cellstream-chat.onnx"))
    args = parser.parse_args(argv)
    try:
        worst = export_checkpoint(args.checkpoint, args.out)
    except (FileNotFoundError, ExportError) as exc:
        print(f"cellstream export: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB); parity max |diff| = {worst:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
