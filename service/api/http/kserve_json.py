"""KServe v2 REST bodies ⇄ the Open Inference Protocol's messages.

A JSON inference request (with Triton's binary tensor data extension: a JSON header of
`Inference-Header-Content-Length` bytes, then the tensors' bytes) becomes the ModelInferRequest the gRPC
face would have received, so kserve_codec checks it with the same rules and words; here only what JSON
itself can get wrong is checked. The ModelInferResponse becomes JSON, each output as `data` or as binary
data where the request asked (`binary_data`, `binary_data_output`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cellstream.service._proto.inference import grpc_service_pb2 as pb
from cellstream.service.api.http.endpoint import parse_object
from cellstream.service.api.http.errors import JSON, HttpError
from cellstream.service.api.kserve_codec import DATATYPES

BINARY_HEADER = "inference-header-content-length"
OCTETS = "application/octet-stream"
INT64 = (-(2**63), 2**63 - 1)
UINT64_MAX = 2**64 - 1
TEXT_LIMIT = 40  # characters of a client's value quoted back in a message


@dataclass(frozen=True)
class OutputFormat:
    """Which outputs go back as binary data: by name where the request said, else `default`."""

    default: bool = False
    by_name: dict[str, bool] = field(default_factory=dict)

    def binary(self, name: str) -> bool:
        return self.by_name.get(name, self.default)


def _quote(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= TEXT_LIMIT else text[:TEXT_LIMIT] + "..."


def _object(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise HttpError(400, f"{what} must be a JSON object, got {_quote(value)}")
    return value


def _string(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise HttpError(400, f"{what} must be a string, got {_quote(value)}")
    return value


def _int(value: object, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise HttpError(400, f"{what} must be an integer in [{low}, {high}], got {_quote(value)}")
    return value


def _set_parameter(param: pb.InferParameter, value: object, what: str) -> None:
    if isinstance(value, bool):
        param.bool_param = value
    elif isinstance(value, int) and INT64[0] <= value <= INT64[1]:
        param.int64_param = value
    elif isinstance(value, int) and 0 <= value <= UINT64_MAX:
        param.uint64_param = value
    elif isinstance(value, float):
        param.double_param = value
    elif isinstance(value, str):
        param.string_param = value
    else:
        raise HttpError(400, f"{what} is {_quote(value)}; a parameter is a bool, a string or a number "
                             "(integers within int64 or uint64)")


def _parameters(target: Any, value: object, what: str, *, take: str = "") -> object:
    """Copy the JSON parameters into `target` (a parameters map); returns the value of `take`, left out."""
    taken = None
    for key, item in _object(value, what).items():
        if key == take:
            taken = item
        else:
            _set_parameter(target[key], item, f"{what} {key!r}")
    return taken


def _flat(data: object, name: str) -> list[Any]:
    """The values of `data`, nested lists flattened in row-major order (Triton accepts both)."""
    if not isinstance(data, list):
        raise HttpError(400, f"input {name!r} data must be a JSON array, got {_quote(data)}")
    values: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            values.append(item)
        else:
            stack.pop()
    return values


def _typed(values: list[Any], name: str, datatype: str) -> list[Any]:
    """`values` checked against the datatype's JSON form: integers for INT64, numbers for FP32."""
    if datatype == "INT64":
        for k, v in enumerate(values):
            if isinstance(v, bool) or not isinstance(v, int) or not INT64[0] <= v <= INT64[1]:
                raise HttpError(400, f"input {name!r} data[{k}] is {_quote(v)}; INT64 data are integers")
    else:
        for k, v in enumerate(values):
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise HttpError(400, f"input {name!r} data[{k}] is {_quote(v)}; {datatype} data are numbers")
    return values


def _shape(value: object, name: str) -> list[int]:
    if not isinstance(value, list):
        raise HttpError(400, f"input {name!r} shape must be an array of integers, got {_quote(value)}")
    return [_int(size, f"input {name!r} shape[{k}]", *INT64) for k, size in enumerate(value)]


def _binary_part(binary: memoryview, offset: int, size: object, name: str) -> bytes:
    count = _int(size, f"input {name!r} parameter 'binary_data_size'", 0, INT64[1])
    if offset + count > len(binary):
        raise HttpError(400, f"input {name!r} declares {count} bytes of binary data but only {len(binary) - offset} "
                             "are left after the JSON header (Inference-Header-Content-Length)")
    return bytes(binary[offset : offset + count])


def _split(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    if header_length is None:
        return body, memoryview(b"")
    if not header_length.isdigit() or int(header_length) > len(body):
        raise HttpError(400, f"header Inference-Header-Content-Length is {header_length[:TEXT_LIMIT]!r}; it must be "
                             f"the byte length of the JSON header, at most the body's {len(body)} bytes")
    size = int(header_length)
    return body[:size], memoryview(body)[size:]


def read_request(model: str, version: str, body: bytes, header_length: str | None
                 ) -> tuple[pb.ModelInferRequest, OutputFormat]:
    """The ModelInferRequest a REST body stands for, and how its outputs are to be sent back."""
    header, binary = _split(body, header_length)
    document = parse_object(header, "the inference request")
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    if "id" in document:
        request.id = _string(document["id"], "id")
    binary_output = _parameters(request.parameters, document.get("parameters", {}), "parameter",
                                take="binary_data_output")
    inputs = document.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise HttpError(400, 'the inference request needs "inputs": an array of tensors '
                             '({"name", "datatype", "shape", "data"}), see GET /v2/models/<model>')
    data: list[tuple[str, list[Any] | bytes]] = []
    offset = 0
    for k, value in enumerate(inputs):
        item = _object(value, f"inputs[{k}]")
        name = _string(item.get("name"), f"inputs[{k}].name")
        datatype = _string(item.get("datatype"), f"input {name!r} datatype")
        tensor = request.inputs.add(name=name, datatype=datatype, shape=_shape(item.get("shape"), name))
        size = _parameters(tensor.parameters, item.get("parameters", {}), f"input {name!r} parameter",
                           take="binary_data_size")
        if size is not None:
            if "data" in item:
                raise HttpError(400, f"input {name!r} has both \"data\" and binary_data_size; send one")
            part = _binary_part(binary, offset, size, name)
            offset += len(part)
            data.append((datatype, part))
        elif "data" in item:
            data.append((datatype, _flat(item["data"], name)))
        else:
            raise HttpError(400, f"input {name!r} has no \"data\" and no binary_data_size parameter")
    if offset != len(binary):
        raise HttpError(400, f"{len(binary) - offset} bytes of binary data follow the JSON header that no input "
                             "claims (binary_data_size)")
    _fill(request, data, bool(offset))
    return request, _outputs(request, document, binary_output)


def _fill(request: pb.ModelInferRequest, data: list[tuple[str, list[Any] | bytes]], raw: bool) -> None:
    """Typed contents when every input came as JSON; otherwise every input as raw bytes (the gRPC rule is
    all or none). A datatype the codec will refuse carries no data: it is refused before its data is read."""
    for tensor, (datatype, values) in zip(request.inputs, data, strict=True):
        if datatype not in DATATYPES:
            if raw:
                request.raw_input_contents.append(b"")
            continue
        dtype, contents = DATATYPES[datatype]
        if isinstance(values, bytes):
            request.raw_input_contents.append(values)
        elif raw:
            with np.errstate(over="ignore"):  # too large for FP32 becomes inf, which the codec refuses by name
                array = np.asarray(_typed(values, tensor.name, datatype), dtype)
            request.raw_input_contents.append(array.tobytes())
        else:
            getattr(tensor.contents, contents).extend(_typed(values, tensor.name, datatype))


def _outputs(request: pb.ModelInferRequest, document: dict[str, Any], binary_output: object) -> OutputFormat:
    if binary_output is not None and not isinstance(binary_output, bool):
        raise HttpError(400, f"parameter 'binary_data_output' must be a bool, got {_quote(binary_output)}")
    outputs = document.get("outputs", [])
    if not isinstance(outputs, list):
        raise HttpError(400, f'"outputs" must be an array of {{"name": ...}}, got {_quote(outputs)}')
    by_name: dict[str, bool] = {}
    for k, value in enumerate(outputs):
        item = _object(value, f"outputs[{k}]")
        name = _string(item.get("name"), f"outputs[{k}].name")
        tensor = request.outputs.add(name=name)
        binary = _parameters(tensor.parameters, item.get("parameters", {}), f"output {name!r} parameter",
                             take="binary_data")
        if binary is not None:
            if not isinstance(binary, bool):
                raise HttpError(400, f"output {name!r} parameter 'binary_data' must be a bool, got {_quote(binary)}")
            by_name[name] = binary
    return OutputFormat(bool(binary_output), by_name)


def write_response(response: pb.ModelInferResponse, fmt: OutputFormat) -> tuple[bytes, dict[str, str], str]:
    """(body, headers, media type) of the REST reply."""
    document: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        document["id"] = response.id
    outputs, parts = [], []
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if fmt.binary(tensor.name):
            entry["parameters"] = {"binary_data_size": len(raw)}
            parts.append(raw)
        else:
            entry["data"] = np.frombuffer(raw, DATATYPES[tensor.datatype][0]).tolist()
        outputs.append(entry)
    document["outputs"] = outputs
    header = json.dumps(document, separators=(",", ":")).encode()
    if not parts:
        return header + b"\n", {}, JSON
    return header + b"".join(parts), {"Inference-Header-Content-Length": str(len(header))}, OCTETS
