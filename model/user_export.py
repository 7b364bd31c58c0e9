"""Export your own LSTM module for serving: `cellstream export --module pkg.mod:factory [--checkpoint W]`.

`export_module` wraps the module into the serving contract (cellstream.model.wrap), writes the ONNX graph and its
`cellstream.*` metadata, then judges the file against a float64 run of the same module with the rule of
cellstream.model.parity (ExportErrors): onnxruntime at most 4 x as far from float64 as torch float32 is, and within
1e-4 of torch float32. An unfaithful export is removed and refused. docs/MODELS.md is the user's guide.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from cellstream.model import glassbox
from cellstream.model.onnx_file import FORMAT_VERSION, OPSET, stamp
from cellstream.model.parity import ExportError, ExportErrors, Inputs, judge, random_inputs
from cellstream.model.wrap import TOKENS, Served, UnservableModule, serve

PARITY_SHAPES = ((1, 1), (1, 17), (3, 5), (8, 1), (16, 33))


def metadata_for(served: Served, output_name: str, extra: Mapping[str, str]) -> dict[str, str]:
    shape = served.shape
    metadata = {
        "cellstream.format_version": FORMAT_VERSION,
        "cellstream.input_kind": shape.input_kind,
        "cellstream.num_layers": str(shape.num_layers),
        "cellstream.hidden_size": str(shape.hidden_size),
        "cellstream.output": output_name,
        "cellstream.source": type(served.module).__name__,
    }
    key = "cellstream.vocab_size" if shape.input_kind == TOKENS else "cellstream.feature_size"
    metadata[key] = str(shape.input_size)
    return metadata | dict(extra)


def write_onnx(served: Served, out: Path, output_name: str, metadata: Mapping[str, str]) -> None:
    """The graph with batch and time dynamic, everything else fixed (legacy TorchScript exporter, as the chat
    model: the dynamo exporter bakes the sample's time length into the output)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    kind, state_axes = served.shape.input_kind, {1: "batch"}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*batch_size other than 1.*")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            served, (served.sample(2, 3), *served.zero_state(2)), str(out), dynamo=False, opset_version=OPSET,
            input_names=[kind, "h0", "c0"], output_names=[output_name, "hn", "cn"],
            dynamic_axes={kind: {0: "batch", 1: "time"}, output_name: {0: "batch", 1: "time"},
                          "h0": state_axes, "c0": state_axes, "hn": state_axes, "cn": state_axes},
        )
    stamp(out, metadata)


def parity_inputs(served: Served, seed: int, samples: Iterable[np.ndarray] = ()) -> Iterator[Inputs]:
    """Random inputs from random states N(0, 0.5) in several shapes, then the caller's own samples
    (B, T[, F]) from a zero state: the module's real distribution, where a trained memory shows."""
    shape = served.shape
    yield from random_inputs(shape.input_kind, shape.input_size, shape.num_layers, shape.hidden_size, seed,
                             PARITY_SHAPES)
    for k, sample in enumerate(samples):
        x = np.asarray(sample, np.int64 if shape.input_kind == TOKENS else np.float32)
        zeros = np.zeros((shape.num_layers, x.shape[0], shape.hidden_size), np.float32)
        yield f"sample {k} ({x.shape[0]} x {x.shape[1]} steps) from a zero state", x, zeros, zeros


def measure_parity(served: Served, path: Path, inputs: Iterable[Inputs]) -> Iterator[tuple[str, ExportErrors]]:
    """(which output on which inputs, its errors): onnxruntime and torch float32 against a float64 copy."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    exact = copy.deepcopy(served).double()
    for what, x, h0, c0 in inputs:
        got = session.run(None, {served.shape.input_kind: x, "h0": h0, "c0": c0})
        with torch.no_grad():
            float32 = served(torch.from_numpy(x), torch.from_numpy(h0), torch.from_numpy(c0))
            x64 = torch.from_numpy(x) if served.shape.input_kind == TOKENS else torch.from_numpy(x).double()
            float64 = exact(x64, torch.from_numpy(h0).double(), torch.from_numpy(c0).double())
        for name, g, w32, w64 in zip(names, got, float32, float64, strict=True):
            yield f"{name} on {what}", ExportErrors.measure(g, w32.numpy(), w64.numpy())


def export_module(
    module: nn.Module, out: Path, *, input_kind: str | None = None, output_name: str | None = None,
    metadata: Mapping[str, str] | None = None, samples: Iterable[np.ndarray] = (), seed: int = 0,
) -> ExportErrors:
    """Wrap, export and judge `module` (see the module docstring); returns the worst errors measured.

    output_name: what the per-step output means (`logits` for a tokens model, which the server samples
    from; for a features model e.g. `forecast`, default `outputs`). metadata: extra `cellstream.*` keys,
    e.g. `cellstream.tokenizer=bytes-v1` for a byte-level model (docs/MODELS.md lists what each changes).
    """
    served = serve(module, input_kind)
    name = output_name or ("logits" if served.shape.input_kind == TOKENS else "outputs")
    if served.shape.input_kind == TOKENS and name != "logits":
        raise UnservableModule(f"a tokens model's output is its logits, named 'logits', not {name!r}")
    write_onnx(served, out, name, metadata_for(served, name, metadata or {}))
    try:
        return judge(measure_parity(served, out, parity_inputs(served, seed, samples)), "module")
    except ExportError:
        out.unlink()
        raise


def load_factory(spec: str) -> nn.Module:
    """`pkg.mod:factory` -> factory(): a callable (a function or an nn.Module class) taking no arguments."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise UnservableModule(f"--module must be 'package.module:factory', got {spec!r}")
    factory = getattr(importlib.import_module(module_name), attribute, None)
    if factory is None:
        raise UnservableModule(f"{module_name} has no attribute {attribute!r}")
    made = factory()
    if not isinstance(made, nn.Module):
        raise UnservableModule(f"{spec}() returned {type(made).__name__}, not a torch nn.Module")
    return made


def load_weights(module: nn.Module, path: Path) -> None:
    """A state_dict file, or a checkpoint dict holding one under 'model' or 'state_dict'."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    saved = torch.load(path, map_location="cpu", weights_only=False)
    for key in ("model", "state_dict"):
        if isinstance(saved, dict) and isinstance(saved.get(key), dict):
            saved = saved[key]
    module.load_state_dict(saved)


def _metadata_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return (key if key.startswith("cellstream.") else f"cellstream.{key}"), value


def parser() -> argparse.ArgumentParser:
    """The options of `cellstream export --module` (also shown by `cellstream export --help`)."""
    made = argparse.ArgumentParser(
        prog="cellstream export",
        description="Export your own LSTM module (called as module(x, (h0, c0)) -> (y, (hn, cn))) for serving; "
                    "see docs/MODELS.md. The module is imported from the current directory (run this from your "
                    "project's root) or from the installed packages.")
    made.add_argument("--module", required=True, help="package.module:factory, a callable returning the module")
    made.add_argument("--checkpoint", type=Path, help="weights: a state_dict (or a dict with 'model' / "
                                                      "'state_dict'); omit when the factory loads them")
    made.add_argument("--out", type=Path, required=True, help="the .onnx file to write")
    made.add_argument("--input", choices=("tokens", "features"), help="default: tokens if it has an nn.Embedding")
    made.add_argument("--output-name", help="what the output means: logits (tokens models), forecast, ...")
    made.add_argument("--samples", type=Path, help="a .npy array of your own inputs (batch, time[, features]) "
                                                   "to check the export on, besides random ones")
    made.add_argument("--meta", type=_metadata_pair, action="append", default=[], metavar="KEY=VALUE",
                      help="extra metadata, e.g. tokenizer=bytes-v1 (the cellstream. prefix is added)")
    return made


def import_factory(spec: str) -> nn.Module:
    """load_factory from the current directory (the user's project) or the installed packages; an ImportError
    that says where it looked."""
    here = str(Path.cwd())
    sys.path.insert(0, here)
    try:
        return load_factory(spec)
    except ModuleNotFoundError as exc:
        package = spec.partition(":")[0]
        if exc.name is None or not (package == exc.name or package.startswith(exc.name + ".")):
            raise  # the user's module was found; something it imports was not
        raise ImportError(f"cannot import {package!r} ({exc}); looked in the current directory {here} and the "
                          "installed packages: run this from your project's root (the directory holding the "
                          "package), or `pip install -e` the project") from None
    finally:
        sys.path.remove(here)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        module = import_factory(args.module)
        if args.checkpoint is not None:
            load_weights(module, args.checkpoint)
        samples = [np.load(args.samples)] if args.samples is not None else []
        worst = export_module(module, args.out, input_kind=args.input, output_name=args.output_name,
                              metadata=dict(args.meta), samples=samples)
    except (OSError, ImportError, UnservableModule, ExportError, RuntimeError, ValueError) as exc:
        print(f"cellstream export: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB); worst scaled error: {worst.summary()}; "
          f"check it with `cellstream check-model {args.out}`")
    print(glassbox.export_line(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
