"""Python client for the cellstream.v1 API, and the `cellstream chat` terminal chat."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from cellstream.service._proto.cellstream.v1 import inference_pb2 as pb
from cellstream.service._proto.cellstream.v1 import inference_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class StepOutput:
    position: int
    logits: np.ndarray | None  # (V,) last step, or (T, V) with all_steps
    top: list[tuple[int, float, str]]
    state: pb.State | None
    outputs: np.ndarray | None = None  # the same for a model whose output is not logits (e.g. a forecast)


def _pem(path: Path | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


def tls_credentials(ca_path: Path | None = None, cert_path: Path | None = None, key_path: Path | None = None
                    ) -> grpc.ChannelCredentials:
    """TLS to the server: trust `ca_path` (default: the system's roots); present cert/key for mutual TLS."""
    return grpc.ssl_channel_credentials(root_certificates=_pem(ca_path), private_key=_pem(key_path),
                                        certificate_chain=_pem(cert_path))


class Client:
    """Async client; use as `async with Client("127.0.0.1:50051") as client:`.

    `credentials` (see tls_credentials) make the channel TLS; `token` is sent as
    `authorization: Bearer <token>` with every call.
    """

    def __init__(self, target: str, *, channel: grpc.aio.Channel | None = None, timeout: float | None = 30.0,
                 token: str | None = None, credentials: grpc.ChannelCredentials | None = None) -> None:
        if channel is None:
            channel = (grpc.aio.secure_channel(target, credentials) if credentials is not None
                       else grpc.aio.insecure_channel(target))
        self.channel = channel
        self.stub = pb_grpc.InferenceStub(self.channel)
        self.timeout = timeout
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.channel.close()

    async def open_session(self, model: str = "", ttl_seconds: int = 0, initial_state: pb.State | None = None,
                           model_version: int = 0) -> pb.SessionInfo:
        """A session pinned to `model_version` of `model` (0: the model's default version) for its whole life."""
        request = pb.OpenSessionRequest(model=model, ttl_seconds=ttl_seconds, initial_state=initial_state,
                                        model_version=model_version)
        return await self.stub.OpenSession(request, timeout=self.timeout, metadata=self.metadata)

    @staticmethod
    def step_request(session_id: str = "", **kwargs: Any) -> pb.StepRequest:
        """A StepRequest with exactly one of tokens, text or features (T, F); see fill_step_request."""
        return Client.fill_step_request(pb.StepRequest(), session_id, **kwargs)

    @staticmethod
    def fill_step_request(
        request: pb.StepRequest,
        session_id: str = "",
        *,
        tokens: Sequence[int] | None = None,
        text: str | None = None,
        features: np.ndarray | None = None,
        expected_position: int | None = None,
        logits: bool = False,
        top_k: int = 0,
        all_steps: bool = False,
        state: bool = False,
        gates: bool = False,
        tag: int = 0,
    ) -> pb.StepRequest:
        """Fill an empty StepRequest in place (e.g. an item of a StepBatch, which is then not copied)."""
        request.session_id, request.tag = session_id, tag
        if expected_position is not None:
            request.expected_position = expected_position
        want = request.want
        want.logits, want.top_k, want.all_steps, want.state, want.gates = logits, top_k, all_steps, state, gates
        if tokens is not None:
            request.tokens.ids.extend(int(t) for t in tokens)
        elif text is not None:
            request.text = text
        elif features is not None:
            array = np.asarray(features, dtype=np.float32)
            request.features.values.extend(array.ravel().tolist())
            request.features.dim = array.shape[-1]
        return request

    @staticmethod
    def step_output(response: pb.StepResponse, vocab_size: int | None = None) -> StepOutput:
        def array(values: Sequence[float]) -> np.ndarray | None:
            if not values:
                return None
            values = np.asarray(values, dtype=np.float32)
            return values.reshape(-1, vocab_size) if vocab_size and values.size > vocab_size else values

        top = [(t.token, t.prob, t.text) for t in response.top]
        state = response.state if response.HasField("state") else None
        return StepOutput(response.position, array(response.logits), top, state, array(response.outputs))

    async def step(self, session_id: str, **kwargs: object) -> pb.StepResponse:
        return await self.stub.Step(self.step_request(session_id, **kwargs), timeout=self.timeout,
                                    metadata=self.metadata)

    async def step_many(self, requests: Sequence[pb.StepRequest]) -> pb.StepBatchResult:
        """StepMany: one outcome per request, in order (see Client.step_request for building them)."""
        return await self.stub.StepMany(pb.StepBatch(items=requests), timeout=self.timeout, metadata=self.metadata)

    def stream_many(self) -> grpc.aio.StreamStreamCall:
        """A StreamMany call, without deadline (see cellstream.service.gateway.Gateway for the coalescing helper)."""
        return self.stub.StreamMany(metadata=self.metadata)

    def generate_many(self) -> grpc.aio.StreamStreamCall:
        """A GenerateMany call, without deadline: write GenerateBatch messages, read GenerateBatchResult ones."""
        return self.stub.GenerateMany(metadata=self.metadata)

    def stream_steps(self) -> grpc.aio.StreamStreamCall:
        """A StreamSteps call: `await call.write(request)`, `await call.read()`, `await call.done_writing()`."""
        return self.stub.StreamSteps(timeout=self.timeout, metadata=self.metadata)

    async def generate(self, session_id: str, prompt: str, *, max_tokens: int = 0, temperature: float = 0.0,
                       top_k: int = 0, seed: int | None = None, stop: Sequence[str] = (), gates: bool = False
                       ) -> AsyncIterator[pb.GenerateChunk]:
        request = pb.GenerateRequest(session_id=session_id, prompt=prompt, max_tokens=max_tokens,
                                     temperature=temperature, top_k=top_k, seed=seed, stop=list(stop), gates=gates)
        async for chunk in self.stub.Generate(request, timeout=self.timeout, metadata=self.metadata):
            yield chunk

    async def reply(self, session_id: str, prompt: str, **kwargs: object) -> str:
        """The whole generated text of one Generate call."""
        return "".join([chunk.text async for chunk in self.generate(session_id, prompt, **kwargs)])

    async def get_state(self, session_id: str) -> pb.State:
        return await self.stub.GetState(pb.SessionRef(session_id=session_id), timeout=self.timeout,
                                        metadata=self.metadata)

    async def fork(self, session_id: str, ttl_seconds: int = 0) -> pb.SessionInfo:
        request = pb.ForkSessionRequest(session_id=session_id, ttl_seconds=ttl_seconds)
        return await self.stub.ForkSession(request, timeout=self.timeout, metadata=self.metadata)

    async def close_session(self, session_id: str) -> pb.CloseSessionResponse:
        return await self.stub.CloseSession(pb.SessionRef(session_id=session_id), timeout=self.timeout,
                                            metadata=self.metadata)

    async def list_models(self) -> pb.ListModelsResponse:
        return await self.stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout, metadata=self.metadata)

    async def load_model(self, model: str) -> pb.ModelStatus:
        """Serve the versions of `model` its directory in the server's model repository holds (admin scope)."""
        return await self.stub.LoadModel(pb.LoadModelRequest(model=model), timeout=self.timeout, metadata=self.metadata)

    async def unload_model(self, model: str) -> pb.ModelStatus:
        """Unload every version of `model`; those with live sessions drain (admin scope)."""
        return await self.stub.UnloadModel(pb.UnloadModelRequest(model=model), timeout=self.timeout,
                                           metadata=self.metadata)


async def chat(target: str, *, model: str = "", temperature: float = 0.0, max_tokens: int = 200,
               token: str | None = None, credentials: grpc.ChannelCredentials | None = None) -> int:
    """Interactive chat on stdin/stdout: one session for the whole conversation, replies streamed."""
    async with Client(target, token=token, credentials=credentials) as client:
        try:
            session = await client.open_session(model=model)
        except grpc.aio.AioRpcError as exc:
            print(f"cellstream chat: cannot open a session on {target}: {exc.code().name}: {exc.details()}",
                  file=sys.stderr)
            return 1
        print(f"session {session.session_id} on model {session.model}; empty line or Ctrl-D to quit")
        loop = asyncio.get_running_loop()
        while True:
            print("you> ", end="", flush=True)
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line.strip():
                break
            print("bot> ", end="", flush=True)
            prompt = f"user: {line.strip()}\nbot: "
            reply = ""
            try:
                async for chunk in client.generate(session.session_id, prompt, temperature=temperature,
                                                   max_tokens=max_tokens, stop=["\n"]):
                    reply += chunk.text
                    print(chunk.text, end="", flush=True)
            except grpc.aio.AioRpcError as exc:
                print(f"\n[error: {exc.code().name}: {exc.details()}]")
                return 1
            if not reply.endswith("\n"):
                print()
        await client.close_session(session.session_id)
    return 0
