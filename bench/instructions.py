"""Instructions per call and per step, counted by valgrind's callgrind (`make bench-instructions`).

A count of instructions is the same run after run, whatever else the machine does, where wall-clock A/B
runs on this VM drift 10-25% between rounds: a change worth 1-2% of a call shows here and nowhere else.
It is not time (a cache miss costs many instructions' worth), so it tells which code does less work, not
how much faster a server is; `make bench` says that.

- server: `cellstream serve` (and the empty echo server) under callgrind, called one call at a time from
  this process with pre-serialised requests: unary `Step`, KServe `ModelInfer` built as tritonclient
  builds it, and the echo's unary call. Instructions per call, onnxruntime at batch 1 included.
- in-process: the step paths without gRPC, `native_codec.step` and `KServeServicer.infer` (its reply
  serialised), with `--sessions` sessions stepping back to back so that batches form. Instructions per
  step; batch sizes depend on timing, which valgrind slows down.

`--tracing`: the server figures with OpenTelemetry tracing on, as OTEL_EXPORTER_OTLP_ENDPOINT alone turns it on
(OTLP over HTTP, the default sampler: every call traced), exporting to a receiver in this process
(bench/otlp.py); the export thread's work is counted too. Other OTEL_* variables set for this command reach the
server (e.g. OTEL_TRACES_SAMPLER, OTEL_EXPORTER_OTLP_PROTOCOL=grpc). Needs the tracing extra.

`python -m cellstream.bench.instructions --help` for the counts. Needs valgrind (Debian's package).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import grpc
import numpy as np

from cellstream.bench.echo import MODEL_INFER
from cellstream.bench.echo import UNARY as ECHO_UNARY
from cellstream.bench.errors import BenchError
from cellstream.bench.options import KSERVE_OUTPUT, shipped_model_dir
from cellstream.bench.server import EchoProcess, ServedProcess, ServerProcess
from cellstream.bench.wire import OPEN_REQUEST, OPEN_SESSION, STEP, step_request
from cellstream.service._proto.cellstream.v1 import inference_pb2 as pb

MODEL = "cellstream-chat"
WARMUP_CALLS = 50
CALL_TIMEOUT_SECONDS = 60.0
SEQUENCE_ID = 7


def callgrind(out_file: Path) -> list[str]:
    """The valgrind words before a command: counting starts off, and is switched on around what is counted."""
    return ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--dump-instr=no",
            f"--callgrind-out-file={out_file}"]


def control(*words: str) -> None:
    subprocess.run(["callgrind_control", *words], check=True, capture_output=True, timeout=60)


def counted_instructions(out_file: Path) -> int:
    """What the first dump (the counted stretch, from switching counting on) holds."""
    dump = Path(f"{out_file}.1")
    for line in dump.read_text().splitlines():
        if line.startswith("summary:"):
            return int(line.split()[1])
    raise BenchError(f"{dump} has no summary line")


def kserve_request(start: bool) -> bytes:
    """A 1-token ModelInfer request of sequence SEQUENCE_ID, as tritonclient builds it."""
    from tritonclient.grpc import InferInput, InferRequestedOutput  # the bench extra
    from tritonclient.grpc._utils import _get_inference_request

    tokens = InferInput("tokens", [1, 1], "INT64")
    tokens.set_data_from_numpy(np.ones((1, 1), np.int64))
    request = _get_inference_request(MODEL, [tokens], "", "", [InferRequestedOutput(KSERVE_OUTPUT)], SEQUENCE_ID,
                                     start, False, 0, None, None)
    return request.SerializeToString()


def per_call(server: ServedProcess, out_file: Path, method: str, request: bytes, calls: int) -> float:
    """Instructions per call of `method` with `request`, one call at a time, after a warm-up."""
    with grpc.insecure_channel(server.target) as channel:
        call = channel.unary_unary(method)
        for _ in range(WARMUP_CALLS):
            call(request, timeout=CALL_TIMEOUT_SECONDS)
        control("-i", "on", str(server.pid))
        for _ in range(calls):
            call(request, timeout=CALL_TIMEOUT_SECONDS)
        control("-d", str(server.pid))
    return counted_instructions(out_file) / calls


def measure_servers(model_dir: Path, calls: int, work: Path) -> dict[str, float]:
    results = {}
    out_file = work / "echo.callgrind"
    echo = EchoProcess(work / "echo.log", KSERVE_OUTPUT, 1)
    echo.argv = [*callgrind(out_file), *echo.argv]
    with echo:  # a session id as long as a real one: the same bytes as the Step below
        results["echo unary call"] = per_call(echo, out_file, ECHO_UNARY, step_request("0" * 32), calls)
    for name, method in (("unary Step", STEP), ("KServe ModelInfer", MODEL_INFER)):
        out_file = work / f"{method.rsplit('/', 1)[1]}.callgrind"
        server = ServerProcess(model_dir, MODEL, {"ort_intra_op_threads": 1}, (), work / "serve.log")
        server.argv = [*callgrind(out_file), *server.argv]
        with server:
            if method == STEP:
                with grpc.insecure_channel(server.target) as channel:
                    opened = channel.unary_unary(OPEN_SESSION)(OPEN_REQUEST, timeout=CALL_TIMEOUT_SECONDS)
                request = step_request(pb.SessionInfo.FromString(opened).session_id)
            else:
                with grpc.insecure_channel(server.target) as channel:
                    channel.unary_unary(MODEL_INFER)(kserve_request(start=True), timeout=CALL_TIMEOUT_SECONDS)
                request = kserve_request(start=False)
            results[name] = per_call(server, out_file, method, request, calls)
    return results


def measure_in_process(model_dir: Path, kind: str, sessions: int, steps: int, work: Path) -> float:
    out_file = work / f"{kind}.callgrind"
    argv = [*callgrind(out_file), sys.executable, "-m", "cellstream.bench.instructions", "--worker", kind,
            "--model-dir", str(model_dir), "--sessions", str(sessions), "--steps", str(steps)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise BenchError(f"the in-process {kind} run failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return counted_instructions(out_file) / steps


async def _in_process(kind: str, model_dir: Path, sessions: int, steps: int) -> None:
    """The worker (run under callgrind): `sessions` sessions step back to back; counting is on for `steps`."""
    from cellstream.service.api.kserve import KServeServicer
    from cellstream.service.api.native_codec import step
    from cellstream.service.config import Settings
    from cellstream.service.metrics import Metrics
    from cellstream.service.server import _load, tune_gc

    metrics = Metrics()
    settings = Settings(model_dir=model_dir, default_model=MODEL, ort_intra_op_threads=1)
    dataplane = await _load(settings, metrics, time.monotonic)
    tune_gc()
    one: Callable[[int], object]
    if kind == "kserve":
        from cellstream.service._proto.inference import grpc_service_pb2 as kserve_pb

        kserve = KServeServicer(metrics)
        kserve.attach(dataplane)
        requests = []
        for k in range(sessions):
            started = kserve_pb.ModelInferRequest.FromString(kserve_request(start=True))
            started.parameters["sequence_id"].int64_param = SEQUENCE_ID + k
            await kserve.infer(started, None)
            request = kserve_pb.ModelInferRequest.FromString(kserve_request(start=False))
            request.parameters["sequence_id"].int64_param = SEQUENCE_ID + k
            requests.append(request)

        async def one(k: int) -> None:
            (await kserve.infer(requests[k], CALL_TIMEOUT_SECONDS, reply_limited=True)).SerializeToString()
    else:
        ids = [(await dataplane.open_session("")).session_id for _ in range(sessions)]
        request = pb.StepRequest.FromString(step_request())

        async def one(k: int) -> None:
            (await step(dataplane, request, ids[k], CALL_TIMEOUT_SECONDS, reply_limited=True)).SerializeToString()

    warmup = WARMUP_CALLS * sessions
    done = 0

    async def drive(k: int) -> None:
        nonlocal done
        while done < warmup + steps:
            if done == warmup:
                control("-i", "on", str(os.getpid()))
            done += 1
            await one(k)

    await asyncio.gather(*(drive(k) for k in range(sessions)))
    # Steps in flight when counting began finished inside it, as those still unstarted at its end would have:
    # a steady state of `steps` steps.
    control("-d", str(os.getpid()))
    await dataplane.close()


@contextlib.contextmanager
def traced_servers() -> Iterator[None]:
    """Servers started meanwhile (they inherit this environment) trace every call to a receiver of this process."""
    from cellstream.bench.otlp import TraceSink  # the tracing extra

    with TraceSink() as sink:
        grpc_protocol = os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") == "grpc"
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = sink.grpc_endpoint if grpc_protocol else sink.http_endpoint
        try:
            yield
        finally:
            del os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"]
        print(f"tracing: the receiver got {len(sink.spans):,} spans in {sink.requests} exports", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cellstream.bench.instructions", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=shipped_model_dir(), help="directory of the chat model")
    parser.add_argument("--calls", type=int, default=300, help="counted calls per server figure [300]")
    parser.add_argument("--sessions", type=int, default=64, help="sessions of the in-process figures [64]")
    parser.add_argument("--steps", type=int, default=3200, help="counted steps per in-process figure [3200]")
    parser.add_argument("--tracing", action="store_true", help="the server figures only, with tracing on (OTLP to a "
                        "receiver in this process, the default sampler); needs the tracing extra")
    parser.add_argument("--worker", choices=("native", "kserve"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        import uvloop

        uvloop.run(_in_process(args.worker, args.model_dir, args.sessions, args.steps))
        return 0
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("needs valgrind (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="cellstream-instructions-") as work:
        if args.tracing:
            with traced_servers():
                figures = measure_servers(args.model_dir, args.calls, Path(work))
            return report(figures)
        figures = measure_servers(args.model_dir, args.calls, Path(work))
        for kind, name in (("native", "in-process step (native_codec.step)"),
                           ("kserve", "in-process step (KServeServicer.infer)")):
            figures[f"{name}, {args.sessions} sessions"] = measure_in_process(args.model_dir, kind, args.sessions,
                                                                            args.steps, Path(work))
    return report(figures)


def report(figures: dict[str, float]) -> int:
    width = max(map(len, figures))
    print(f"{'figure':<{width}}  instructions")
    for name, count in figures.items():
        print(f"{name:<{width}}  {count:>12,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
