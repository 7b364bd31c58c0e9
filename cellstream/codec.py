"""cellstream.v1 messages ⇄ the client's arguments and results: requests filled in place (an item of the next
StepBatch, or a message of its own), replies read into the dataclasses of cellstream.results."""

from __future__ import annotations

import operator
from collections.abc import Sequence

import numpy as np

from cellstream.errors import InvalidArgument
from cellstream.results import GATE_NAMES, Chunk, Gates, ModelInfo, State, StepResult, TokenProb
from cellstream.service._proto.cellstream.v1 import inference_pb2 as pb

ITEM_FRAMING_BYTES = 48  # an item's tags, tag value, expected position, wanted outputs and length prefixes
VARINT_BYTES = 5  # the most a token id in the vocabulary's range takes
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1  # TokenSequence.ids are int32


class StepInput:
    """One step's input, checked and converted once (a retried step sends it again as it is)."""

    __slots__ = ("kind", "length", "value", "wire_bytes")

    def __init__(self, kind: str, value: list[int] | str | np.ndarray, length: int, wire_bytes: int) -> None:
        self.kind = kind  # the StepRequest field: "tokens", "text" or "features"
        self.value = value
        self.length = length  # steps it feeds: tokens, UTF-8 bytes (the byte tokenizer's ids) or feature vectors
        self.wire_bytes = wire_bytes  # about what it takes in a message

    def fill(self, request: pb.StepRequest) -> None:
        if self.kind == "tokens":
            request.tokens.ids.extend(self.value)  # type: ignore[arg-type]
        elif self.kind == "text":
            request.text = self.value  # type: ignore[assignment]
        else:
            array: np.ndarray = self.value  # type: ignore[assignment]
            request.features.values.extend(array.ravel().tolist())
            request.features.dim = array.shape[1]


def step_input(tokens: Sequence[int] | np.ndarray | None, text: str | None,
               features: np.ndarray | Sequence[Sequence[float]] | None) -> StepInput:
    """The one input of a step; InvalidArgument (raised before anything is sent) when not exactly one is given."""
    if tokens is not None and text is None and features is None:  # the common step: checked without detours
        ids = tokens.tolist() if isinstance(tokens, np.ndarray) else list(tokens)
        for token in ids:
            if type(token) is not int or not INT32_MIN <= token <= INT32_MAX:
                ids = _token_ids(ids)
                break
        return StepInput("tokens", ids, len(ids), VARINT_BYTES * len(ids))
    given = [name for name, value in (("tokens", tokens), ("text", text), ("features", features)) if value is not None]
    if len(given) != 1:
        raise InvalidArgument(f"a step takes exactly one of tokens, text or features; got {given or 'none'}")
    if text is not None:
        encoded = len(text.encode())
        return StepInput("text", text, encoded, encoded)
    array = np.asarray(features, dtype=np.float32)
    if array.ndim == 1:
        array = array[None]  # one feature vector: one step
    if array.ndim != 2:
        raise InvalidArgument(f"features must be (steps, features), got shape {array.shape}")
    return StepInput("features", array, array.shape[0], 4 * array.size)


def _token_ids(values: list[object]) -> list[int]:
    """Token ids as Python ints (from NumPy integers, say), or InvalidArgument."""
    try:
        ids = [operator.index(value) for value in values]  # type: ignore[call-overload]
    except TypeError:
        raise InvalidArgument(f"token ids must be integers, got {values[:8]!r}") from None
    if not INT32_MIN <= min(ids) <= max(ids) <= INT32_MAX:
        raise InvalidArgument(f"token ids must be 32-bit integers (the model's vocabulary is smaller still); "
                              f"got {min(ids)}..{max(ids)}")
    return ids


def outputs_wanted(*, logits: bool, top_k: int, all_steps: bool, state: bool, gates: bool) -> pb.Outputs | None:
    """The Outputs message of a step, or None when it asks for the position only (the server's cheap case)."""
    if not (logits or top_k or all_steps or state or gates):
        return None
    return pb.Outputs(logits=logits, top_k=top_k, all_steps=all_steps, state=state, gates=gates)


def fill_step(request: pb.StepRequest, session_id: str, step: StepInput, want: pb.Outputs | None,
              expected_position: int, tag: int = 0) -> pb.StepRequest:
    """Fill an empty StepRequest (a message of its own, or an item of a StepBatch) in place."""
    request.session_id = session_id
    request.expected_position = expected_position
    if tag:
        request.tag = tag
    step.fill(request)
    if want is not None:
        request.want.CopyFrom(want)
    return request


def item_bytes(session_id: str, step: StepInput) -> int:
    """About what an item takes in a StepBatch (messages are cut to stay within max_message_bytes)."""
    return ITEM_FRAMING_BYTES + len(session_id) + step.wire_bytes


def _floats(values: Sequence[float]) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


def state_of(message: pb.State) -> State:
    shape = (message.num_layers, message.hidden_size)
    return State(message.model, message.position, _floats(message.h).reshape(shape),
                 _floats(message.c).reshape(shape))


def state_message(state: State) -> pb.State:
    h, c = np.asarray(state.h, np.float32), np.asarray(state.c, np.float32)
    return pb.State(model=state.model, num_layers=h.shape[0], hidden_size=h.shape[1], position=state.position,
                    h=h.ravel().tolist(), c=c.ravel().tolist())


def gates_of(layers: Sequence[pb.LayerGates], steps: int) -> Gates | None:
    """Each gate as (layers, steps, hidden), from one LayerGates per layer (fields step-major)."""
    if not layers or not steps:
        return None
    return Gates(*(np.stack([_floats(getattr(layer, name)).reshape(steps, -1) for layer in layers])
                   for name in GATE_NAMES))


def step_result(response: pb.StepResponse, steps: int, want: pb.Outputs | None) -> StepResult:
    """A StepResponse as a StepResult; `steps`: how many the request fed (the rows of every-step outputs)."""
    if want is None:
        return StepResult(response.session_id, response.position)

    def values(field: Sequence[float]) -> np.ndarray | None:
        if not field:
            return None
        array = _floats(field)
        return array.reshape(steps, -1) if want.all_steps else array

    return StepResult(
        response.session_id, response.position, values(response.logits), values(response.outputs),
        tuple(TokenProb(t.token, t.prob, t.text) for t in response.top),
        state_of(response.state) if response.HasField("state") else None, gates_of(response.gates, steps))


def chunk_of(message: pb.GenerateChunk, fed: int) -> Chunk:
    """A GenerateChunk as a Chunk; `fed`: the steps its gates cover (the prompt's bytes too, in the first)."""
    return Chunk(message.text, tuple(message.tokens), message.position, message.done, message.finish_reason,
                 gates_of(message.gates, fed))


def generate_request(session_id: str, prompt: str, *, max_tokens: int, temperature: float, top_k: int,
                     seed: int | None, stop: Sequence[str], gates: bool) -> pb.GenerateRequest:
    return pb.GenerateRequest(session_id=session_id, prompt=prompt, max_tokens=max_tokens, temperature=temperature,
                              top_k=top_k, seed=seed, stop=list(stop), gates=gates)


def model_info_of(message: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(message.name, message.input_kind, message.vocab_size, message.feature_size,
                     message.num_layers, message.hidden_size, message.output_name, message.is_default,
                     message.gates, dict(message.metadata))
