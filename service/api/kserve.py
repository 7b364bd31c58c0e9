"""inference.GRPCInferenceService (Open Inference Protocol, KServe v2) servicer.

Thin like the native servicer: kserve_codec turns messages into validated arrays, and the shared
core does the work — DataPlane for stateless calls and the model repository, sequences.py for calls with
a `sequence_id` — so both APIs share one batcher, one session store and one set of metrics.

Versions: a request's `model_version` ("" for the model's default version, the latest loaded) names the
version a stateless call or a sequence's START runs on; a sequence's later requests run on the version
it started on. ModelMetadata lists the READY versions.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable
from importlib import metadata

import grpc
import numpy as np

from cellstream.service._proto.inference import grpc_service_pb2 as pb
from cellstream.service._proto.inference import grpc_service_pb2_grpc as pb_grpc
from cellstream.service.api.handling import INTERNAL_MESSAGE, DataPlaneServicer, rpc
from cellstream.service.api.kserve_codec import (
    Options,
    read_inputs,
    read_options,
    requested_outputs,
    signature,
    write_outputs,
)
from cellstream.service.batcher import StepResult
from cellstream.service.dataplane import FLOAT_BYTES
from cellstream.service.engine import ModelSpec
from cellstream.service.errors import CellstreamError, DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound
from cellstream.service.metrics import Metrics
from cellstream.service.model_control import IndexEntry
from cellstream.service.registry import READY
from cellstream.service.sequences import find_sequence, sequence_key, step_sequence
from cellstream.service.versions import VERSION_PATTERN

log = logging.getLogger(__name__)

SERVER_NAME = "cellstream"
EXTENSIONS = ("sequence", "sequence(string_id)", "parameters", "model_repository")
PLATFORM = "onnxruntime_onnx"
# Load parameters of Triton's that would load something else than model_dir holds.
OVERRIDES_REFUSED = ("config and file: parameters (a model sent with the request) are not supported: cellstream loads "
                     "a model from model_dir (NAME.onnx or NAME/<version>/model.onnx); put the files there, then load")


def _installed_version() -> str:
    try:
        return metadata.version("cellstream")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


SERVER_VERSION = _installed_version()


class KServeServicer(DataPlaneServicer, pb_grpc.GRPCInferenceServiceServicer):
    """The Open Inference Protocol RPCs; registered before the models load, `attach`ed after."""

    def __init__(self, metrics: Metrics) -> None:
        super().__init__(metrics)
        self._draining = False
        self._store_up = True

    def store_reachable(self, up: bool) -> None:
        """Follow the session store's probe: sequences need it, so the server is not ready without it."""
        self._store_up = up

    def drain(self) -> None:
        """Report not ready from now on: the server is shutting down."""
        self._draining = True

    @property
    def ready(self) -> bool:
        return self._dataplane is not None and not self._draining and self._store_up

    def model_spec(self, name: str, version: str) -> ModelSpec:
        """The spec of the READY version a request runs on ("" = default model, its default version); NotFound for a
        model or version not loaded, FailedPrecondition for a draining one."""
        return self.dataplane.spec(name, self.version_number(name, version) if version else 0)

    def version_number(self, name: str, version: str) -> int:
        """A request's model_version as a number (0 for none); NotFound when it is no version number."""
        if not version:
            return 0
        if not VERSION_PATTERN.fullmatch(version):
            raise NotFound(f"model {name or self.dataplane.registry.default!r} has no version {version[:40]!r}: "
                           "versions are positive integers (or leave the version empty for the latest)")
        return int(version)

    def model_metadata(self, name: str, version: str) -> tuple[ModelSpec, list[str]]:
        """The spec of a loaded version (a draining one when named) and the model's READY versions."""
        spec = self.dataplane.loaded_spec(name, self.version_number(name, version))
        return spec, [str(v.version) for v in self.dataplane.registry.of(spec.name) if v.state == READY]

    def model_ready(self, name: str, version: str) -> bool:
        """Whether the server is ready and the model version takes requests (NotFound for an unknown model)."""
        if not self.ready:
            return False
        try:
            self.model_spec(name, version)
        except FailedPrecondition:  # draining
            return False
        return True

    # --- health and metadata ------------------------------------------------------------------

    @rpc
    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @rpc
    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
                          ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.ready)

    @rpc
    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ModelReadyResponse:
        try:
            return pb.ModelReadyResponse(ready=self.model_ready(request.name, request.version))
        except NotFound:
            return pb.ModelReadyResponse(ready=False)

    @rpc
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
                             ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS)

    @rpc
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
                            ) -> pb.ModelMetadataResponse:
        spec, versions = self.model_metadata(request.name, request.version)
        sig = signature(spec)
        return pb.ModelMetadataResponse(
            name=spec.name, versions=versions, platform=PLATFORM,
            inputs=[t.metadata() for t in sig.inputs.values()], outputs=[t.metadata() for t in sig.outputs.values()],
        )

    # --- inference ----------------------------------------------------------------------------

    async def infer(self, request: pb.ModelInferRequest, remaining: float | None, reply_limited: bool = False,
                    options: Options | None = None) -> pb.ModelInferResponse:
        """Validate everything, then run: a refused request changes no state. Shared by the gRPC and HTTP faces;
        `remaining`: seconds until the call's deadline, if it has one; `reply_limited`: the reply must fit in
        one gRPC message; `options`: the request's parameters when the caller has read them already."""
        if options is None:
            options = read_options(request)
        record = None
        if options.sequence_id is not None and not options.start:  # on the version the sequence started on
            named = request.model_version
            version = self.version_number(request.model_name, named) if named else 0
            spec, record = await find_sequence(self.dataplane, request.model_name, version, options.sequence_id)
        else:
            spec = self.model_spec(request.model_name, request.model_version)
        inputs = read_inputs(request, spec, self.dataplane)
        outputs = requested_outputs(request, spec)
        if reply_limited and spec.output_name in outputs:
            rows, steps = inputs.shape[:2]
            state_bytes = sum(FLOAT_BYTES * spec.num_layers * rows * spec.hidden_size for name in ("hn", "cn")
                              if name in outputs)
            self.dataplane.check_reply(spec, rows * steps, all_steps=True, fixed_bytes=state_bytes)
        timeout = options.timeout(remaining)
        try:
            if options.sequence_id is not None:
                row = inputs.sequence_row(options.sequence_id)
                results = [await step_sequence(self.dataplane, spec, options.sequence_id, row, start=options.start,
                                               end=options.end, timeout=timeout, record=record)]
            else:
                zeros = np.zeros((spec.num_layers, len(inputs.rows), spec.hidden_size), np.float32)
                h, c = inputs.state or (zeros, zeros)
                results = await self.dataplane.step_stateless(spec.key, inputs.rows, h, c, timeout=timeout)
        except DeadlineExceeded as exc:
            if not options.timeout_us:
                raise
            raise DeadlineExceeded(f"{exc.message} (timeout parameter: {options.timeout_us} µs); "
                                   "nothing was applied") from None
        return self._response(request, spec, outputs, results)

    def _response(self, request: pb.ModelInferRequest, spec: ModelSpec, outputs: list[str],
                  results: list[StepResult]) -> pb.ModelInferResponse:
        response = pb.ModelInferResponse(model_name=spec.name, model_version=str(spec.version), id=request.id)
        write_outputs(response, outputs, {name: _batched(results, name == spec.output_name, name) for name in outputs})
        return response

    @rpc
    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ModelInferResponse:
        return await self.infer(request, context.time_remaining(), reply_limited=True)

    @rpc
    async def ModelStreamInfer(self, requests: AsyncIterator[pb.ModelInferRequest],
                               context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests run concurrently, except that those of one sequence run one after another, so
        its responses keep request order; a failed request gets an error response, the stream goes on.

        At most max_queue_size requests are in flight or unsent per stream: past that the stream
        stops reading, and gRPC flow control holds the client back.
        """
        responses: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        slots = asyncio.Semaphore(self.dataplane.settings.max_queue_size)
        reader = asyncio.create_task(self._read_stream(requests, context, responses, slots))
        try:
            while (response := await responses.get()) is not None:
                yield response
                slots.release()
            await reader  # re-raise what ended the reading, if anything
        finally:
            reader.cancel()

    async def _read_stream(
        self, requests: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext,
        responses: asyncio.Queue[pb.ModelStreamInferResponse | None], slots: asyncio.Semaphore,
    ) -> None:
        pending: set[asyncio.Task[None]] = set()
        last: dict[str, asyncio.Task[None]] = {}  # the latest request of each sequence still running
        try:
            async for request in requests:
                await slots.acquire()
                key, options = self._sequence_of(request)
                task = asyncio.create_task(self._answer(request, options, last.get(key) if key else None, context,
                                                        responses))
                pending.add(task)
                task.add_done_callback(pending.discard)
                if key:
                    last[key] = task
                    task.add_done_callback(lambda done, key=key: last.pop(key) if last.get(key) is done else None)
            await asyncio.gather(*pending)
        finally:
            for task in pending:  # the stream is gone: its requests are not worth computing
                task.cancel()
            responses.put_nowait(None)

    def _sequence_of(self, request: pb.ModelInferRequest) -> tuple[str | None, Options | None]:
        """The store key of the request's sequence (None when it has none) and its parameters, read once for
        both; (None, None) when the request will fail anyway (infer then says why)."""
        try:
            options = read_options(request)
            model = self.dataplane.model_name(request.model_name)
        except CellstreamError:
            return None, None
        sequence_id = options.sequence_id
        return None if sequence_id is None else sequence_key(model, sequence_id), options

    async def _answer(
        self, request: pb.ModelInferRequest, options: Options | None, after: asyncio.Task[None] | None,
        context: grpc.aio.ServicerContext, responses: asyncio.Queue[pb.ModelStreamInferResponse | None],
    ) -> None:
        if after is not None:
            await asyncio.wait([after])
        # A failed request is reported in its own response; the stream serves the next requests.
        try:
            inferred = await self.infer(request, context.time_remaining(), reply_limited=True, options=options)
            response = pb.ModelStreamInferResponse(infer_response=inferred)
        except CellstreamError as exc:
            response = _error_response(request, exc.code, exc.message)
        except Exception:  # a bug: logged once, reported as INTERNAL like a failed unary call
            log.exception("unexpected error in ModelStreamInfer")
            response = _error_response(request, grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
        responses.put_nowait(response)


    # --- the model repository extension ------------------------------------------------------------

    async def index(self, repository: str, ready: bool) -> list[IndexEntry]:
        """RepositoryIndex, shared with the HTTP face."""
        check_repository(repository)
        return await self.dataplane.repository_index(ready)

    @rpc
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
                              ) -> pb.RepositoryIndexResponse:
        entries = await self.index(request.repository_name, request.ready)
        return pb.RepositoryIndexResponse(models=[
            pb.RepositoryIndexResponse.ModelIndex(name=e.name, version="" if e.version is None else str(e.version),
                                                  state=e.state, reason=e.reason) for e in entries])

    @rpc
    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
                                  ) -> pb.RepositoryModelLoadResponse:
        check_repository(request.repository_name)
        check_load_parameters(request.parameters)
        await self.dataplane.load_model(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @rpc
    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest,
                                    context: grpc.aio.ServicerContext) -> pb.RepositoryModelUnloadResponse:
        check_repository(request.repository_name)  # its parameter unload_dependents: no model here has dependents
        await self.dataplane.unload_model(request.model_name)
        return pb.RepositoryModelUnloadResponse()


def check_repository(repository: str) -> None:
    if repository:
        raise InvalidArgument(f"repository_name is {repository[:80]!r}: cellstream serves one model repository "
                              "(model_dir); leave it empty")


def check_load_parameters(names: Iterable[str]) -> None:
    """InvalidArgument for a load that sends a model of its own (Triton's `config`, `file:...`); other parameters
    are ignored, as the protocol allows."""
    if any(name == "config" or name.startswith("file:") for name in names):
        raise InvalidArgument(OVERRIDES_REFUSED)


def _batched(results: list[StepResult], main: bool, name: str) -> np.ndarray:
    """The requested output of every row: the main output (logits, forecast, ...) (B, T, V), or hn / cn
    (L, B, H). Only what the request asked for is built; one row (a sequence's step) is a view."""
    if main:
        return results[0].logits[None] if len(results) == 1 else np.stack([r.logits for r in results])
    state = [r.h if name == "hn" else r.c for r in results]
    return state[0][:, None] if len(state) == 1 else np.stack(state, axis=1)


def _error_response(request: pb.ModelInferRequest, code: grpc.StatusCode, message: str) -> pb.ModelStreamInferResponse:
    """The status goes into the message (the stream itself stays OK); the id says which request failed."""
    prefix = f"request {request.id!r}: " if request.id else ""
    return pb.ModelStreamInferResponse(
        error_message=f"{prefix}{code.name}: {message}",
        infer_response=pb.ModelInferResponse(model_name=request.model_name, id=request.id),
    )

