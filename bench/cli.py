"""`cellstream bench` / `python -m cellstream.bench`: flags, the run, the table, results.json and the plots."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from cellstream.bench.errors import BenchError
from cellstream.bench.options import APIS, QUICK, Options, flag_fields
from cellstream.bench.plots import write_plots
from cellstream.bench.progress import say
from cellstream.bench.report import render
from cellstream.bench.runner import run, write_json
from cellstream.bench.targets import evaluate


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _apis(text: str) -> tuple[str, ...]:
    values = tuple(text.split(","))
    unknown = set(values) - set(APIS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown api {sorted(unknown)}; choose from {','.join(APIS)}")
    return values


def _positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
        return value

    return parse


def _parser_for(name: str, default: object) -> Callable[[str], object]:
    if name == "apis":
        return _apis
    if isinstance(default, tuple):
        return _ints
    if isinstance(default, int | float):
        return _positive(type(default))
    return type(default) if isinstance(default, str) else Path


def _show(value: object) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cellstream bench",
        description="Benchmark cellstream against in-process onnxruntime and a stateless client: starts its own "
                    "servers on 127.0.0.1, prints a table, writes results.json and PNG plots. docs/BENCHMARKS.md "
                    "explains the figures. Lists are comma-separated.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="tiny durations and counts: checks the harness, measures nothing worth publishing")
    defaults = Options()
    for f in flag_fields():
        default = getattr(defaults, f.name)
        shown = _show(default) + (f"; --quick: {_show(QUICK[f.name])}" if f.name in QUICK else "")
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=_parser_for(f.name, default),
                            default=None, metavar=f.name.split("_")[-1].upper(),
                            help=f"{f.metadata['help']} [default {shown}]")
    parser.add_argument("--serve-arg", dest="serve_args", action="append", default=[], metavar="ARG",
                        help="extra `cellstream serve` argument for every server, repeated per word "
                             "(--serve-arg=--max-queue-size --serve-arg=8192); wins over the harness's settings")
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots (no matplotlib)")
    return parser


def options_from(args: argparse.Namespace) -> Options:
    """The full-run defaults, then the quick ones with --quick, then every flag given."""
    chosen: dict[str, object] = dict(QUICK) if args.quick else {}
    chosen.update({f.name: getattr(args, f.name) for f in flag_fields() if getattr(args, f.name) is not None})
    return dataclasses.replace(Options(), plots=args.plots, serve_args=tuple(args.serve_args), **chosen)


def main(argv: Sequence[str] | None = None) -> int:
    options = options_from(build_parser().parse_args(argv))
    if options.plots and importlib.util.find_spec("matplotlib") is None:
        print("cellstream bench: the plots need matplotlib: pip install 'cellstream[bench]' (or pass --no-plots)",
              file=sys.stderr)
        return 2
    options.out_dir.mkdir(parents=True, exist_ok=True)
    try:
        results = run(options)
    except BenchError as exc:
        print(f"cellstream bench: {exc}", file=sys.stderr)
        return 1
    say("writing results")
    checks = evaluate(results)
    results["targets"] = [check.to_json() for check in checks]
    results["plots"] = write_plots(results, options.out_dir) if options.plots else []
    path = write_json(results, options.out_dir)
    print()
    print(render(results, checks))
    print(f"\nwrote {path}" + "".join(f", {name}" for name in results["plots"]))
    return 0
