"""`cellstream check-model FILE`: load a model file the way the server does and print its spec, or every
way it breaks the contract (docs/MODELS.md) with what to change. Exit 0 when it can be served, 1 when
not. Torch-free: it is the engine's own loading and checks (cellstream.service.contract)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from cellstream.service.engine import TOKENS, Engine, ModelSpec
from cellstream.service.errors import ModelLoadError


def describe(spec: ModelSpec) -> list[str]:
    """The spec as the lines check-model prints."""
    layers, hidden = spec.state_shape
    if spec.input_kind == TOKENS:
        main = "tokens int64 (batch, time)"
        text = f"; text accepted ({spec.tokenizer} tokenizer)" if spec.accepts_text else "; no text (no tokenizer)"
    else:
        main, text = f"features float32 (batch, time, {spec.feature_size})", ""
    lines = [
        f"model    {spec.name}",
        f"input    {main}{text}",
        f"state    h0, c0 -> hn, cn float32 ({layers}, batch, {hidden}): {layers} layer{'s' * (layers > 1)} x "
        f"{hidden} units",
        f"output   {spec.output_name} float32 (batch, time, {spec.vocab_size})",
    ]
    if spec.special_tokens:
        lines.append(f"special  {', '.join(f'{k}={v}' for k, v in sorted(spec.special_tokens.items()))}")
    lines += [f"meta     {key} = {value}" for key, value in sorted(spec.metadata.items())]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="cellstream check-model",
        description="Check that an ONNX file can be served: load it as the server does, print its spec "
                    "(exit 0) or every contract violation with what to change (exit 1). See docs/MODELS.md.")
    parser.add_argument("file", type=Path, help="the .onnx file")
    args = parser.parse_args(argv)
    try:
        engine = Engine(args.file, name=args.file.stem)
    except ModelLoadError as exc:
        print(f"cellstream check-model: {args.file} cannot be served:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    print(f"cellstream check-model: {args.file} can be served")
    for line in describe(engine.spec):
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
