"""Generate the protobuf/gRPC stubs under service/_proto from protos/ (`make protos`).

The generated modules import each other as top-level packages (`from cellstream.v1 import ...`);
they are rewritten to live under `cellstream.service._proto` so the stubs need no sys.path tricks.

The Open Inference Protocol messages (`protos/inference/`) are registered in a descriptor pool of
their own instead of protobuf's default one: tritonclient (like any client generated from the
protocol) registers the same `inference.*` names there from its own copy, and two files defining
one symbol in one pool fail at import, so a process could not load both the server and such a client.
"""

from __future__ import annotations

import re
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
OUT_DIR = ROOT / "service" / "_proto"
PACKAGE = "cellstream.service._proto"
# protoc's `from cellstream.v1 import ...`, not one already under PACKAGE (itself a `cellstream.` name).
_IMPORT = re.compile(rf"^from (?!{re.escape(PACKAGE)}\.)((?:cellstream|inference)[\w.]*) import", re.MULTILINE)
_DEFAULT_POOL = "_descriptor_pool.Default()"
PRIVATE_POOL_PACKAGES = ("inference",)


def generate(out_dir: Path = OUT_DIR) -> list[Path]:
    """Write the stubs for every .proto under protos/ into `out_dir`; returns the files written."""
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    include = str(resources.files("grpc_tools") / "_proto")
    out_dir.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", *protos]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {protos}")
    written = []
    for path in sorted(out_dir.rglob("*.py*")):
        if path.suffix not in (".py", ".pyi"):
            continue
        text = _IMPORT.sub(lambda m: f"from {PACKAGE}.{m.group(1)} import", path.read_text())
        if path.relative_to(out_dir).parts[0] in PRIVATE_POOL_PACKAGES:
            text = text.replace(_DEFAULT_POOL, "_descriptor_pool.DescriptorPool()")
        path.write_text(text)
        written.append(path)
    for folder in [out_dir, *(p for p in out_dir.rglob("*") if p.is_dir())]:
        init = folder / "__init__.py"
        if not init.exists():
            init.write_text("")
            written.append(init)
    return written


if __name__ == "__main__":
    for path in generate():
        print(path.relative_to(ROOT))
    sys.exit(0)
