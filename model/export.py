"""Export a checkpoint to ONNX with explicit state inputs/outputs: `cellstream export`.

Graph: tokens int64 (B, T), h0/c0 float32 (L, B, H) -> logits float32 (B, T, V), hn/cn (L, B, H),
batch and time dynamic. The metadata carries everything the service needs to serve it without torch.
After writing, the file is run under onnxruntime and judged against a float64 run of the same weights
(cellstream.model.parity); an unfaithful export is rejected. Beside it goes the glass-box graph of the same weights
(cellstream.model.glassbox: `<name>.gates.onnx`), from which the server reads the gates, judged the same way.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from cellstream.model import corpus, glassbox, tokenizer
from cellstream.model.languages import LANGUAGES
from cellstream.model.network import LSTMLanguageModel, ModelConfig
from cellstream.model.onnx_file import FORMAT_VERSION, OPSET, stamp
from cellstream.model.parity import ExportError, ExportErrors, judge

PARITY_SHAPES = ((1, 1), (1, 17), (3, 5), (8, 1), (16, 33))
PARITY_DIALOGUES = 8


def load_checkpoint(path: Path) -> tuple[LSTMLanguageModel, dict]:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
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
    stamp(out, metadata)


def parity_inputs(config: ModelConfig, seed: int) -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """(what, tokens, h0, c0): random tokens from random states N(0, 0.5) in several shapes, then real
    held-out dialogues in each language from a zero state (the model's own distribution)."""
    rng = np.random.default_rng(seed)
    for batch, time in PARITY_SHAPES:
        state_shape = (config.num_layers, batch, config.hidden_size)
        yield (f"random tokens and state, batch {batch}, time {time}",
               rng.integers(0, config.vocab_size, size=(batch, time), dtype=np.int64),
               rng.normal(0, 0.5, state_shape).astype(np.float32), rng.normal(0, 0.5, state_shape).astype(np.float32))
    dialogue_rng = random.Random(seed)
    for language in LANGUAGES:
        rows = [tokenizer.encode(corpus.make_dialogue(dialogue_rng, heldout=True, language=language).text)
                for _ in range(PARITY_DIALOGUES)]
        width = min(len(row) for row in rows)
        zeros = np.zeros((config.num_layers, len(rows), config.hidden_size), np.float32)
        yield (f"{len(rows)} {language} dialogues from a zero state, {width} bytes",
               np.array([row[:width] for row in rows], np.int64), zeros, zeros)


def measure_parity(model: LSTMLanguageModel, path: Path, seed: int = 0) -> Iterator[tuple[str, ExportErrors]]:
    """(which output on which inputs, its errors) for every parity input and output (cellstream.model.parity):
    onnxruntime against torch float32 and both against a float64 copy of the model."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    exact = copy.deepcopy(model).double()
    for what, tokens, h0, c0 in parity_inputs(model.config, seed):
        got = session.run(None, {"tokens": tokens, "h0": h0, "c0": c0})
        with torch.no_grad():
            float32 = model(torch.from_numpy(tokens), torch.from_numpy(h0), torch.from_numpy(c0))
            float64 = exact(torch.from_numpy(tokens), torch.from_numpy(h0).double(), torch.from_numpy(c0).double())
        for name, g, w32, w64 in zip(("logits", "hn", "cn"), got, float32, float64, strict=True):
            yield f"{name} on {what}", ExportErrors.measure(g, w32.numpy(), w64.numpy())


def check_parity(model: LSTMLanguageModel, path: Path, seed: int = 0) -> ExportErrors:
    """Raise ExportError on the first output and inputs where the export is not faithful; else return
    the worst of each error."""
    return judge(measure_parity(model, path, seed), "model")


def export_checkpoint(checkpoint_path: Path, out: Path) -> tuple[ExportErrors, ExportErrors]:
    """Export the fast graph and its glass-box graph; the worst errors of each."""
    model, checkpoint = load_checkpoint(checkpoint_path)
    export_onnx(model, metadata_for(model, checkpoint), out)
    return check_parity(model, out), glassbox.export(out, parity_inputs(model.config, seed=0))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(arg == "--module" or arg.startswith("--module=") for arg in argv):
        from cellstream.model.user_export import main as export_user_module  # your own LSTM: docs/MODELS.md

        return export_user_module(argv)
    from cellstream.model.user_export import parser as module_parser  # your own LSTM: docs/MODELS.md

    parser = argparse.ArgumentParser(
        prog="cellstream export", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Export a checkpoint written by `cellstream train` to ONNX, or your own LSTM module with "
                    "--module (its options below).", epilog=module_parser().format_help())
    parser.add_argument("checkpoint", type=Path, help="checkpoint written by `cellstream train`")
    parser.add_argument("--out", type=Path, default=Path("model/artifacts/cellstream-chat.onnx"))
    args = parser.parse_args(argv)
    try:
        worst, glass_worst = export_checkpoint(args.checkpoint, args.out)
    except (FileNotFoundError, ExportError, ValueError) as exc:
        print(f"cellstream export: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB); worst scaled error: {worst.summary()}")
    print(f"wrote {glassbox.path_for(args.out)} (gates); worst scaled error against the NumPy reference: "
          f"{glass_worst.summary(glassbox.FLOAT32)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
