"""What one benchmark run measures and for how long: the full run, and the quick run for smoke tests."""

from __future__ import annotations

import dataclasses
import importlib.resources
from dataclasses import dataclass, field
from pathlib import Path

API_STREAM, API_UNARY = "stream", "unary"
# Many sessions' steps per message: StreamMany streams, StepMany calls.
API_STREAM_MANY, API_STEP_MANY = "stream-many", "step-many"
MULTIPLEXED = (API_STREAM_MANY, API_STEP_MANY)
# KServe sequences driven by tritonclient: unary ModelInfer, or a ModelStreamInfer stream per sequence.
API_KSERVE_UNARY, API_KSERVE_STREAM = "kserve-unary", "kserve-stream"
KSERVE = (API_KSERVE_UNARY, API_KSERVE_STREAM)
# KServe v2 REST on the HTTP port, driven by tritonclient.http: unary infer requests.
API_KSERVE_HTTP = "kserve-http"
NATIVE_APIS = (API_STREAM, API_UNARY, *MULTIPLEXED)
APIS = (*NATIVE_APIS, *KSERVE, API_KSERVE_HTTP)
TRANSPORT = {API_STREAM: API_STREAM, API_UNARY: API_UNARY, API_KSERVE_STREAM: API_STREAM, API_KSERVE_UNARY: API_UNARY}
"""The empty server's run that bounds each per-session api: its streams or its unary calls."""
KSERVE_OUTPUT = "logits"  # what every KServe request asks for: the measured models are byte-level LMs


def shipped_model_dir() -> Path:
    """model/artifacts of this distribution (a checkout or an installed wheel)."""
    return Path(str(importlib.resources.files("cellstream.model") / "artifacts"))


def _help(text: str) -> dict[str, str]:
    """Field metadata of an option that is also a `cellstream bench --flag`, with its help."""
    return {"help": text}


@dataclass(frozen=True)
class Options:
    """One run's settings; fields with a help text are also `--flags` of `cellstream bench`."""

    out_dir: Path = field(default=Path("docs/benchmarks"), metadata=_help("directory for results.json and the plots"))
    model_dir: Path = field(default_factory=shipped_model_dir, metadata=_help("directory of the servers' models"))
    model: str = field(default="cellstream-chat", metadata=_help("model measured (a byte-level LM in --model-dir)"))
    clients: int = field(default=2, metadata=_help("client processes generating load (2 cores: keep it small)"))
    ort_threads: int = field(default=1, metadata=_help("onnxruntime intra-op threads, in-process and in servers"))
    levels: tuple[int, ...] = field(default=(1, 8, 64, 256, 1024),
                                    metadata=_help("concurrent sessions of the service runs"))
    apis: tuple[str, ...] = field(default=APIS, metadata=_help(
        "how steps are sent: stream (StreamSteps), unary (Step), stream-many (StreamMany), step-many (StepMany), "
        "kserve-unary (ModelInfer), kserve-stream (ModelStreamInfer), "
        "kserve-http (KServe v2 REST, HTTP)"))
    many_levels: tuple[int, ...] = field(default=(256, 1024),
                                         metadata=_help("concurrent sessions of the stream-many and step-many runs"))
    many_calls: tuple[int, ...] = field(default=(1, 4), metadata=_help(
        "StreamMany streams (StepMany calls in flight) those sessions are spread over, one run each"))
    kserve_levels: tuple[int, ...] = field(default=(1, 64, 256),
                                           metadata=_help("concurrent sequences of the kserve runs (tritonclient)"))
    http_levels: tuple[int, ...] = field(default=(1, 64), metadata=_help(
        "concurrent sequences of the kserve-http runs (tritonclient.http)"))
    warmup_seconds: float = field(default=1.0, metadata=_help("load before each measured window"))
    duration_seconds: float = field(default=5.0, metadata=_help("measured window of each service and generate run"))
    limit_batches: tuple[int, ...] = field(default=(1, 2, 4, 8, 16, 32, 64, 128, 256),
                                           metadata=_help("batch sizes of the in-process limit"))
    limit_seconds: float = field(default=1.0, metadata=_help("time per batch size of the in-process limit"))
    prefill_tokens: int = field(default=64, metadata=_help("T of the in-process prefill measurement"))
    turns: int = field(default=50, metadata=_help("turns of the stateful-vs-stateless conversation"))
    conversations: int = field(default=3, metadata=_help("repetitions of that conversation (medians per turn)"))
    generate_levels: tuple[int, ...] = field(default=(1, 64),
                                             metadata=_help("concurrent chat replies of the Generate runs"))
    generate_tokens: int = field(default=64, metadata=_help("max_tokens of each reply"))
    idle_sessions: int = field(default=100_000, metadata=_help("idle sessions opened for the memory figure"))
    plots: bool = True
    """Write PNG plots (needs matplotlib: the bench extra)."""
    serve_args: tuple[str, ...] = ()
    """Extra `cellstream serve` arguments for every server started (they win over the harness's own)."""
    quick: bool = False
    """Tiny durations and counts: checks the harness runs, measures nothing worth publishing."""

    def to_json(self) -> dict[str, object]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}


def flag_fields() -> list[dataclasses.Field]:
    """The fields set by a `--name` flag of their own."""
    return [f for f in dataclasses.fields(Options) if "help" in f.metadata]


# A few seconds of everything: every figure is produced, with too few samples to mean much.
QUICK = {
    "levels": (1, 256),
    "many_levels": (256,),
    "kserve_levels": (64,),
    "warmup_seconds": 0.2,
    "duration_seconds": 0.4,
    "limit_batches": (1, 16, 256),
    "limit_seconds": 0.05,
    "turns": 20,
    "conversations": 1,
    "generate_tokens": 16,
    "idle_sessions": 2000,
    "quick": True,
}
