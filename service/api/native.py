"""cellstream.v1.Inference servicer: protobuf in, DataPlane calls, protobuf out."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from service._proto.cellstream.v1 import inference_pb2 as pb
from service._proto.cellstream.v1 import inference_pb2_grpc as pb_grpc
from service.api.handling import DataPlaneServicer, rpc
from service.batcher import StepResult
from service.dataplane import InitialState
from service.engine import ModelSpec
from service.errors import InvalidArgument
from service.sessions.base import SessionRecord
from service.textcodec import token_text


def session_info(record: SessionRecord) -> pb.SessionInfo:
    expires = Timestamp()
    expires.FromNanoseconds(int(record.expires_at * 1e9))
    return pb.SessionInfo(session_id=record.session_id, model=record.model, position=record.position,
                          expires_at=expires)


def state_message(model: str, h: np.ndarray, c: np.ndarray, position: int) -> pb.State:
    return pb.State(model=model, num_layers=h.shape[0], hidden_size=h.shape[1], h=h.ravel().tolist(),
                    c=c.ravel().tolist(), position=position)


def top_tokens(logits: np.ndarray, k: int) -> list[pb.TokenProb]:
    """The k most probable next tokens under softmax(logits), most probable first."""
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    k = min(k, len(probs))
    best = np.argpartition(-probs, k - 1)[:k]
    best = best[np.argsort(-probs[best], kind="stable")]
    return [pb.TokenProb(token=int(t), prob=float(probs[t]), text=token_text(int(t))) for t in best]


class NativeServicer(DataPlaneServicer, pb_grpc.InferenceServicer):
    """The native API's RPCs; each converts its request, calls the DataPlane and converts the result."""

    def _inputs(self, spec: ModelSpec, request: pb.StepRequest) -> np.ndarray:
        kind = request.WhichOneof("input")
        if kind == "tokens":
            return self.dataplane.tokens_input(spec, request.tokens.ids, "tokens.ids")
        if kind == "text":
            return self.dataplane.text_input(spec, request.text)
        if kind == "features":
            return self.dataplane.features_input(spec, request.features.values, request.features.dim)
        raise InvalidArgument("StepRequest has no input; set one of tokens, text or features")

    async def _step(self, request: pb.StepRequest, session_id: str, context: grpc.aio.ServicerContext
                    ) -> pb.StepResponse:
        record = await self.dataplane.session(session_id)
        spec = self.dataplane.spec(record.model)
        inputs = self._inputs(spec, request)
        expected = request.expected_position if request.HasField("expected_position") else None
        result = await self.dataplane.step(record, inputs, expected_position=expected,
                                           timeout=context.time_remaining())
        return self._response(session_id, spec, request.want, result)

    def _response(self, session_id: str, spec: ModelSpec, want: pb.Outputs, result: StepResult) -> pb.StepResponse:
        response = pb.StepResponse(session_id=session_id, position=result.position)
        if want.all_steps:
            response.logits.extend(result.logits.ravel().tolist())
        elif want.logits:
            response.logits.extend(result.logits[-1].tolist())
        if want.top_k:
            response.top.extend(top_tokens(result.logits[-1], want.top_k))
        if want.state:
            response.state.CopyFrom(state_message(spec.name, result.h, result.c, result.position))
        return response

    @rpc
    async def OpenSession(self, request: pb.OpenSessionRequest, context: grpc.aio.ServicerContext
                          ) -> pb.SessionInfo:
        initial = None
        if request.HasField("initial_state"):
            s = request.initial_state
            initial = InitialState(s.model, s.num_layers, s.hidden_size, s.h, s.c, s.position)
        record = await self.dataplane.open_session(request.model, request.ttl_seconds, initial)
        return session_info(record)

    @rpc
    async def Step(self, request: pb.StepRequest, context: grpc.aio.ServicerContext) -> pb.StepResponse:
        return await self._step(request, request.session_id, context)

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
            yield await self._step(request, session_id, context)

    @rpc
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[pb.GenerateChunk]:
        record = await self.dataplane.session(request.session_id)
        spec = self.dataplane.spec(record.model)
        prompt = self.dataplane.text_input(spec, request.prompt, "prompt")
        chunks = self.dataplane.generate(
            record, prompt, max_tokens=request.max_tokens, temperature=request.temperature,
            top_k=request.top_k, seed=request.seed if request.HasField("seed") else None,
            stop=list(request.stop), timeout=context.time_remaining(),
        )
        async for chunk in chunks:
            yield pb.GenerateChunk(text=chunk.text, tokens=chunk.tokens, position=chunk.position,
                                   done=bool(chunk.finish_reason), finish_reason=chunk.finish_reason)

    @rpc
    async def GetState(self, request: pb.SessionRef, context: grpc.aio.ServicerContext) -> pb.State:
        record = await self.dataplane.session(request.session_id)
        return state_message(record.model, record.h, record.c, record.position)

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
        registry = self.dataplane.registry
        models = [
            pb.ModelInfo(name=name, input_kind=spec.input_kind, vocab_size=spec.vocab_size,
                         feature_size=spec.feature_size, num_layers=spec.num_layers, hidden_size=spec.hidden_size,
                         metadata=spec.metadata, is_default=name == registry.default)
            for name, spec in ((n, e.spec) for n, e in sorted(registry.engines.items()))
        ]
        return pb.ListModelsResponse(models=models, default_model=registry.default)
