"""KServe v2 REST (the Open Inference Protocol over HTTP, as Triton serves it): health, metadata, inference
and the model repository extension on the same servicer core as the gRPC face, so `tritonclient.http` works
unchanged and a sequence may be stepped over either transport."""

from __future__ import annotations

from starlette.responses import Response

from cellstream.service.api.http.endpoint import Api, Call, json_response
from cellstream.service.api.http.errors import HttpError
from cellstream.service.api.http.kserve_json import BINARY_HEADER, read_request, write_response
from cellstream.service.api.kserve import (
    EXTENSIONS,
    PLATFORM,
    SERVER_NAME,
    SERVER_VERSION,
    KServeServicer,
    check_load_parameters,
)
from cellstream.service.api.kserve_codec import signature

NOT_READY = 503


class KServeRoutes:
    def __init__(self, kserve: KServeServicer) -> None:
        self.kserve = kserve

    def apis(self) -> list[Api]:
        apis = [
            Api("/v2/health/live", "GET", self.live, "The server is up", reply="ServerLive", open=True),
            Api("/v2/health/ready", "GET", self.ready, "Models loaded, session store reachable, not shutting down "
                "(503 otherwise)", reply="ServerReady", open=True),
            Api("/v2", "GET", self.server_metadata, "Server name, version and protocol extensions",
                reply="ServerMetadata"),
        ]
        for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            apis += [
                Api(prefix, "GET", self.model_metadata, "A model's tensors", reply="ModelMetadata"),
                Api(f"{prefix}/ready", "GET", self.model_ready, "The server is ready and serves the model (503 "
                    "while it is not ready)", reply="ModelReady"),
                Api(f"{prefix}/infer", "POST", self.infer, "One inference: a sequence step (parameter "
                    "sequence_id) or a stateless batch; JSON tensors or Triton's binary tensor data",
                    request="InferenceRequest", reply="InferenceResponse"),
            ]
        apis += [
            Api("/v2/repository/index", "POST", self.index, "Every model version in the repository or loaded, with "
                "its state and reason (admin scope); the body may be empty", request="RepositoryIndexRequest",
                reply="RepositoryIndex"),
            Api("/v2/repository/models/{model}/load", "POST", self.load, "Load or reload a model: serve the versions "
                "its directory holds now (model_control=explicit, admin scope); the body may be empty",
                request="RepositoryRequest"),
            Api("/v2/repository/models/{model}/unload", "POST", self.unload, "Unload every version of a model; "
                "those with live sessions drain (model_control=explicit, admin scope); the body may be empty",
                request="RepositoryRequest"),
        ]
        return apis

    @staticmethod
    def _model(call: Call) -> tuple[str, str]:
        return call.path["model"], call.path.get("version", "")

    async def live(self, call: Call) -> Response:
        return json_response({"live": True})

    async def ready(self, call: Call) -> Response:
        ready = self.kserve.ready
        return json_response({"ready": ready}, 200 if ready else NOT_READY)

    async def server_metadata(self, call: Call) -> Response:
        return json_response({"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": list(EXTENSIONS)})

    async def model_metadata(self, call: Call) -> Response:
        spec, versions = self.kserve.model_metadata(*self._model(call))
        sig = signature(spec)

        def tensors(group: dict) -> list[dict]:
            return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in group.values()]

        return json_response({"name": spec.name, "versions": versions, "platform": PLATFORM,
                              "inputs": tensors(sig.inputs), "outputs": tensors(sig.outputs)})

    async def model_ready(self, call: Call) -> Response:
        model, version = self._model(call)
        ready = self.kserve.model_ready(model, version)  # unknown: 404, still loading: 503
        name = model or self.kserve.dataplane.registry.default
        return json_response({"name": name, "ready": ready}, 200 if ready else NOT_READY)

    async def index(self, call: Call) -> Response:
        body = await call.json(empty_is={})
        ready = body.get("ready", False)
        if not isinstance(ready, bool):
            raise HttpError(400, f"'ready' must be true or false, not {type(ready).__name__}")
        entries = await self.kserve.index("", ready)
        return json_response([{"name": e.name, **({} if e.version is None else {"version": str(e.version)}),
                               "state": e.state, "reason": e.reason} for e in entries])

    async def load(self, call: Call) -> Response:
        check_load_parameters(await self._parameters(call))
        await self.kserve.dataplane.load_model(call.path["model"])
        return Response(status_code=200)

    async def unload(self, call: Call) -> Response:
        await self._parameters(call)  # unload_dependents: no model here has dependents
        await self.kserve.dataplane.unload_model(call.path["model"])
        return Response(status_code=200)

    @staticmethod
    async def _parameters(call: Call) -> dict:
        parameters = (await call.json(empty_is={})).get("parameters", {})
        if not isinstance(parameters, dict):
            raise HttpError(400, f"'parameters' must be an object, not {type(parameters).__name__}")
        return parameters

    async def infer(self, call: Call) -> Response:
        encoding = call.request.headers.get("content-encoding", "identity").lower()
        if encoding != "identity":
            raise HttpError(415, f"Content-Encoding {encoding[:40]!r} is not supported; send the body uncompressed")
        model, version = self._model(call)
        body = await call.body()
        request, outputs = read_request(model, version, body, call.request.headers.get(BINARY_HEADER))
        response = await self.kserve.infer(request, call.remaining())
        content, headers, media_type = write_response(response, outputs)
        return Response(content, 200, headers, media_type=media_type)
