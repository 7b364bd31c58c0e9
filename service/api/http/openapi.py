"""The HTTP API's OpenAPI 3.1 document, made from the routes and the protobuf descriptors themselves, so
the native JSON schemas cannot drift from the .proto (one definition for gRPC, JSON and the document)."""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from cellstream.service._proto.cellstream.v1 import inference_pb2
from cellstream.service.api.http.endpoint import TIMEOUT_HEADER, Api
from cellstream.service.api.kserve import SERVER_VERSION

SCALARS: dict[int, dict[str, Any]] = {
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "contentEncoding": "base64"},
    FieldDescriptor.TYPE_FLOAT: {"type": "number"},
    FieldDescriptor.TYPE_DOUBLE: {"type": "number"},
    FieldDescriptor.TYPE_INT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_SINT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_UINT32: {"type": "integer", "format": "uint32", "minimum": 0},
    # The JSON mapping writes 64-bit integers as strings and reads either.
    FieldDescriptor.TYPE_INT64: {"type": ["string", "integer"], "format": "int64"},
    FieldDescriptor.TYPE_SINT64: {"type": ["string", "integer"], "format": "int64"},
    FieldDescriptor.TYPE_UINT64: {"type": ["string", "integer"], "format": "uint64"},
}
WELL_KNOWN = {"google.protobuf.Timestamp": {"type": "string", "format": "date-time"}}

_TENSOR = {"type": "object", "required": ["name", "datatype", "shape"], "properties": {
    "name": {"type": "string"}, "datatype": {"type": "string", "enum": ["INT64", "FP32"]},
    "shape": {"type": "array", "items": {"type": "integer"}},
    "parameters": {"$ref": "#/components/schemas/Parameters"},
    "data": {"type": "array", "description": "row-major values, flat or nested; absent with binary_data_size"},
}}
_METADATA_TENSOR = {"type": "object", "properties": {"name": {"type": "string"}, "datatype": {"type": "string"},
                                                     "shape": {"type": "array", "items": {"type": "integer"}}}}
KSERVE = {
    "Parameters": {"type": "object", "additionalProperties": {"type": ["boolean", "number", "string"]},
                   "description": "sequence_id (int or string), sequence_start, sequence_end, timeout (µs), "
                                  "priority, binary_data_output; on a tensor binary_data_size or binary_data"},
    "InferenceRequest": {"type": "object", "required": ["inputs"], "properties": {
        "id": {"type": "string"}, "parameters": {"$ref": "#/components/schemas/Parameters"},
        "inputs": {"type": "array", "items": _TENSOR},
        "outputs": {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string"}, "parameters": {"$ref": "#/components/schemas/Parameters"}}}},
    }, "description": "Triton's binary tensor data extension: the header Inference-Header-Content-Length gives "
                      "this JSON's byte length; the inputs' bytes follow it, little-endian"},
    "InferenceResponse": {"type": "object", "properties": {
        "model_name": {"type": "string"}, "model_version": {"type": "string"}, "id": {"type": "string"},
        "outputs": {"type": "array", "items": _TENSOR}}},
    "ServerLive": {"type": "object", "properties": {"live": {"type": "boolean"}}},
    "ServerReady": {"type": "object", "properties": {"ready": {"type": "boolean"}}},
    "ModelReady": {"type": "object", "properties": {"name": {"type": "string"}, "ready": {"type": "boolean"}}},
    "ServerMetadata": {"type": "object", "properties": {
        "name": {"type": "string"}, "version": {"type": "string"},
        "extensions": {"type": "array", "items": {"type": "string"}}}},
    "ModelMetadata": {"type": "object", "properties": {
        "name": {"type": "string"}, "versions": {"type": "array", "items": {"type": "string"}},
        "platform": {"type": "string"}, "inputs": {"type": "array", "items": _METADATA_TENSOR},
        "outputs": {"type": "array", "items": _METADATA_TENSOR}}},
    "RepositoryIndexRequest": {"type": "object", "properties": {"ready": {"type": "boolean"}}},
    "RepositoryIndex": {"type": "array", "items": {"type": "object", "properties": {
        "name": {"type": "string"}, "version": {"type": "string"},
        "state": {"type": "string", "enum": ["READY", "DRAINING", "UNAVAILABLE"]}, "reason": {"type": "string"}}}},
    "RepositoryRequest": {"type": "object", "properties": {"parameters": {
        "$ref": "#/components/schemas/Parameters"}}},
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
}
ERRORS = {"400": "invalid request: the message names the field and the rule", "401": "missing or unknown token",
          "403": "the token lacks the scope the call needs (admin: the model repository)",
          "404": "unknown model, session or route", "409": "expected_position: the session moved",
          "413": "body larger than max_message_bytes", "429": "overloaded or queue full: retry with backoff",
          "503": "not ready: models loading, store down or shutting down", "504": "deadline exceeded"}


def _field(field: FieldDescriptor, messages: dict[str, Descriptor]) -> dict[str, Any]:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        value = field.message_type.fields_by_name["value"]
        return {"type": "object", "additionalProperties": _field(value, messages)}
    if field.message_type is not None:
        name = field.message_type.full_name
        if name in WELL_KNOWN:
            schema = dict(WELL_KNOWN[name])
        else:
            messages[name] = field.message_type
            schema = {"$ref": f"#/components/schemas/{name}"}
    elif field.enum_type is not None:
        schema = {"type": "string", "enum": [v.name for v in field.enum_type.values]}
    else:
        schema = dict(SCALARS[field.type])
    if field.is_repeated:
        return {"type": "array", "items": schema}
    return schema


def _message(descriptor: Descriptor, messages: dict[str, Descriptor]) -> dict[str, Any]:
    properties = {}
    for field in descriptor.fields:
        schema = _field(field, messages)
        oneof = field.containing_oneof
        if oneof is not None and not oneof.name.startswith("_"):  # "_x": proto3 `optional`, not a choice
            schema = {**schema, "description": f"one of {', '.join(f.name for f in oneof.fields)}"}
        properties[field.name] = schema
    return {"type": "object", "properties": properties}


def _content(schema: str, events: bool = False) -> dict[str, Any]:
    media = "text/event-stream" if events else "application/json"
    return {media: {"schema": {"$ref": f"#/components/schemas/{schema}"}}}


def document(apis: list[Api]) -> dict[str, Any]:
    pool = inference_pb2.DESCRIPTOR.pool
    messages: dict[str, Descriptor] = {}
    paths: dict[str, dict[str, Any]] = {}
    for api in apis:
        operation: dict[str, Any] = {"summary": api.summary, "responses": {
            "200": {"description": "OK", "content": _content(api.reply, api.events)} if api.reply else
            {"description": "OK"},
            **{code: {"description": words, "content": _content("Error")} for code, words in ERRORS.items()},
        }}
        if not api.open:
            operation["security"] = [{"bearer": []}]
            operation["parameters"] = [{"name": TIMEOUT_HEADER, "in": "header", "required": False,
                                        "schema": {"type": "number"}, "description": "deadline, milliseconds"}]
        params = [p.strip("{}") for p in api.path.split("/") if p.startswith("{")]
        operation.setdefault("parameters", []).extend(
            {"name": p, "in": "path", "required": True, "schema": {"type": "string"}} for p in params)
        if api.request:
            operation["requestBody"] = {"content": _content(api.request)}
        paths.setdefault(api.path, {})[api.method.lower()] = operation
        for name in (api.request, api.reply):
            if name and name not in KSERVE:
                messages[name] = pool.FindMessageTypeByName(name)
    schemas: dict[str, Any] = dict(KSERVE)
    while len(schemas) < len(KSERVE) + len(messages):  # a message's fields may name more messages
        for name, descriptor in list(messages.items()):
            if name not in schemas:
                schemas[name] = _message(descriptor, messages)
    return {
        "openapi": "3.1.0",
        "info": {"title": "cellstream HTTP API", "version": SERVER_VERSION,
                 "description": "KServe v2 REST (Open Inference Protocol) and the native cellstream.v1 sessions "
                                f"as JSON ({inference_pb2.DESCRIPTOR.name}); see docs/API.md"},
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
