"""cellstream.v1.Inference servicer: protobuf in, DataPlane calls, protobuf out."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from cellstream.service._proto.cellstream.v1 import inference_pb2 as pb
from cellstream.service._proto.cellstream.v1 import inference_pb2_grpc as pb_grpc
from cellstream.service.api.generate_many import Turns
from cellstream.service.api.handling import DataPlaneServicer, rpc
from cellstream.service.api.multiplex import StepItems
from cellstream.service.api.native_codec import (
    fill_chunk,
    fill_state,
    generate,
    initial_state,
    list_models,
    model_status,
    session_info,
    step,
)
from cellstream.service.api.outbox import relay
from cellstream.service.errors import InvalidArgument


class NativeServicer(DataPlaneServicer, pb_grpc.InferenceServicer):
    """The native API's RPCs; each converts its request, calls the DataPlane and converts the result."""

    @rpc
    async def OpenSession(self, request: pb.OpenSessionRequest, context: grpc.aio.ServicerContext
                          ) -> pb.SessionInfo:
        record = await self.dataplane.open_session(request.model, request.ttl_seconds, initial_state(request),
                                                   request.model_version)
        return session_info(record)

    @rpc
    async def Step(self, request: pb.StepRequest, context: grpc.aio.ServicerContext) -> pb.StepResponse:
        return await step(self.dataplane, request, request.session_id, context.time_remaining(), reply_limited=True)

    @rpc
    async def StreamSteps(self, request_iterator: AsyncIterator[pb.StepRequest],
                          context: grpc.aio.ServicerContext) -> AsyncIterator[pb.StepResponse]:
        session_id = ""
        async for request in request_iterator:
            if not session_id:
                if not request.session_id:
                    raise InvalidArgument("the first StepRequest of a stream must name session_id")
                session_id = request.session_id
            elif request.session_id and request.session_id != session_id:
                # Cut: a client's id of any length must not become an error message of that length.
                raise InvalidArgument(f"this stream is bound to session {session_id!r}; "
                                      f"request names {request.session_id[:80]!r} (open another stream)")
            yield await step(self.dataplane, request, session_id, context.time_remaining(), reply_limited=True)

    @rpc
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[pb.GenerateChunk]:
        async for chunk in generate(self.dataplane, request, context.time_remaining(), reply_limited=True):
            yield fill_chunk(pb.GenerateChunk(), chunk)

    @rpc
    async def StepMany(self, request: pb.StepBatch, context: grpc.aio.ServicerContext) -> pb.StepBatchResult:
        items = StepItems(self.dataplane, self.metrics, "StepMany")
        return await items.answer(request, context.time_remaining())

    @rpc
    async def StreamMany(self, request_iterator: AsyncIterator[pb.StepBatch], context: grpc.aio.ServicerContext
                         ) -> AsyncIterator[pb.StepBatchResult]:
        async for reply in relay(StepItems(self.dataplane, self.metrics, "StreamMany"), request_iterator, context,
                                 self.dataplane.settings.max_message_bytes):
            yield reply

    @rpc
    async def GenerateMany(self, request_iterator: AsyncIterator[pb.GenerateBatch],
                           context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateBatchResult]:
        async for reply in relay(Turns(self.dataplane, self.metrics), request_iterator, context,
                                 self.dataplane.settings.max_message_bytes):
            yield reply

    @rpc
    async def GetState(self, request: pb.SessionRef, context: grpc.aio.ServicerContext) -> pb.State:
        record = await self.dataplane.session(request.session_id)
        return fill_state(pb.State(), record.model, record.h, record.c, record.position)

    @rpc
    async def ForkSession(self, request: pb.ForkSessionRequest, context: grpc.aio.ServicerContext
                          ) -> pb.SessionInfo:
        return session_info(await self.dataplane.fork(request.session_id, request.ttl_seconds))

    @rpc
    async def CloseSession(self, request: pb.SessionRef, context: grpc.aio.ServicerContext
                           ) -> pb.CloseSessionResponse:
        record = await self.dataplane.close_session(request.session_id)
        return pb.CloseSessionResponse(position=record.position)

    @rpc
    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ListModelsResponse:
        return await list_models(self.dataplane)

    @rpc
    async def LoadModel(self, request: pb.LoadModelRequest, context: grpc.aio.ServicerContext) -> pb.ModelStatus:
        return model_status(self.dataplane, await self.dataplane.load_model(request.model))

    @rpc
    async def UnloadModel(self, request: pb.UnloadModelRequest, context: grpc.aio.ServicerContext) -> pb.ModelStatus:
        return model_status(self.dataplane, await self.dataplane.unload_model(request.model))
