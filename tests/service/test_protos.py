"""K. The committed stubs under service/_proto are exactly what protogen makes from protos/."""

from __future__ import annotations

from pathlib import Path

import service
from service import protogen

COMMITTED = Path(service.__file__).resolve().parent / "_proto"


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
    assert b"from service._proto.cellstream.v1 import inference_pb2" in fresh["cellstream/v1/inference_pb2_grpc.py"]
