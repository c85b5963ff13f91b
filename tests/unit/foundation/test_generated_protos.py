"""The checked-in *_pb2 modules must be exactly what tools/gen_protos.py generates."""

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[3]


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "tools" / "gen_protos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_not_stale(tmp_path: pathlib.Path) -> None:
    gen = _load_generator()
    fresh = gen.generate(tmp_path)
    assert fresh, "protoc produced no files"
    rel_dir = gen.PROTO_DIR.relative_to(ROOT)
    fresh_names = {p.name for p in fresh}
    checked_in = {p.name for p in (ROOT / rel_dir).glob("*_pb2.py*")}
    assert fresh_names == checked_in, "run `python tools/gen_protos.py` (files added/removed)"
    stale = [
        name
        for name in sorted(fresh_names)
        if (tmp_path / rel_dir / name).read_bytes() != (ROOT / rel_dir / name).read_bytes()
    ]
    assert not stale, f"stale generated files, run `python tools/gen_protos.py`: {stale}"


def test_every_proto_has_generated_module() -> None:
    gen = _load_generator()
    for proto in gen.proto_files():
        assert (proto.parent / f"{proto.stem}_pb2.py").exists(), proto.name
