"""`cellstream serve|chat|bench|train|export|evaluate`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from service.auth import SecurityConfigError
from service.config import SettingsError, add_settings_arguments, load_settings
from service.errors import ModelLoadError
from service.sessions.snapshot import SnapshotError

TRAINING_COMMANDS = {"train": "model.train", "export": "model.export", "evaluate": "model.evaluate"}


def _serve(args: argparse.Namespace) -> int:
    from service.server import serve

    overrides = {name: getattr(args, name) for name in vars(args) if name not in ("command", "func")}
    try:
        settings = load_settings(**overrides)
    except SettingsError as exc:
        print(f"cellstream serve: invalid settings: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(settings))
    except ModelLoadError as exc:
        print(f"cellstream serve: cannot serve the models: {exc}", file=sys.stderr)
        return 2
    except (SnapshotError, SecurityConfigError) as exc:
        print(f"cellstream serve: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"cellstream serve: {exc}", file=sys.stderr)
        return 2
    return 0


def _chat(args: argparse.Namespace) -> int:
    from service.client import chat, tls_credentials

    if (args.cert is None) != (args.key is None):
        print("cellstream chat: --cert and --key go together (mutual TLS)", file=sys.stderr)
        return 2
    try:
        token = args.token_file.read_text().strip() if args.token_file else None
        tls = args.tls or args.ca is not None or args.cert is not None
        credentials = tls_credentials(args.ca, args.cert, args.key) if tls else None
    except OSError as exc:
        print(f"cellstream chat: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(chat(args.target, model=args.model, temperature=args.temperature,
                            max_tokens=args.max_tokens, token=token, credentials=credentials))


def _bench(argv: Sequence[str]) -> int:
    # Imported only here: the harness is a separate top-level package with its own flags.
    from bench.cli import main as bench_main

    return bench_main(argv)


def _training(command: str, argv: Sequence[str]) -> int:
    import importlib

    try:
        module = importlib.import_module(TRAINING_COMMANDS[command])
    except ModuleNotFoundError as exc:
        print(f"cellstream {command}: needs the training extra ({exc.name} is missing): "
              "pip install 'cellstream[train]'", file=sys.stderr)
        return 2
    return module.main(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cellstream", description="Stateful LSTM inference over gRPC.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gRPC server",
                                description="Run the gRPC server. Every option can also be set by its "
                                            "CELLSTREAM_* environment variable; flags win.")
    add_settings_arguments(serve)
    serve.set_defaults(func=_serve)
    chat = commands.add_parser("chat", help="interactive chat with a running server")
    chat.add_argument("--target", default="127.0.0.1:50051", help="server address host:port")
    chat.add_argument("--model", default="", help="model name (default: the server's default)")
    chat.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    chat.add_argument("--max-tokens", type=int, default=200)
    chat.add_argument("--token-file", type=Path, help="file holding the bearer token (kept out of `ps`)")
    chat.add_argument("--tls", action="store_true", help="TLS, trusting the system's CA roots")
    chat.add_argument("--ca", type=Path, help="TLS, trusting this PEM CA bundle")
    chat.add_argument("--cert", type=Path, help="client certificate (PEM) for mutual TLS; with --key")
    chat.add_argument("--key", type=Path, help="client private key (PEM) for mutual TLS")
    chat.set_defaults(func=_chat)
    commands.add_parser("bench", help="benchmark a server this command starts itself (see `cellstream bench --help`)",
                        add_help=False)
    for name, module in TRAINING_COMMANDS.items():
        commands.add_parser(name, help=f"see `cellstream {name} --help` ({module}; needs the train extra)",
                            add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TRAINING_COMMANDS:
        return _training(argv[0], argv[1:])
    if argv and argv[0] == "bench":
        return _bench(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
