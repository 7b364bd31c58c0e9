"""Open Inference Protocol messages ⇄ arrays: a model's tensor signature, the request's inputs,
requested outputs and parameters (validated, every message naming the tensor or parameter), and
the response tensors.

Tensors follow the ONNX graph: tokens (B, T) INT64 or features (B, T, F) FP32, optional client-held
state h0, c0 (L, B, H) FP32; outputs the model's own (B, T, V) FP32 (`logits`, or what a features model
names it, e.g. `forecast`), hn, cn (L, B, H) FP32.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from cellstream.service._proto.inference import grpc_service_pb2 as pb
from cellstream.service.batcher import StepInputs
from cellstream.service.dataplane import DataPlane
from cellstream.service.engine import TOKENS, ModelSpec
from cellstream.service.errors import InvalidArgument
from cellstream.service.sequences import SequenceId

# Datatypes our models use: the little-endian numpy type of raw data and the typed `contents` field.
DATATYPES = {"INT64": (np.dtype("<i8"), "int64_contents"), "FP32": (np.dtype("<f4"), "fp32_contents")}
STATE_INPUTS = ("h0", "c0")
MAX_SEQUENCE_ID_CHARS = 256  # a string id is a store key: keep it small
# Tensor parameters that would change what the data means, from extensions cellstream does not have.
UNSUPPORTED_TENSOR_PARAMETERS = {
    "shared_memory_region": "the shared-memory extensions are not supported; send the data in the request",
    "classification": "the classification extension is not supported; request the logits",
}


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1: any size
    axes: str  # what each dimension means, for error messages

    def metadata(self) -> pb.ModelMetadataResponse.TensorMetadata:
        return pb.ModelMetadataResponse.TensorMetadata(name=self.name, datatype=self.datatype, shape=self.shape)


@dataclass(frozen=True)
class Signature:
    main: str  # the sequence input: "tokens" or "features"
    inputs: dict[str, Tensor]
    outputs: dict[str, Tensor]


_signatures: dict[tuple[object, ...], Signature] = {}


def signature(spec: ModelSpec) -> Signature:
    """The model's tensors as the protocol shows them (ModelMetadata) and checks them; built once per model
    (every request reads it)."""
    key = (spec.name, spec.input_kind, spec.feature_size, spec.vocab_size, spec.output_name, spec.state_shape)
    found = _signatures.get(key)
    if found is None:
        found = _signatures[key] = _signature(spec)
    return found


def _signature(spec: ModelSpec) -> Signature:
    layers, hidden = spec.state_shape
    if spec.input_kind == TOKENS:
        main = Tensor("tokens", "INT64", (-1, -1), "(batch, time)")
    else:
        main = Tensor("features", "FP32", (-1, -1, spec.feature_size), "(batch, time, features)")
    state = [Tensor(name, "FP32", (layers, -1, hidden), "(layers, batch, hidden)") for name in STATE_INPUTS]
    outputs = [
        Tensor(spec.output_name, "FP32", (-1, -1, spec.vocab_size), "(batch, time, outputs)"),
        *(Tensor(name, "FP32", (layers, -1, hidden), "(layers, batch, hidden)") for name in ("hn", "cn")),
    ]
    return Signature(main.name, {t.name: t for t in (main, *state)}, {t.name: t for t in outputs})


# --- parameters ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """The request parameters cellstream acts on; others are ignored, as the protocol allows."""

    sequence_id: SequenceId | None
    start: bool
    end: bool
    timeout_us: int  # 0: none

    def timeout(self, remaining: float | None) -> float | None:
        """Seconds this request may wait for compute: the sooner of `timeout` and the gRPC deadline."""
        if not self.timeout_us:
            return remaining
        own = self.timeout_us / 1e6
        return own if remaining is None else min(own, remaining)


NO_OPTIONS = Options(None, False, False, 0)


def _choice(param: pb.InferParameter) -> str | None:
    return param.WhichOneof("parameter_choice")


def _sequence_id(param: pb.InferParameter | None) -> SequenceId | None:
    if param is None:
        return None
    kind = _choice(param)
    if kind == "string_param":
        if len(param.string_param) > MAX_SEQUENCE_ID_CHARS:
            raise InvalidArgument(f"parameter 'sequence_id' has {len(param.string_param)} characters; "
                                  f"string ids are limited to {MAX_SEQUENCE_ID_CHARS}")
        return param.string_param or None
    if kind in ("int64_param", "uint64_param"):
        return getattr(param, kind) or None
    raise InvalidArgument(f"parameter 'sequence_id' must be an int64 or a string (0 or '': none), got {kind}")


def _flag(params: Mapping[str, pb.InferParameter], key: str) -> bool:
    param = params.get(key)
    if param is None:
        return False
    if not param.HasField("bool_param"):  # cheaper than naming the choice, which only the message needs
        raise InvalidArgument(f"parameter {key!r} must be a bool, got {_choice(param)}")
    return param.bool_param


def _count(params: Mapping[str, pb.InferParameter], key: str, unit: str) -> int:
    param = params.get(key)
    if param is None:
        return 0
    kind = _choice(param)
    if kind not in ("int64_param", "uint64_param"):
        raise InvalidArgument(f"parameter {key!r} must be an int64 or uint64 ({unit}), got {kind}")
    value = getattr(param, kind)
    if value < 0:
        raise InvalidArgument(f"parameter {key!r} is {value}; it must be >= 0 ({unit})")
    return value


def read_options(request: pb.ModelInferRequest) -> Options:
    params = request.parameters
    if not params:  # a stateless request of a client that sets no parameter
        return NO_OPTIONS
    sequence_id = _sequence_id(params.get("sequence_id"))
    start, end = _flag(params, "sequence_start"), _flag(params, "sequence_end")
    if sequence_id is None and (start or end):
        raise InvalidArgument("sequence_start or sequence_end is set but sequence_id is absent, 0 or ''; "
                              "the flags need a sequence id")
    # Checked, then ignored: the batcher serves the oldest waiting step first, whatever its priority.
    _count(params, "priority", "1 is the highest; 0: default")
    return Options(sequence_id, start, end, _count(params, "timeout", "microseconds"))


# --- inputs -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Inputs:
    name: str  # of the sequence input, for messages
    shape: tuple[int, ...]  # of the sequence input: (B, T) or (B, T, F)
    # Its rows, validated as a native step's input: token ids as lists (the batcher makes one array of the
    # whole batch), or (T, F) float32 arrays of features.
    rows: list[StepInputs]
    state: tuple[np.ndarray, np.ndarray] | None  # client-held h0, c0 (L, B, H), finite

    def sequence_row(self, sequence_id: SequenceId) -> StepInputs:
        """The one row a sequence request may carry."""
        if len(self.rows) != 1:
            raise InvalidArgument(
                f"sequence requests must have batch size 1: input {self.name!r} has batch size {len(self.rows)} "
                f"(shape {list(self.shape)}); send each sequence in its own requests, or drop sequence_id "
                "for a stateless batch"
            )
        if self.state is not None:
            raise InvalidArgument(
                f"inputs h0/c0 carry client-held state and cannot come with sequence_id {sequence_id!r}: the "
                "server holds a sequence's state (drop sequence_id to hold the state yourself)"
            )
        return self.rows[0]


def _check_parameters(what: str, params: Mapping[str, pb.InferParameter]) -> None:
    for key, reason in UNSUPPORTED_TENSOR_PARAMETERS.items():
        if key in params:
            raise InvalidArgument(f"{what} has parameter {key!r}: {reason}")


def _check_shape(name: str, shape: list[int], expected: Tensor, model: str) -> None:
    # A loop, not all() over zip(): this runs for every request, and a generator costs more than the check.
    fits = len(shape) == len(expected.shape)
    if fits:
        for size, want in zip(shape, expected.shape, strict=True):
            if size < 0 or (want != -1 and want != size):
                fits = False
                break
    if not fits:
        raise InvalidArgument(f"input {name!r} has shape {list(shape)}; model {model!r} takes "
                              f"{list(expected.shape)} {expected.axes}, -1 meaning any size")


def _data(tensor: pb.ModelInferRequest.InferInputTensor, name: str, datatype: str, raw: bytes | None,
          shape: list[int]) -> np.ndarray:
    dtype, field = DATATYPES[datatype]
    count = math.prod(shape)
    if raw is not None:
        if tensor.HasField("contents"):
            raise InvalidArgument(f"input {name!r} has both contents and raw_input_contents; send one")
        if len(raw) != count * dtype.itemsize:
            raise InvalidArgument(f"input {name!r} has {len(raw)} bytes in raw_input_contents; shape "
                                  f"{list(shape)} of {datatype} needs {count * dtype.itemsize}")
        return np.frombuffer(raw, dtype).reshape(shape)
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise InvalidArgument(f"input {name!r} has {len(values)} values in contents.{field}; shape "
                              f"{list(shape)} needs {count}")
    return np.asarray(values, dtype).reshape(shape)


def _arrays(request: pb.ModelInferRequest, model: str, sig: Signature) -> dict[str, np.ndarray]:
    """Each input as an array of the datatype and shape the model takes."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
                              "send one per input, in the order of inputs")
    arrays: dict[str, np.ndarray] = {}
    # Each field is read once: every read of a protobuf field builds a new Python object.
    for index, tensor in enumerate(request.inputs):
        name = tensor.name
        expected = sig.inputs.get(name)
        if expected is None:
            raise InvalidArgument(f"unknown input {name!r} for model {model!r}; its inputs are "
                                  f"{', '.join(sig.inputs)}")
        if name in arrays:
            raise InvalidArgument(f"input {name!r} is given twice")
        params = tensor.parameters
        if params:
            _check_parameters(f"input {name!r}", params)
        datatype = tensor.datatype
        if datatype != expected.datatype:
            raise InvalidArgument(f"input {name!r} has datatype {datatype!r}; model {model!r} takes "
                                  f"{expected.datatype} (see ModelMetadata)")
        shape = tensor.shape[:]  # a slice makes the list at a third of tuple()'s cost
        _check_shape(name, shape, expected, model)
        arrays[name] = _data(tensor, name, datatype, raw[index] if raw else None, shape)
    return arrays


def _rows(spec: ModelSpec, dataplane: DataPlane, name: str, main: np.ndarray) -> list[StepInputs]:
    """The sequence input's rows, each checked as a native step's input would be."""
    batch = len(main)
    if batch == 0:
        raise InvalidArgument(f"input {name!r} has batch size 0 (shape {list(main.shape)}); send at least one row")
    limit = dataplane.settings.max_batch_size
    if batch > limit:
        raise InvalidArgument(f"input {name!r} has batch size {batch}, more than max_batch_size ({limit})")
    if spec.input_kind == TOKENS:
        # One tolist() for the whole input: a list per row from numpy costs more than checking it.
        return [dataplane.tokens_input(spec, row, f"{name}[{b}]") for b, row in enumerate(main.tolist())]
    return [dataplane.features_input(spec, row.reshape(-1), spec.feature_size, f"{name}[{b}]")
            for b, row in enumerate(main)]


def _state(arrays: dict[str, np.ndarray], name: str, batch: int) -> tuple[np.ndarray, np.ndarray] | None:
    present = [n for n in STATE_INPUTS if n in arrays]
    if not present:
        return None
    if len(present) == 1:
        missing = next(n for n in STATE_INPUTS if n not in arrays)
        raise InvalidArgument(f"input {present[0]!r} without {missing!r}: send both (client-held state) or "
                              "neither (zero state)")
    for state in STATE_INPUTS:
        array = arrays[state]
        if array.shape[1] != batch:
            raise InvalidArgument(f"input {state!r} has batch size {array.shape[1]} (dimension 1 of "
                                  f"{list(array.shape)}) but {name!r} has batch size {batch}")
        if not np.isfinite(array).all():
            raise InvalidArgument(f"input {state!r} has NaN or Inf values; a state must be finite")
    return arrays["h0"], arrays["c0"]


def read_inputs(request: pb.ModelInferRequest, spec: ModelSpec, dataplane: DataPlane) -> Inputs:
    sig = signature(spec)
    arrays = _arrays(request, spec.name, sig)
    if sig.main not in arrays:
        main = sig.inputs[sig.main]
        raise InvalidArgument(f"missing input {main.name!r} ({main.datatype} {list(main.shape)} {main.axes}) "
                              f"for model {spec.name!r}; h0 and c0 are optional")
    main = arrays[sig.main]
    return Inputs(sig.main, main.shape, _rows(spec, dataplane, sig.main, main), _state(arrays, sig.main, len(main)))


# --- outputs ------------------------------------------------------------------------------------


def requested_outputs(request: pb.ModelInferRequest, spec: ModelSpec) -> list[str]:
    """Names of the outputs to send back, in request order; when none is named, the model's own output (the
    state only on request: it is large, and useless unless carried)."""
    sig = signature(spec)
    names: list[str] = []
    for output in request.outputs:
        name = output.name
        if name not in sig.outputs:
            raise InvalidArgument(f"unknown output {name!r} for model {spec.name!r}; its outputs are "
                                  f"{', '.join(sig.outputs)}")
        if name in names:
            raise InvalidArgument(f"output {name!r} is requested twice")
        params = output.parameters
        if params:
            _check_parameters(f"output {name!r}", params)
        names.append(name)
    return names or [spec.output_name]


def write_outputs(response: pb.ModelInferResponse, names: list[str], arrays: Mapping[str, np.ndarray]) -> None:
    """Append the named FP32 arrays as output tensors with little-endian raw data."""
    for name in names:
        array = np.ascontiguousarray(arrays[name], dtype="<f4")
        response.outputs.add(name=name, datatype="FP32", shape=array.shape)
        response.raw_output_contents.append(array.tobytes())
