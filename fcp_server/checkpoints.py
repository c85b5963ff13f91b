"""Safetensors codec for device updates and server/client checkpoints, validated against the plan.

Implements the layout fixed in the header of `fcp_server/protos/plan.proto` (no pickle, no
TensorFlow): model tensors "trainable/<i>" / "non_trainable/<i>"; a server checkpoint adds
"server_optimizer/<name>" and "aggregator/<name>" plus JSON metadata (the round number); a client
checkpoint holds the weights only; a device update holds "trainable/<i>" (initial - trained),
"num_examples" (int64 scalar) and "metric/<metric>/<k>". Safetensors is by Hugging Face
(https://github.com/huggingface/safetensors, format spec in its README).

Uploads are untrusted, so the header is checked before any tensor is materialised (size,
header length, duplicate keys, dtypes, shapes, offsets) and `decode_update` accepts exactly the
tensors the plan expects, all finite: a NaN/Inf update is rejected at upload with
`InvalidUpdate`, and aggregation still zeroes and counts any that slip through (as TFF does).
"""

import dataclasses
import json
import math
import types
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np
import safetensors.numpy

from fcp_server.aggregation import optimizers, update_norms
from fcp_server.aggregation.state import (
    ClientUpdate,
    MetadataValue,
    ModelWeights,
    ServerState,
    Tensor,
)
from fcp_server.protos import plan_pb2

__all__ = [
    "CheckpointError",
    "ClientUpdate",
    "InvalidUpdate",
    "ServerState",
    "UpdateLayout",
    "decode_client_checkpoint",
    "decode_server_checkpoint",
    "decode_tensors",
    "decode_update",
    "encode_client_checkpoint",
    "encode_server_checkpoint",
    "encode_tensors",
    "encode_update",
    "initial_server_state",
    "update_layout",
]

MAX_HEADER_BYTES = 1 << 20  # 1 MiB of JSON describes thousands of tensors.
MAX_TENSORS = 10_000
MAX_RANK = 8
DEFAULT_MAX_CHECKPOINT_BYTES = 1 << 31
DEFAULT_MAX_NUM_EXAMPLES = 10_000_000
NUM_EXAMPLES = "num_examples"
_OPT_PREFIX = optimizers.STATE_PREFIX
_AGG_PREFIX = "aggregator/"
_KIND_KEY = "fcp_kind"
_STATE_KEY = "fcp_state"
_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}  # fmt: skip
# The little-endian numpy dtype of each safetensors dtype, built once (numpy's constructors
# cost microseconds per call, and every tensor of every update needs one).
_NUMPY_DTYPES = {key: np.dtype(name).newbyteorder("<") for key, name in _DTYPES.items()}

Spec = tuple[tuple[int, ...], np.dtype[Any]]


class CheckpointError(ValueError):
    """A safetensors blob is malformed or does not match the plan."""


class InvalidUpdate(CheckpointError):
    """A device update is rejected; the message names the offending tensor."""


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
class _Header:
    """A checked safetensors header: where the data starts, the tensor entries, metadata."""

    data_start: int
    entries: dict[str, Any]
    metadata: dict[str, str]


def _check_header(data: bytes | memoryview, max_bytes: int) -> _Header:
    if len(data) > max_bytes:
        raise CheckpointError(f"Blob is {len(data)} bytes, the limit is {max_bytes}.")
    if len(data) < 8:
        raise CheckpointError("Blob is too short to be a safetensors file.")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > MAX_HEADER_BYTES or 8 + header_len > len(data):
        raise CheckpointError(f"Safetensors header length {header_len} is out of bounds.")
    try:
        header = json.loads(bytes(data[8 : 8 + header_len]), object_pairs_hook=_no_duplicates)
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
    _check_layout(header, len(data) - 8 - header_len)
    return _Header(8 + header_len, header, metadata)


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
    nbytes = math.prod(shape) * _NUMPY_DTYPES[info["dtype"]].itemsize
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
    header = _check_header(data, max_bytes)
    tensors = {}
    for name, info in header.entries.items():
        begin, end = info["data_offsets"]
        dtype = _NUMPY_DTYPES[info["dtype"]]
        flat = np.frombuffer(
            data,
            dtype=dtype,
            count=(end - begin) // dtype.itemsize,
            offset=header.data_start + begin,
        )
        flat.flags.writeable = False  # also for a view of a mutable buffer
        tensors[name] = flat.reshape(info["shape"])
    return tensors, header.metadata


def _dtype(spec: plan_pb2.TensorSpec) -> np.dtype[Any]:
    if spec.dtype not in _DTYPES.values():
        raise ValueError(f"Plan tensor {spec.name!r} has an unsupported dtype {spec.dtype!r}.")
    return np.dtype(spec.dtype)


def _shape(spec: plan_pb2.TensorSpec) -> tuple[int, ...]:
    if any(d < 0 for d in spec.shape):
        raise ValueError(f"Plan tensor {spec.name!r} has an unknown dimension {list(spec.shape)}.")
    return tuple(spec.shape)


def model_specs(model: plan_pb2.ModelSpec) -> dict[str, Spec]:
    """Returns checkpoint key -> (shape, dtype) of the model tensors, by position."""
    specs = {f"trainable/{i}": (_shape(t), _dtype(t)) for i, t in enumerate(model.trainable)}
    for i, t in enumerate(model.non_trainable):
        specs[f"non_trainable/{i}"] = (_shape(t), _dtype(t))
    return specs


def update_specs(plan: plan_pb2.ServerPlan) -> dict[str, Spec]:
    """Returns key -> (shape, dtype) of every tensor a device update must hold.

    An EVALUATION plan's devices report num_examples and metric state only.
    """
    specs = {f"trainable/{i}": (_shape(t), _dtype(t)) for i, t in enumerate(plan.model.trainable)}
    if plan.kind == plan_pb2.PlanKind.EVALUATION:
        specs = {}
    specs[NUM_EXAMPLES] = ((), np.dtype(np.int64))
    for metric in plan.metrics:
        for k, t in enumerate(metric.state):
            specs[f"metric/{metric.name}/{k}"] = (_shape(t), _dtype(t))
    return specs


@dataclasses.dataclass(frozen=True)
class UpdateLayout:
    """The tensors a device update for one plan must hold, read from the plan once.

    `decode_update` takes it in place of the plan: all updates of a round are checked against
    the same layout, and reading it from the protobuf costs more than the checks themselves.
    """

    # Key -> (shape, dtype) of every tensor, as `update_specs` (read-only).
    specs: Mapping[str, Spec]
    # The trainable keys in model order (none for an EVALUATION plan).
    trainable: tuple[str, ...]
    # (metric name, its state keys in order) for each plan metric.
    metrics: tuple[tuple[str, tuple[str, ...]], ...]


def update_layout(plan: plan_pb2.ServerPlan) -> UpdateLayout:
    """Returns the layout `decode_update` checks the plan's updates against.

    Raises:
        ValueError: If a plan tensor has an unsupported dtype or an unknown dimension.
    """
    evaluation = plan.kind == plan_pb2.PlanKind.EVALUATION
    count = 0 if evaluation else len(plan.model.trainable)
    return UpdateLayout(
        specs=types.MappingProxyType(update_specs(plan)),
        trainable=tuple(f"trainable/{i}" for i in range(count)),
        metrics=tuple(
            (m.name, tuple(f"metric/{m.name}/{k}" for k in range(len(m.state))))
            for m in plan.metrics
        ),
    )


def _check_tensors(
    tensors: Mapping[str, Tensor],
    specs: Mapping[str, Spec],
    error: type[CheckpointError],
    *,
    finite_checked: Collection[str] = (),
) -> None:
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
            _check_finite(name, t, error)


def _check_finite(name: str, t: Tensor, error: type[CheckpointError]) -> None:
    # Kinds "f" and "c" are np.inexact (an np.issubdtype call costs microseconds per tensor).
    if t.dtype.kind in "fc" and not np.all(np.isfinite(t)):
        raise error(f"Tensor {name!r} has NaN or infinite values.")


def decode_update(
    data: bytes | memoryview,
    plan: plan_pb2.ServerPlan | UpdateLayout,
    *,
    max_bytes: int,
    max_num_examples: int = DEFAULT_MAX_NUM_EXAMPLES,
) -> ClientUpdate:
    """Parses and validates one device update against the plan.

    Args:
        data: The uploaded (already decompressed) safetensors bytes.
        plan: The task's server plan, or its `update_layout` (for many updates of a plan).
        max_bytes: Largest accepted blob.
        max_num_examples: Largest accepted "num_examples".

    Raises:
        InvalidUpdate: If the blob is malformed, lacks or adds tensors, has a wrong
            shape/dtype, a NaN/Inf, or a num_examples out of [0, max_num_examples].
    """
    try:
        tensors, _ = decode_tensors(data, max_bytes=max_bytes)
    except CheckpointError as e:
        raise InvalidUpdate(str(e)) from e
    layout = plan if isinstance(plan, UpdateLayout) else update_layout(plan)
    names = layout.trainable
    # The trainable tensors' finiteness comes with their sum of squares (one pass over the
    # update instead of two); the aggregation then reuses that sum for clipping.
    _check_tensors(tensors, layout.specs, InvalidUpdate, finite_checked=names)
    trainable = tuple(tensors[name] for name in names)
    sum_of_squares = update_norms.sum_of_squares(trainable)
    if math.isnan(sum_of_squares):
        for name, t in zip(names, trainable, strict=True):
            _check_finite(name, t, InvalidUpdate)
    num_examples = int(tensors[NUM_EXAMPLES])
    if not 0 <= num_examples <= max_num_examples:
        raise InvalidUpdate(
            f"Tensor 'num_examples' is {num_examples}, expected 0..{max_num_examples}."
        )
    metric_states = {name: tuple(tensors[key] for key in keys) for name, keys in layout.metrics}
    return ClientUpdate(
        trainable=trainable,
        num_examples=num_examples,
        metrics=metric_states,
        sum_of_squares=sum_of_squares,
    )


def encode_update(update: ClientUpdate) -> bytes:
    """Serialises a device update in the plan.proto layout (used by devices and tests)."""
    tensors = {f"trainable/{i}": t for i, t in enumerate(update.trainable)}
    tensors[NUM_EXAMPLES] = np.array(update.num_examples, dtype=np.int64)
    for name, state in update.metrics.items():
        tensors.update({f"metric/{name}/{k}": t for k, t in enumerate(state)})
    return encode_tensors(tensors)


def _weights_tensors(weights: ModelWeights) -> dict[str, Tensor]:
    tensors = {f"trainable/{i}": t for i, t in enumerate(weights.trainable)}
    tensors.update({f"non_trainable/{i}": t for i, t in enumerate(weights.non_trainable)})
    return tensors


def _weights_from(tensors: Mapping[str, Tensor], model: plan_pb2.ModelSpec) -> ModelWeights:
    return ModelWeights(
        trainable=tuple(tensors[f"trainable/{i}"] for i in range(len(model.trainable))),
        non_trainable=tuple(tensors[f"non_trainable/{i}"] for i in range(len(model.non_trainable))),
    )


def encode_client_checkpoint(weights: ModelWeights) -> bytes:
    """Serialises the model weights devices download (no optimizer or aggregator state)."""
    return encode_tensors(_weights_tensors(weights), {_KIND_KEY: "client_checkpoint"})


def decode_client_checkpoint(
    data: bytes, plan: plan_pb2.ServerPlan, *, max_bytes: int = DEFAULT_MAX_CHECKPOINT_BYTES
) -> ModelWeights:
    """Parses a client checkpoint holding exactly the plan's model tensors.

    Raises:
        CheckpointError: If the blob is malformed or does not match the model.
    """
    tensors, _ = decode_tensors(data, max_bytes=max_bytes)
    _check_tensors(tensors, model_specs(plan.model), CheckpointError)
    return _weights_from(tensors, plan.model)


def encode_server_checkpoint(state: ServerState) -> bytes:
    """Serialises the full server state with its round number and metadata."""
    tensors = _weights_tensors(state.weights)
    tensors.update({_OPT_PREFIX + k: v for k, v in state.optimizer_state.items()})
    tensors.update({_AGG_PREFIX + k: v for k, v in state.aggregator_state.items()})
    meta = json.dumps({"round_num": state.round_num, "metadata": dict(state.metadata)})
    return encode_tensors(tensors, {_KIND_KEY: "server_checkpoint", _STATE_KEY: meta})


def _optimizer_specs(plan: plan_pb2.ServerPlan) -> dict[str, Spec]:
    expected = optimizers.state_specs(plan.server_optimizer, plan.model)
    declared = list(plan.server_optimizer_state)

    def key(t: plan_pb2.TensorSpec) -> tuple[str, list[int], str]:
        return t.name, list(t.shape), t.dtype  # Labels are for people; ignore them.

    # Checkpoint tensors are addressed by name, so the list's order carries no meaning: the
    # builder lists TFF's layout (step, every accumulator, every preconditioner) while
    # `state_specs` interleaves them per weight.
    if declared and sorted(map(key, declared)) != sorted(map(key, expected)):
        raise ValueError(
            "The plan's server_optimizer_state does not match its server_optimizer: "
            f"{[t.name for t in declared]} vs {[t.name for t in expected]}."
        )
    return {t.name: (_shape(t), _dtype(t)) for t in expected}


def _split_state(
    tensors: Mapping[str, Tensor], plan: plan_pb2.ServerPlan
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Checks model + optimizer tensors; returns (optimizer state, aggregator state)."""
    aggregator = {k: v for k, v in tensors.items() if k.startswith(_AGG_PREFIX)}
    rest = {k: v for k, v in tensors.items() if k not in aggregator}
    _check_tensors(rest, {**model_specs(plan.model), **_optimizer_specs(plan)}, CheckpointError)
    _check_tensors(
        aggregator, {k: (v.shape, v.dtype) for k, v in aggregator.items()}, CheckpointError
    )
    opt = {k.removeprefix(_OPT_PREFIX): v for k, v in rest.items() if k.startswith(_OPT_PREFIX)}
    return opt, {k.removeprefix(_AGG_PREFIX): v for k, v in aggregator.items()}


def decode_server_checkpoint(
    data: bytes, plan: plan_pb2.ServerPlan, *, max_bytes: int = DEFAULT_MAX_CHECKPOINT_BYTES
) -> ServerState:
    """Parses a server checkpoint written by `encode_server_checkpoint` for this plan.

    Raises:
        CheckpointError: If the blob is malformed, is not a server checkpoint, or does not
            match the plan's model and server optimizer.
    """
    tensors, metadata = decode_tensors(data, max_bytes=max_bytes)
    if metadata.get(_KIND_KEY) != "server_checkpoint":
        raise CheckpointError("Blob is not a server checkpoint.")
    try:
        meta = json.loads(metadata.get(_STATE_KEY, ""))
        round_num, extra = int(meta["round_num"]), dict(meta["metadata"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"Server checkpoint metadata is invalid: {e}") from e
    if round_num < 0 or not all(isinstance(v, MetadataValue) for v in extra.values()):
        raise CheckpointError("Server checkpoint metadata has an invalid round or value.")
    opt, agg = _split_state(tensors, plan)
    return ServerState(_weights_from(tensors, plan.model), opt, agg, round_num, extra)


def initial_server_state(
    plan: plan_pb2.ServerPlan,
    checkpoint: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_CHECKPOINT_BYTES,
) -> ServerState:
    """Builds round 0's server state from the task builder's initial or a client checkpoint.

    The model tensors must match the plan. Optimizer state is taken from the checkpoint when
    present (all of it), else initialised to zeros as TFF's `optimizer.initialize`.

    Raises:
        CheckpointError: If the checkpoint is malformed or does not match the plan.
    """
    tensors, _ = decode_tensors(data=checkpoint, max_bytes=max_bytes)
    if not any(k.startswith(_OPT_PREFIX) for k in tensors):
        _check_tensors(tensors, model_specs(plan.model), CheckpointError)
        weights = _weights_from(tensors, plan.model)
        optimizer = optimizers.build_server_optimizer(plan.server_optimizer)
        return ServerState(weights, optimizer.initialize(weights.trainable), {}, 0, {})
    opt, agg = _split_state(tensors, plan)
    return ServerState(_weights_from(tensors, plan.model), opt, agg, 0, {})
