"""cellstream.v1 messages ⇄ DataPlane arguments and results, shared by the single and multiplexed RPCs.

Results are written into a message the caller hands in (a fresh one, or an item of a batch result),
so a multiplexed reply is filled in place, never assembled from copies.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np
from google.protobuf.internal.containers import RepeatedCompositeFieldContainer
from google.protobuf.timestamp_pb2 import Timestamp

from cellstream.service._proto.cellstream.v1 import inference_pb2 as pb
from cellstream.service.batcher import StepInputs, StepResult
from cellstream.service.dataplane import FLOAT_BYTES, DataPlane, GeneratedChunk, InitialState
from cellstream.service.engine import LOGITS, ModelSpec
from cellstream.service.errors import CellstreamError, InvalidArgument
from cellstream.service.gates import GATE_NAMES
from cellstream.service.model_control import Change
from cellstream.service.registry import ModelVersion
from cellstream.service.sessions.base import SessionRecord
from cellstream.service.textcodec import token_text
from cellstream.service.versions import key_parts

TOP_TOKEN_BYTES = 32  # a TokenProb: id, probability, text of a few bytes, tags
WIRE_LENGTH_DELIMITED = 2  # the protobuf wire type of packed repeated fields
GATE_FIELDS = {name: pb.LayerGates.DESCRIPTOR.fields_by_name[name].number for name in GATE_NAMES}
LOGITS_FIELD, OUTPUTS_FIELD = (pb.StepResponse.DESCRIPTOR.fields_by_name[name].number for name in ("logits", "outputs"))


def session_info(record: SessionRecord) -> pb.SessionInfo:
    expires = Timestamp()
    expires.FromNanoseconds(int(record.expires_at * 1e9))
    model, version = key_parts(record.model)
    return pb.SessionInfo(session_id=record.session_id, model=model, position=record.position, expires_at=expires,
                          model_version=version)


def fill_state(state: pb.State, key: str, h: np.ndarray, c: np.ndarray, position: int) -> pb.State:
    """The state of a session of model version `key` (versions.py)."""
    state.model, state.model_version = key_parts(key)
    state.num_layers, state.hidden_size, state.position = h.shape[0], h.shape[1], position
    state.h.extend(h.ravel().tolist())
    state.c.extend(c.ravel().tolist())
    return state


def top_tokens(logits: np.ndarray, k: int) -> list[pb.TokenProb]:
    """The k most probable next tokens under softmax(logits), most probable first."""
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    k = min(k, len(probs))
    best = np.argpartition(-probs, k - 1)[:k]
    best = best[np.argsort(-probs[best], kind="stable")]
    return [pb.TokenProb(token=int(t), prob=float(probs[t]), text=token_text(int(t))) for t in best]


def step_inputs(dataplane: DataPlane, spec: ModelSpec, request: pb.StepRequest) -> StepInputs:
    """The request's validated input: T token ids or (T, F) features."""
    ids = request.tokens.ids
    if ids:  # ids are set only while tokens is the oneof's member; WhichOneof costs more than a 1-token step's checks
        return dataplane.tokens_input(spec, ids, "tokens.ids")
    kind = request.WhichOneof("input")
    if kind == "tokens":
        return dataplane.tokens_input(spec, request.tokens.ids, "tokens.ids")
    if kind == "text":
        return dataplane.text_input(spec, request.text)
    if kind == "features":
        return dataplane.features_input(spec, request.features.values, request.features.dim)
    raise InvalidArgument("StepRequest has no input; set one of tokens, text or features")


def expected_position(request: pb.StepRequest) -> int | None:
    return request.expected_position if request.HasField("expected_position") else None


def wanted(request: pb.StepRequest) -> pb.Outputs | None:
    """What the request asks for besides the position; None for nothing (most steps: the cheap case)."""
    return request.want if request.HasField("want") else None


def fill_response(response: pb.StepResponse, session_id: str, spec: ModelSpec, want: pb.Outputs | None,
                  result: StepResult) -> pb.StepResponse:
    response.session_id = session_id
    response.position = result.position
    if want is None:
        return response
    named_logits = spec.output_name == LOGITS  # the output goes in the field named for what it is
    if want.all_steps:
        response.MergeFromString(packed_floats(LOGITS_FIELD if named_logits else OUTPUTS_FIELD, result.logits))
    elif want.logits:
        (response.logits if named_logits else response.outputs).extend(result.logits[-1].tolist())
    if want.top_k:
        response.top.extend(top_tokens(result.logits[-1], want.top_k))
    if want.state:
        fill_state(response.state, spec.key, result.h, result.c, result.position)
    if result.gates is not None:
        fill_gates(response.gates, result.gates)
    return response


def fill_gates(layers: RepeatedCompositeFieldContainer[pb.LayerGates], gates: np.ndarray) -> None:
    """Steps' gates (T, 6, L, H) as one LayerGates per layer, each field step-major (T * H floats)."""
    by_layer = gates.transpose(2, 1, 0, 3).reshape(gates.shape[2], len(GATE_NAMES), -1)  # (L, 6, T * H)
    for values in by_layer:
        layers.add().MergeFromString(b"".join(packed_floats(GATE_FIELDS[name], row)
                                              for name, row in zip(GATE_NAMES, values, strict=True)))


def check_reply(dataplane: DataPlane, spec: ModelSpec, steps: int, want: pb.Outputs) -> None:
    """InvalidArgument when the reply to a step of `steps` steps asking for `want` cannot be one gRPC message."""
    if want.all_steps or want.gates:
        dataplane.check_reply(spec, steps, all_steps=want.all_steps, gates=want.gates,
                              fixed_bytes=reply_bytes(spec, 0, want))


def reply_bytes(spec: ModelSpec, steps: int, want: pb.Outputs) -> int:
    """About how many bytes the outputs `want` asks for take in the reply to a step of `steps` steps (gates
    aside: the multiplexed calls refuse them)."""
    state = 2 * FLOAT_BYTES * spec.num_layers * spec.hidden_size if want.state else 0
    logits = FLOAT_BYTES * spec.vocab_size * (steps if want.all_steps else int(want.logits))
    return state + logits + TOP_TOKEN_BYTES * want.top_k


def packed_floats(field_number: int, values: np.ndarray) -> bytes:
    """A repeated float field's encoding (proto3 packs them: tag, length, little-endian float32s), to merge
    into its message: 6x faster than extending the field from a list, which counts on a large reply (a
    request's gates are up to ~1M floats, built on the event loop)."""
    data = np.ascontiguousarray(values, dtype="<f4").tobytes()
    return _varint(field_number << 3 | WIRE_LENGTH_DELIMITED) + _varint(len(data)) + data


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


async def step(dataplane: DataPlane, request: pb.StepRequest, session_id: str, timeout: float | None,
               reply_limited: bool = False) -> pb.StepResponse:
    """One Step (or one message of StreamSteps) of `session_id`: find the session, validate, run, reply.
    `reply_limited`: the reply must fit in one gRPC message (checked before the step)."""
    record = await dataplane.session(session_id)
    spec = dataplane.pinned(record)
    inputs = step_inputs(dataplane, spec, request)
    want = wanted(request)
    if reply_limited and want is not None:
        check_reply(dataplane, spec, len(inputs), want)
    result = await dataplane.step(record, inputs, expected_position=expected_position(request), timeout=timeout,
                                  gates=want is not None and want.gates)
    return fill_response(pb.StepResponse(), session_id, spec, want, result)


def initial_state(request: pb.OpenSessionRequest) -> InitialState | None:
    if not request.HasField("initial_state"):
        return None
    s = request.initial_state
    return InitialState(s.model, s.num_layers, s.hidden_size, s.h, s.c, s.position, s.model_version)


async def list_models(dataplane: DataPlane) -> pb.ListModelsResponse:
    """One ModelInfo per model, describing its default version, with every loaded version's state and sessions."""
    registry = dataplane.registry
    by_model: dict[str, list[tuple[ModelVersion, int]]] = {}
    for version, live in await dataplane.model_versions():
        by_model.setdefault(version.name, []).append((version, live))
    models = []
    for name, versions in by_model.items():
        described = registry.default_version(name) or versions[-1][0]
        spec = described.spec
        models.append(pb.ModelInfo(
            name=name, input_kind=spec.input_kind, vocab_size=spec.vocab_size, feature_size=spec.feature_size,
            num_layers=spec.num_layers, hidden_size=spec.hidden_size, metadata=spec.metadata,
            is_default=name == registry.default, output_name=spec.output_name,
            gates=described.engine.glass_box is not None, version=spec.version,
            versions=[version_message(version, live) for version, live in versions]))
    return pb.ListModelsResponse(models=models, default_model=registry.default)


def version_message(version: ModelVersion, live: int) -> pb.ModelVersion:
    return pb.ModelVersion(version=version.version, state=version.state, live_sessions=live)


def model_status(dataplane: DataPlane, change: Change) -> pb.ModelStatus:
    """A model's loaded versions after a LoadModel or UnloadModel."""
    return pb.ModelStatus(model=change.name, versions=[
        version_message(version, dataplane.control.live_sessions(version.key))
        for version in dataplane.registry.of(change.name)])


def fill_status(status: pb.Status, error: CellstreamError) -> None:
    status.code = error.code.value[0]
    status.message = error.message


async def generate(dataplane: DataPlane, request: pb.GenerateRequest, timeout: float | None,
                   reply_limited: bool = False) -> AsyncIterator[GeneratedChunk]:
    """The chunks of one chat turn: find the session, validate the prompt, then sample. `reply_limited`: each
    chunk must fit in one gRPC message (checked before the prompt is fed)."""
    record = await dataplane.session(request.session_id)
    spec = dataplane.pinned(record)
    prompt = dataplane.text_input(spec, request.prompt, "prompt")
    chunks = dataplane.generate(
        record, prompt, max_tokens=request.max_tokens, temperature=request.temperature, top_k=request.top_k,
        seed=request.seed if request.HasField("seed") else None, stop=list(request.stop), timeout=timeout,
        gates=request.gates, reply_limited=reply_limited,
    )
    async for chunk in chunks:
        yield chunk


def fill_chunk(message: pb.GenerateChunk, chunk: GeneratedChunk) -> pb.GenerateChunk:
    message.text, message.position = chunk.text, chunk.position
    message.tokens.extend(chunk.tokens)
    message.done, message.finish_reason = bool(chunk.finish_reason), chunk.finish_reason
    if chunk.gates is not None:
        fill_gates(message.gates, chunk.gates)
    return message
