"""Safetensors bytes <-> named numpy arrays, with every header field checked before use.

The format (https://github.com/huggingface/safetensors, spec in its README): an 8-byte
little-endian header length, a JSON header mapping each tensor name to its dtype, shape and
byte offsets (plus optional string metadata), then the tensors' bytes. Blobs may come from
devices, so the header is bounded and checked (size, length, duplicate keys, dtypes, ranks,
offsets that tile the data area exactly) before any array is made, and arrays are read-only
views into the blob, never copies. What the tensors must be for a plan is `checkpoints`' job.
"""

import dataclasses
import json
import math
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np
import safetensors.numpy

from fcp_server.aggregation.state import Tensor

MAX_HEADER_BYTES = 1 << 20  # 1 MiB of JSON describes thousands of tensors.
MAX_TENSORS = 10_000
MAX_RANK = 8
_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}  # fmt: skip
# The numpy dtype names a blob may hold.
SUPPORTED_DTYPES = frozenset(_DTYPES.values())
# The little-endian numpy dtype of each safetensors dtype, built once (numpy's constructors
# cost microseconds per call, and every tensor of every update needs one).
_NUMPY_DTYPES = {key: np.dtype(name).newbyteorder("<") for key, name in _DTYPES.items()}


def numpy_dtype(name: str) -> np.dtype[Any]:
    """Returns the little-endian numpy dtype of a safetensors dtype name ("F32", ...)."""
    return _NUMPY_DTYPES[name]


class CheckpointError(ValueError):
    """A safetensors blob is malformed or does not match the plan."""


def encode_tensors(
    tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None
) -> bytes:
    """Serialises named arrays (and optional string metadata) as safetensors bytes."""
    # np.asarray keeps 0-d arrays 0-d (np.ascontiguousarray would make them 1-d).
    arrays = {name: np.asarray(t, order="C") for name, t in tensors.items()}
    return bytes(safetensors.numpy.save(arrays, metadata=dict(metadata) if metadata else None))


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)  # a repeated key leaves fewer entries than pairs
    if len(result) != len(pairs):
        raise CheckpointError("Safetensors header has duplicate keys.")
    return result


@dataclasses.dataclass(frozen=True)
class Header:
    """A checked safetensors header: where the data starts, the tensor entries, metadata."""

    data_start: int
    entries: dict[str, Any]
    metadata: dict[str, str]


@dataclasses.dataclass(frozen=True)
class TensorView:
    """Where one array's elements are in a blob (as a checked header says)."""

    name: str
    dtype: np.dtype[Any]
    count: int
    offset: int  # from the blob's first byte
    shape: tuple[int, ...]


def tensor_views(header: Header) -> list[TensorView]:
    """The checked header's tensors, in its order."""
    views = []
    for name, info in header.entries.items():
        begin, end = info["data_offsets"]
        dtype = numpy_dtype(info["dtype"])
        count = (end - begin) // dtype.itemsize
        views.append(
            TensorView(name, dtype, count, header.data_start + begin, tuple(info["shape"]))
        )
    return views


def view_array(data: bytes | memoryview, view: TensorView) -> Tensor:
    """A read-only array over the blob's bytes of `view` (no copy)."""
    flat = np.frombuffer(data, dtype=view.dtype, count=view.count, offset=view.offset)
    flat.flags.writeable = False  # also for a view of a mutable buffer
    return flat.reshape(view.shape)


def header_end(data: bytes | memoryview, max_bytes: int) -> int:
    """Returns where the blob's data area starts (8 + the header length), bounds checked.

    Raises:
        CheckpointError: If the blob is over `max_bytes`, or too short for its header.
    """
    if len(data) > max_bytes:
        raise CheckpointError(f"Blob is {len(data)} bytes, the limit is {max_bytes}.")
    if len(data) < 8:
        raise CheckpointError("Blob is too short to be a safetensors file.")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > MAX_HEADER_BYTES or 8 + header_len > len(data):
        raise CheckpointError(f"Safetensors header length {header_len} is out of bounds.")
    return 8 + header_len


def parse_header(data: bytes | memoryview, max_bytes: int) -> Header:
    """Parses and checks the header: JSON, dtypes, shapes, offsets tiling the data area.

    Raises:
        CheckpointError: If the blob is too large, truncated or its header is malformed.
    """
    data_start = header_end(data, max_bytes)
    try:
        header = json.loads(bytes(data[8:data_start]), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"Safetensors header is not valid JSON: {e}") from e
    if not isinstance(header, dict):
        raise CheckpointError("Safetensors header is not a JSON object.")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError("Safetensors __metadata__ must map strings to strings.")
    if len(header) > MAX_TENSORS:
        raise CheckpointError(f"Blob has {len(header)} tensors, the limit is {MAX_TENSORS}.")
    for name, info in header.items():
        _check_entry(name, info)
    _check_layout(header, len(data) - data_start)
    return Header(data_start, header, metadata)


def _check_layout(entries: Mapping[str, Any], data_len: int) -> None:
    """The tensors must tile the data area exactly: no gap, no overlap, nothing after."""
    end = 0
    for begin, stop in sorted(tuple(info["data_offsets"]) for info in entries.values()):
        if begin != end:
            raise CheckpointError(
                "Malformed safetensors data: tensor offsets overlap or leave a gap."
            )
        end = stop
    if end != data_len:
        raise CheckpointError(
            f"Malformed safetensors data: the tensors cover {end} bytes of a {data_len}-byte "
            "data area."
        )


def _check_entry(name: str, info: Any) -> None:
    if not isinstance(info, dict) or info.get("dtype") not in _DTYPES:
        raise CheckpointError(f"Tensor {name!r} has an unsupported or missing dtype.")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not (isinstance(shape, list) and len(shape) <= MAX_RANK) or not all(
        isinstance(d, int) and d >= 0 for d in shape
    ):
        raise CheckpointError(f"Tensor {name!r} has an invalid shape {shape!r}.")
    if not (isinstance(offsets, list) and len(offsets) == 2) or not all(
        isinstance(o, int) and o >= 0 for o in offsets
    ):
        raise CheckpointError(f"Tensor {name!r} has invalid data offsets {offsets!r}.")
    nbytes = math.prod(shape) * numpy_dtype(info["dtype"]).itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise CheckpointError(f"Tensor {name!r} data size does not match its shape and dtype.")


def decode_tensors(
    data: bytes | memoryview, *, max_bytes: int
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Parses safetensors bytes after checking the header; returns (tensors, metadata).

    The arrays are read-only views into `data` (no copy: an update is read at memory speed
    by the aggregation). With `bytes` nothing can change them; a caller passing a mutable
    buffer must not write to it while the tensors are in use.

    Raises:
        CheckpointError: If the blob is too large, truncated or malformed.
    """
    header = parse_header(data, max_bytes)
    tensors = {v.name: view_array(data, v) for v in tensor_views(header)}
    return tensors, header.metadata


def check_tensors(
    tensors: Mapping[str, Tensor],
    specs: Mapping[str, tuple[tuple[int, ...], np.dtype[Any]]],
    error: type[CheckpointError],
    *,
    finite_checked: Collection[str] = (),
) -> None:
    """Checks that `tensors` are exactly `specs` (name -> shape, dtype) and finite.

    Args:
        tensors: Decoded tensors by name.
        specs: The expected shape and dtype of every name.
        error: The error to raise (a `CheckpointError` subclass).
        finite_checked: Names whose finiteness the caller checks itself.

    Raises:
        CheckpointError: `error`, naming the missing, unexpected, misshapen or non-finite tensor.
    """
    if tensors.keys() != specs.keys():  # as sets; the names are reported sorted
        missing = sorted(set(specs) - set(tensors))
        if missing:
            raise error(f"Missing tensors: {', '.join(missing[:10])}.")
        unexpected = sorted(set(tensors) - set(specs))
        raise error(f"Unexpected tensors: {', '.join(unexpected[:10])}.")
    for name, (shape, dtype) in specs.items():
        t = tensors[name]
        if t.shape != shape or t.dtype != dtype:
            raise error(
                f"Tensor {name!r} is {t.dtype}{list(t.shape)}, expected {dtype}{list(shape)}."
            )
        if name not in finite_checked:
            check_finite(name, t, error)


def check_finite(name: str, t: Tensor, error: type[CheckpointError]) -> None:
    """Raises `error` if a floating tensor holds a NaN or an infinity."""
    # Kinds "f" and "c" are np.inexact (an np.issubdtype call costs microseconds per tensor).
    if t.dtype.kind in "fc" and not np.all(np.isfinite(t)):
        raise error(f"Tensor {name!r} has NaN or infinite values.")
