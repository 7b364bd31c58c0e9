"""Wiring: gRPC server, both APIs' servicers, the HTTP face, health, reflection, metrics, graceful shutdown."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from cellstream.service import auth
from cellstream.service._proto.cellstream.v1 import inference_pb2, inference_pb2_grpc
from cellstream.service._proto.inference import grpc_service_pb2, grpc_service_pb2_grpc
from cellstream.service.admission import AdmissionInterceptor
from cellstream.service.api.decoding import DecodeGuardInterceptor
from cellstream.service.api.http.app import HttpServer, build_app
from cellstream.service.api.http.endpoint import Guards
from cellstream.service.api.kserve import KServeServicer
from cellstream.service.api.native import NativeServicer
from cellstream.service.config import Settings, redacted_url
from cellstream.service.dataplane import DataPlane
from cellstream.service.errors import ModelLoadError
from cellstream.service.metrics import Metrics
from cellstream.service.model_control import check_before_binding, read_versions, startup_names
from cellstream.service.sessions.factory import open_store
from cellstream.service.tracing import start_tracing

if TYPE_CHECKING:
    from cellstream.service.telemetry import Telemetry

log = logging.getLogger(__name__)

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
GRPC_PENDING_REQUESTS = 1_000  # gRPC core's own default soft limit
PENDING_PER_INFLIGHT = 4

SERVICE_NAMES = (
    inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
    grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
)
# RPCs an operator calls now and then: served through the generic handler only. gRPC keeps a pending request
# task per registered method, and its handling of every call waits on them all: registered, these five cost every
# unary Step about 25k instructions (1,105k against 1,080k, `make bench-instructions`), ModelInfer about 30k.
SELDOM_CALLED = frozenset({"LoadModel", "UnloadModel", "RepositoryIndex", "RepositoryModelLoad",
                           "RepositoryModelUnload"})


class _Registration:
    """What the generated add_*Servicer_to_server functions call on a server: every method reaches the servicer
    through the generic handler, and all but the SELDOM_CALLED ones are registered methods too (gRPC's fast path)."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: tuple[grpc.GenericRpcHandler, ...]) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self._server.add_registered_method_handlers(
            service, {name: handler for name, handler in handlers.items() if name not in SELDOM_CALLED})


@dataclass
class RunningServer:
    """A started server and what tests or the CLI need to reach and stop it."""

    server: grpc.aio.Server
    health: health.aio.HealthServicer
    dataplane: DataPlane | None
    metrics: Metrics
    port: int
    metrics_port: int
    settings: Settings
    kserve: KServeServicer
    http: HttpServer | None = None  # None: http_port 0
    admission: AdmissionInterceptor | None = None
    tracing: Telemetry | None = None  # None: tracing off

    @property
    def http_port(self) -> int:
        return 0 if self.http is None else self.http.port

    async def stop(self, grace: float | None = None) -> None:
        """Flip health (and KServe readiness, on both transports) to NOT_SERVING first, let in-flight calls of
        both transports finish within `grace`, then stop."""
        grace = self.settings.shutdown_grace_seconds if grace is None else grace
        self.kserve.drain()
        if self.admission is not None:
            self.admission.drain()
        await self.health.enter_graceful_shutdown()
        await asyncio.gather(self._stop_grpc(grace), *([self.http.stop(grace)] if self.http else []))
        if self.dataplane is not None:
            await self.dataplane.close()
        self.metrics.stop_http()
        if self.tracing is not None:  # the last spans out, off the event loop (it may wait for the collector)
            await asyncio.to_thread(self.tracing.shutdown)

    async def _stop_grpc(self, grace: float) -> None:
        """New API calls are refused (UNAVAILABLE) while those in flight finish, within `grace`; then gRPC stops
        (cancelling what is left, and the infrastructure's calls: health watches, reflection)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        if self.admission is not None:
            await self.admission.drained(grace)
        await self.server.stop(max(0.0, deadline - loop.time()))


async def _set_health(servicer: health.aio.HealthServicer, status: int) -> None:
    for name in ("", *SERVICE_NAMES):
        await servicer.set(name, status)


def _reflection_pool(*files: FileDescriptor) -> descriptor_pool.DescriptorPool:
    """One pool with the served files and their imports: the KServe stubs live outside protobuf's
    default pool (see service/protogen.py), which reflection would otherwise read."""
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: FileDescriptor) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:
            add(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        pool.Add(proto)
        added.add(file.name)

    for file in files:
        add(file)
    return pool


def grpc_options(settings: Settings) -> list[tuple[str, int]]:
    """The gRPC server's channel arguments (the benchmark's empty server uses them too, to compare alike)."""
    pending_limit = max(GRPC_PENDING_REQUESTS, PENDING_PER_INFLIGHT * settings.max_inflight_requests)
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
        # gRPC core cancels calls at random once more than 1,000 wait for the application to pick them up
        # (random early detection): clients saw bare CANCELLED at 1,024 concurrent unary calls. The admission
        # bound is the overload control, refusing with a message that says so, so core's bound sits past it.
        ("grpc.server.max_pending_requests", pending_limit),
        ("grpc.server.max_pending_requests_hard_limit", pending_limit),
    ]


async def start_server(
    settings: Settings, metrics: Metrics | None = None, *, clock: Callable[[], float] = time.monotonic
) -> RunningServer:
    """Bind and start reporting NOT_SERVING, load the models, then report SERVING. `clock`: the memory
    session store's clock for idle TTLs (tests pass one they advance by hand)."""
    # The model repository and default first: a server that cannot serve says so before it binds any port.
    check_before_binding(settings)
    metrics = metrics or Metrics()
    options = grpc_options(settings)
    tracing = start_tracing()
    # Tracing outermost, so refusals are traced too; then authentication: a call refused for its credentials
    # takes no in-flight slot.
    tokens = auth.token_file(settings)
    admission = AdmissionInterceptor(settings.max_inflight_requests, metrics)
    interceptors = [*_tracing_interceptors(tracing),
                    *auth.interceptors(tokens, metrics),
                    admission,
                    DecodeGuardInterceptor(metrics)]
    server = grpc.aio.server(options=options, interceptors=interceptors)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    pool = _reflection_pool(inference_pb2.DESCRIPTOR, grpc_service_pb2.DESCRIPTOR, health_pb2.DESCRIPTOR,
                            reflection_pb2.DESCRIPTOR)
    reflection.enable_server_reflection((*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server,
                                        pool=pool)
    await _set_health(health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING)
    native = NativeServicer(metrics)
    inference_pb2_grpc.add_InferenceServicer_to_server(native, _Registration(server))
    kserve = KServeServicer(metrics)
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(kserve, _Registration(server))
    port = auth.bind(server, settings)
    if port == 0:
        raise OSError(f"cannot bind gRPC port {settings.host}:{settings.port}")
    http = None
    if settings.http_port:
        http = HttpServer(build_app(Guards(settings, metrics, tokens, admission, tracing), kserve, native), settings)
    metrics_port = metrics.serve_http(settings.metrics_host, settings.metrics_port)
    await server.start()
    running = RunningServer(server, health_servicer, None, metrics, port, metrics_port, settings, kserve, http,
                            admission, tracing)
    if http is not None:
        await http.start()  # health and readiness answer while the models load, as on gRPC
    try:
        running.dataplane = await _load(settings, metrics, clock, tracing)
    except BaseException:
        await server.stop(0)
        if http is not None:
            await http.stop(0)
        metrics.stop_http()
        if tracing is not None:
            tracing.shutdown()
        raise
    native.attach(running.dataplane)
    kserve.attach(running.dataplane)

    async def store_changed(up: bool) -> None:
        metrics.store_up.set(up)
        kserve.store_reachable(up)
        await _set_health(health_servicer, SERVING if up else NOT_SERVING)

    await running.dataplane.watch_store(store_changed)
    log.info("serving %s on %s:%d (HTTP on :%s, metrics on :%d, sessions in %s, model control %s)",
             sorted(running.dataplane.registry.versions), settings.host, port, running.http_port or "off",
             metrics_port, redacted_url(settings.state_store), settings.model_control)
    return running


def _tracing_interceptors(tracing: Telemetry | None) -> list[grpc.aio.ServerInterceptor]:
    if tracing is None:
        return []
    from cellstream.service.api.traced import TracingInterceptor  # imports OpenTelemetry: only when tracing

    return [TracingInterceptor(tracing)]


async def _load(settings: Settings, metrics: Metrics, clock: Callable[[], float],
                tracing: Telemetry | None = None) -> DataPlane:
    names = startup_names(settings)
    loaded = await asyncio.get_running_loop().run_in_executor(
        None, lambda: read_versions(settings.model_dir, names, settings.version_policy, settings.ort_intra_op_threads))
    if not loaded and settings.model_control == "none":
        raise ModelLoadError(f"no .onnx models in {settings.model_dir} (NAME.onnx, or NAME/<version>/model.onnx)")
    specs = {engine.spec.key: engine.spec for engine, _ in loaded}
    default = settings.default_model
    if default and loaded and default not in {spec.name for spec in specs.values()}:
        raise ModelLoadError(f"default model {default!r} is not among the loaded models "
                             f"{sorted({spec.name for spec in specs.values()})}")
    store = await open_store(settings, metrics, specs, clock=clock, tracing=tracing)
    dataplane = DataPlane(settings, loaded, store, metrics, tracing)
    await dataplane.start()
    return dataplane


GC_GEN0_THRESHOLD = 20_000


def tune_gc() -> None:
    """A step allocates and frees a dozen short-lived objects, nearly none of them in reference cycles, so
    CPython's default young-generation threshold (700) ran the collector ~1,500 times per 400k multiplexed
    steps (1.4 us per step, measured) to find almost nothing; what start-up loaded never needs a scan again."""
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])


def run_event_loop(main: Coroutine[Any, Any, None]) -> None:
    """uvloop where it exists (not on Windows): the server's steps/s at load depend on the loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    running = await start_server(settings)
    tune_gc()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("signal received: draining for up to %.1fs", settings.shutdown_grace_seconds)
    await running.stop()
    log.info("stopped")
