"""Regenerates the Python protobuf modules from fcp_server/protos/*.proto.

Run `python tools/gen_protos.py` after editing a .proto file; a unit test fails while the
checked-in *_pb2.py / *_pb2.pyi files differ from what this produces.
"""

from __future__ import annotations

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "fcp_server" / "protos"


def proto_files() -> list[pathlib.Path]:
    """The .proto sources, in a stable order."""
    return sorted(PROTO_DIR.glob("*.proto"))


def generate(out_root: pathlib.Path) -> list[pathlib.Path]:
    """Runs protoc (from grpcio-tools) into out_root and returns the files it wrote."""
    import importlib.resources

    from grpc_tools import protoc

    include = str(importlib.resources.files("grpc_tools") / "_proto")
    sources = [str(p.relative_to(ROOT)) for p in proto_files()]
    args = [
        "protoc",
        f"-I{ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        *sources,
    ]
    code = protoc.main(args)
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code}")
    rel = PROTO_DIR.relative_to(ROOT)
    return sorted((out_root / rel).glob("*_pb2.py*"))


def main() -> int:
    """Writes the generated modules next to their .proto files."""
    written = generate(ROOT)
    for path in written:
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
