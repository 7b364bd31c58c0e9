"""One benchmark run: every figure in order, each server in its own process, results in one dict."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from cellstream.bench.conversation import chat_turns, history_bytes, measure_conversation
from cellstream.bench.efficiency import efficiency
from cellstream.bench.errors import BenchError
from cellstream.bench.floor import measure_floor
from cellstream.bench.generation import measure_generate
from cellstream.bench.limit import measure_limit
from cellstream.bench.machine import machine_info, model_info
from cellstream.bench.memory import WARMUP_SESSIONS, measure_idle_memory, startup_summary
from cellstream.bench.options import KSERVE_OUTPUT, NATIVE_APIS, Options
from cellstream.bench.pool import WorkerPool
from cellstream.bench.progress import restart, say
from cellstream.bench.server import EchoProcess, ServerProcess
from cellstream.bench.service_load import measure_service
from cellstream.bench.targets import BATCHING, UNBATCHED
from cellstream.service.config import Settings
from cellstream.service.engine import Engine

SCHEMA = 1
DEFAULT_MAX_BATCH_SIZE = Settings.model_fields["max_batch_size"].default
DEFAULT_MAX_TOKENS = Settings.model_fields["max_tokens_per_request"].default


class Servers:
    """Starts the run's servers with the harness's settings, and keeps their start-up times."""

    def __init__(self, options: Options, log_dir: Path) -> None:
        self.options = options
        self.log_dir = log_dir
        self.startup_seconds: list[float] = []

    @contextlib.contextmanager
    def start(self, name: str, **settings: object) -> Iterator[ServerProcess]:
        say(f"starting server {name!r}")
        settings = {"ort_intra_op_threads": self.options.ort_threads, **settings}
        with ServerProcess(self.options.model_dir, self.options.model, settings, self.options.serve_args,
                           self.log_dir / f"{name}.log") as server:
            self.startup_seconds.append(server.startup_seconds)
            say(f"server {name!r} SERVING after {server.startup_seconds:.2f}s")
            yield server


def _limit(options: Options, results: dict) -> None:
    engine = Engine(options.model_dir / f"{options.model}.onnx", intra_op_threads=options.ort_threads)
    if not engine.spec.accepts_text:
        raise BenchError(f"model {options.model!r} takes no text (no byte tokenizer); "
                         "the chat figures need a byte-level language model")
    results["model"] = model_info(engine)
    say("1. limit: in-process onnxruntime")
    results["limit"] = measure_limit(engine, options.limit_batches, options.prefill_tokens, options.limit_seconds,
                                     options.ort_threads)


def _floor(pool: WorkerPool, servers: Servers, options: Options, results: dict) -> None:
    say("0. floor: an empty gRPC server")
    with EchoProcess(servers.log_dir / "echo.log", KSERVE_OUTPUT, results["model"]["vocab_size"]) as server:
        results["floor"] = measure_floor(pool, server, options)


def _batching(pool: WorkerPool, servers: Servers, options: Options, results: dict) -> None:
    turns = chat_turns(options.turns)
    # The stateless client sends the whole conversation in one request: the server must accept it.
    with servers.start(BATCHING, max_batch_size=DEFAULT_MAX_BATCH_SIZE,
                       max_tokens_per_request=max(DEFAULT_MAX_TOKENS, history_bytes(turns))) as server:
        say("2. service, batching")
        runs = measure_service(pool, server, options, BATCHING)
        results["service"] = {BATCHING: {"max_batch_size": DEFAULT_MAX_BATCH_SIZE, "runs": runs}}
        say("4. stateful vs stateless conversation")
        results["conversation"] = measure_conversation(pool, server, turns, options.conversations)
        say("5. generate")
        results["generate"] = measure_generate(pool, server, options)


def _unbatched(pool: WorkerPool, servers: Servers, options: Options, results: dict) -> None:
    # The baseline of the batching gain: the native APIs say it; the KServe faces would only lengthen the run.
    native = dataclasses.replace(options, apis=tuple(api for api in options.apis if api in NATIVE_APIS))
    with servers.start(UNBATCHED, max_batch_size=1) as server:
        say("2. service, max_batch_size=1")
        results["service"][UNBATCHED] = {"max_batch_size": 1, "runs": measure_service(pool, server, native,
                                                                                     UNBATCHED)}


def _memory(pool: WorkerPool, servers: Servers, options: Options, results: dict) -> None:
    # Refusing past the count (instead of evicting) makes a miscount an error, not a smaller number.
    capacity = options.idle_sessions + WARMUP_SESSIONS * pool.size
    with servers.start("memory", max_sessions=capacity, when_full="reject") as server:
        say(f"6. memory: {options.idle_sessions:,} idle sessions")
        model = results["model"]
        results["memory"] = measure_idle_memory(pool, server, options.idle_sessions, model["num_layers"],
                                                model["hidden_size"])


def run(options: Options) -> dict[str, object]:
    """Measure everything; the dict is what results.json holds (the caller adds targets and plots)."""
    restart()
    results: dict = {"schema": SCHEMA, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                     "options": options.to_json(), "machine": machine_info()}
    # Before any other process exists: the limit must have the machine to itself.
    _limit(options, results)
    with WorkerPool(options.clients) as pool, tempfile.TemporaryDirectory(prefix="cellstream-bench-") as logs:
        servers = Servers(options, Path(logs))
        _floor(pool, servers, options, results)
        _batching(pool, servers, options, results)
        _unbatched(pool, servers, options, results)
        _memory(pool, servers, options, results)
    results["efficiency"] = efficiency(results["service"], results["limit"])
    results["startup"] = startup_summary(servers.startup_seconds)
    return results


def write_json(results: dict[str, object], out_dir: Path) -> Path:
    path = out_dir / "results.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path
