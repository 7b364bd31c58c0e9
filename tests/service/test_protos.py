"""K. The committed stubs under service/_proto are exactly what protogen makes from protos/, and the
KServe ones match the public protocol on the wire."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cellstream.service
from cellstream.service import protogen

COMMITTED = Path(cellstream.service.__file__).resolve().parent / "_proto"


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }


def test_generated_stubs_match_the_committed_ones(tmp_path):
    out = tmp_path / "_proto"
    written = protogen.generate(out_dir=out)
    assert written, "protogen wrote nothing"
    fresh, committed = _files(out), _files(COMMITTED)
    assert sorted(fresh) == sorted(committed), "stub file lists differ: run `make protos`"
    for name, data in fresh.items():
        assert data == committed[name], f"{name} is stale: run `make protos`"
    assert "cellstream/v1/inference_pb2_grpc.py" in fresh
    stub = fresh["cellstream/v1/inference_pb2_grpc.py"]
    assert b"from cellstream.service._proto.cellstream.v1 import inference_pb2" in stub
    assert "inference/grpc_service_pb2_grpc.py" in fresh
    assert b"_descriptor_pool.DescriptorPool()" in fresh["inference/grpc_service_pb2.py"]


def _layout(message) -> dict:
    """What reaches the wire: each field by number (name, type, repeated, oneof, message type), nested too."""
    fields = {
        f.number: (f.name, f.type, f.is_repeated, f.containing_oneof and f.containing_oneof.name,
                   f.message_type and f.message_type.full_name)
        for f in message.fields
    }
    nested = {n.name: _layout(n) for n in message.nested_types}
    return {"fields": fields, "nested": nested}


def test_kserve_proto_is_wire_compatible_with_tritonclient():
    """Every message and RPC we define matches the public protocol as tritonclient ships it."""
    from tritonclient.grpc import service_pb2 as triton

    from cellstream.service._proto.inference import grpc_service_pb2 as ours

    assert ours.DESCRIPTOR.package == triton.DESCRIPTOR.package == "inference"
    for name, message in ours.DESCRIPTOR.message_types_by_name.items():
        assert _layout(message) == _layout(triton.DESCRIPTOR.message_types_by_name[name]), name
    service = ours.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = triton.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == theirs.full_name
    assert len(service.methods) == 10  # health, metadata, inference, and the model repository extension
    for method in service.methods:
        other = theirs.methods_by_name[method.name]
        assert (method.input_type.full_name, method.output_type.full_name, method.client_streaming,
                method.server_streaming) == (other.input_type.full_name, other.output_type.full_name,
                                             other.client_streaming, other.server_streaming), method.name


def test_server_and_tritonclient_load_in_one_process_in_either_order():
    """Both define `inference.*` messages; ours live in a pool of their own, so neither import breaks."""
    for modules in ("cellstream.service.server, tritonclient.grpc", "tritonclient.grpc, cellstream.service.server"):
        result = subprocess.run([sys.executable, "-c", f"import {modules}"], cwd=COMMITTED.parents[1],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
