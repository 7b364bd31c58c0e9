"""`cellstream serve|chat|health|check-model|bench|train|export|evaluate|gates`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc

from cellstream.service import logs
from cellstream.service.auth import SecurityConfigError
from cellstream.service.config import Settings, SettingsError, add_settings_arguments, load_settings
from cellstream.service.errors import ModelLoadError, TracingError
from cellstream.service.sessions.snapshot import SnapshotError

TRAINING_COMMANDS = {"train": "cellstream.model.train", "export": "cellstream.model.export",
                     "evaluate": "cellstream.model.evaluate", "gates": "cellstream.model.glassbox"}


def _serve(args: argparse.Namespace) -> int:
    from cellstream.service.server import run_event_loop, serve

    overrides = {name: getattr(args, name) for name in vars(args) if name not in ("command", "func")}
    try:
        settings = load_settings(**overrides)
    except SettingsError as exc:
        print(f"cellstream serve: invalid settings: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format)
    try:
        run_event_loop(serve(settings))
    except ModelLoadError as exc:
        print(f"cellstream serve: cannot serve the models: {exc}", file=sys.stderr)
        return 2
    except (SnapshotError, SecurityConfigError, TracingError) as exc:
        print(f"cellstream serve: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"cellstream serve: {exc}", file=sys.stderr)
        return 2
    return 0


def _connection(args: argparse.Namespace) -> tuple[str | None, grpc.ChannelCredentials | None] | None:
    """(bearer token, TLS credentials) from the connection flags, or None once the reason is printed."""
    from cellstream.connection import tls_credentials

    if (args.cert is None) != (args.key is None):
        print(f"cellstream {args.command}: --cert and --key go together (mutual TLS)", file=sys.stderr)
        return None
    try:
        token = args.token_file.read_text().strip() if args.token_file else None
        tls = args.tls or args.ca is not None or args.cert is not None
        return token, (tls_credentials(args.ca, args.cert, args.key) if tls else None)
    except OSError as exc:
        print(f"cellstream {args.command}: {exc}", file=sys.stderr)
        return None


def _chat(args: argparse.Namespace) -> int:
    from cellstream.service.chat import chat

    connection = _connection(args)  # checks the flags and files, and reads the token
    if connection is None:
        return 2
    token, _ = connection
    return chat(args.target, model=args.model, temperature=args.temperature, max_tokens=args.max_tokens,
                token=token, tls=args.tls, ca=args.ca, cert=args.cert, key=args.key)


def _health(args: argparse.Namespace) -> int:
    from cellstream.service.health_check import SERVING, check, default_target

    connection = _connection(args)
    if connection is None:
        return 2
    token, credentials = connection
    outcome = check(args.target or default_target(), service=args.service, timeout=args.timeout,
                    credentials=credentials, token=token, server_name=args.server_name)
    print(f"cellstream health: {outcome.message}", file=sys.stdout if outcome.exit_status == SERVING else sys.stderr)
    return outcome.exit_status


def _bench(argv: Sequence[str]) -> int:
    # Imported only here: the harness (cellstream.bench) has its own flags, and no other command needs it.
    from cellstream.bench.cli import main as bench_main

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


def _add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--token-file", type=Path, help="file holding the bearer token (kept out of `ps`)")
    parser.add_argument("--tls", action="store_true", help="TLS, trusting the system's CA roots")
    parser.add_argument("--ca", type=Path, help="TLS, trusting this PEM CA bundle")
    parser.add_argument("--cert", type=Path, help="client certificate (PEM) for mutual TLS; with --key")
    parser.add_argument("--key", type=Path, help="client private key (PEM) for mutual TLS")


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
    _add_connection_arguments(chat)
    chat.set_defaults(func=_chat)
    health = commands.add_parser(
        "health", help="ask a server's grpc.health.v1 service once; exit 0 SERVING, 1 not SERVING, 3 no answer",
        description="Exit status: 0 SERVING, 1 answered but not SERVING (or unknown service), 3 no answer "
                    "(unreachable, timeout, TLS refused), 2 unusable flags or files.")
    health.add_argument("--target", help="server address host:port [default: 127.0.0.1 on $CELLSTREAM_PORT or "
                                         f"{Settings.model_fields['port'].default}]")
    health.add_argument("--service", default="", help="service to ask about (default: the whole server)")
    health.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    health.add_argument("--server-name", help="name the server's TLS certificate must carry, when it is not "
                                              "the target's host (e.g. a probe dialling 127.0.0.1)")
    _add_connection_arguments(health)
    health.set_defaults(func=_health)
    commands.add_parser("check-model", help="can the server serve this .onnx file? its spec, or what to change "
                        "(see `cellstream check-model --help`)", add_help=False)
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
    if argv and argv[0] == "check-model":
        from cellstream.service.check_model import main as check_model

        return check_model(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
