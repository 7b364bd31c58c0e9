"""The native API's per-request RPCs over JSON: bodies and replies are the cellstream.v1 messages in the
protobuf JSON mapping (field names as in the .proto; camelCase accepted too; 64-bit integers as strings in
replies), so docs/API.md describes both faces. Generate streams its chunks as server-sent events (sse.py).

The multiplexed RPCs (StepMany, StreamMany, GenerateMany) and StreamSteps stay gRPC-only: they exist to
save per-call overhead on long-lived channels, which one HTTP request per step does not have.
"""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np
from google.protobuf import json_format
from google.protobuf.message import Message
from starlette.responses import Response

from cellstream.service._proto.cellstream.v1 import inference_pb2 as pb
from cellstream.service.api import native_codec
from cellstream.service.api.handling import DataPlaneServicer
from cellstream.service.api.http.endpoint import Api, Call, json_response
from cellstream.service.api.http.errors import HttpError
from cellstream.service.api.http.sse import stream_turn
from cellstream.service.dataplane import GeneratedChunk
from cellstream.service.gates import GATE_NAMES

M = TypeVar("M", bound=Message)
SESSION = "/v1/sessions/{session_id}"


def to_json(message: Message) -> dict[str, Any]:
    gates = getattr(message, "gates", None)  # StepResponse and GenerateChunk may carry up to ~1M floats of gates
    if gates:
        layers = [{name: np.asarray(getattr(layer, name), np.float32).tolist() for name in GATE_NAMES}
                  for layer in gates]
        message = copy_without_gates(message)
    document = json_format.MessageToDict(message, preserving_proto_field_name=True,
                                         always_print_fields_with_no_presence=True)
    if gates:
        document["gates"] = layers  # the same floats: 4x faster than the JSON mapping's own, float by float
    return document


def copy_without_gates(message: M) -> M:
    copy = type(message)()
    copy.CopyFrom(message)
    copy.ClearField("gates")
    return copy


def reply(message: Message) -> Response:
    return json_response(to_json(message))


def parse(document: dict[str, Any], message: M) -> M:
    try:
        return json_format.ParseDict(document, message)
    except json_format.ParseError as exc:
        raise HttpError(400, f"request body is not a {message.DESCRIPTOR.name}: {exc}") from None


def chunk_json(chunk: GeneratedChunk) -> dict[str, Any]:
    return to_json(native_codec.fill_chunk(pb.GenerateChunk(), chunk))


class SessionRoutes:
    def __init__(self, native: DataPlaneServicer) -> None:
        self.native = native  # for its data plane, attached once the models are loaded

    def apis(self) -> list[Api]:
        v1 = "cellstream.v1."
        return [
            Api("/v1/models", "GET", self.list_models, "The models served (ListModels)",
                reply=v1 + "ListModelsResponse"),
            Api("/v1/models/{model}/load", "POST", self.load_model, "Load (or reload) a model's versions from the "
                "model repository (LoadModel; admin scope)", reply=v1 + "ModelStatus"),
            Api("/v1/models/{model}/unload", "POST", self.unload_model, "Unload every version of a model; those "
                "with live sessions drain (UnloadModel; admin scope)", reply=v1 + "ModelStatus"),
            Api("/v1/sessions", "POST", self.open_session, "A new session (OpenSession); the body may be empty",
                request=v1 + "OpenSessionRequest", reply=v1 + "SessionInfo"),
            Api(f"{SESSION}/step", "POST", self.step, "Feed tokens, text or features (Step)",
                request=v1 + "StepRequest", reply=v1 + "StepResponse"),
            Api(f"{SESSION}/generate", "POST", self.generate, "A chat turn, its reply streamed as server-sent "
                "events: `chunk`, then `done` (with finish_reason), or `error` (Generate)",
                request=v1 + "GenerateRequest", reply=v1 + "GenerateChunk", events=True),
            Api(f"{SESSION}/state", "GET", self.state, "The session's h, C and position (GetState)",
                reply=v1 + "State"),
            Api(f"{SESSION}/fork", "POST", self.fork, "A copy of the session (ForkSession); the body may be empty",
                request=v1 + "ForkSessionRequest", reply=v1 + "SessionInfo"),
            Api(SESSION, "DELETE", self.close, "Free the session (CloseSession)", reply=v1 + "CloseSessionResponse"),
        ]

    @staticmethod
    def _session_id(call: Call, named: str = "") -> str:
        """The path's session id; a body that names one must name the same."""
        session_id = call.path["session_id"]
        if named and named != session_id:
            raise HttpError(400, f"the path names session {session_id[:80]!r} but the body's session_id is "
                                 f"{named[:80]!r}; leave session_id out of the body")
        return session_id

    async def list_models(self, call: Call) -> Response:
        return reply(await native_codec.list_models(self.native.dataplane))

    async def load_model(self, call: Call) -> Response:
        dataplane = self.native.dataplane
        return reply(native_codec.model_status(dataplane, await dataplane.load_model(call.path["model"])))

    async def unload_model(self, call: Call) -> Response:
        dataplane = self.native.dataplane
        return reply(native_codec.model_status(dataplane, await dataplane.unload_model(call.path["model"])))

    async def open_session(self, call: Call) -> Response:
        request = parse(await call.json(empty_is={}), pb.OpenSessionRequest())
        record = await self.native.dataplane.open_session(request.model, request.ttl_seconds,
                                                          native_codec.initial_state(request), request.model_version)
        return reply(native_codec.session_info(record))

    async def step(self, call: Call) -> Response:
        request = parse(await call.json(), pb.StepRequest())
        session_id = self._session_id(call, request.session_id)
        return reply(await native_codec.step(self.native.dataplane, request, session_id, call.remaining()))

    async def generate(self, call: Call) -> Response:
        request = parse(await call.json(), pb.GenerateRequest())
        request.session_id = self._session_id(call, request.session_id)
        chunks = native_codec.generate(self.native.dataplane, request, call.remaining())
        return await stream_turn(call, chunks, chunk_json)

    async def state(self, call: Call) -> Response:
        record = await self.native.dataplane.session(self._session_id(call))
        return reply(native_codec.fill_state(pb.State(), record.model, record.h, record.c, record.position))

    async def fork(self, call: Call) -> Response:
        request = parse(await call.json(empty_is={}), pb.ForkSessionRequest())
        session_id = self._session_id(call, request.session_id)
        return reply(native_codec.session_info(await self.native.dataplane.fork(session_id, request.ttl_seconds)))

    async def close(self, call: Call) -> Response:
        record = await self.native.dataplane.close_session(self._session_id(call))
        return reply(pb.CloseSessionResponse(position=record.position))
