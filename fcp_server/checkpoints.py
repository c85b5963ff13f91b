"""Device updates and server/client checkpoints as safetensors, validated against the plan.

Implements the layout fixed in the header of `fcp_server/protos/plan.proto` (no pickle, no
TensorFlow): model tensors "trainable/<i>" / "non_trainable/<i>"; a server checkpoint adds
"server_optimizer/<name>" and "aggregator/<name>" plus JSON metadata (the round number); a client
checkpoint holds the weights only; a device update holds "trainable/<i>" (initial - trained),
"num_examples" (int64 scalar) and "metric/<metric>/<k>". Safetensors is by Hugging Face
(https://github.com/huggingface/safetensors, format spec in its README).

Uploads are untrusted, so `safetensors_codec` checks the header before any tensor is
materialised (size, header length, duplicate keys, dtypes, shapes, offsets) and `decode_update`
accepts exactly the tensors the plan expects, all finite: a NaN/Inf update is rejected at
upload with `InvalidUpdate`, and aggregation still zeroes and counts any that slip through (as
TFF does).
"""

import dataclasses
import json
import math
import types
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np

from fcp_server.aggregation import optimizers, update_norms
from fcp_server.aggregation.state import (
    ClientUpdate,
    MetadataValue,
    ModelWeights,
    ServerState,
    Tensor,
)
from fcp_server.protos import plan_pb2
from fcp_server.safetensors_codec import (
    SUPPORTED_DTYPES,
    CheckpointError,
    decode_tensors,
    encode_tensors,
)

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

DEFAULT_MAX_CHECKPOINT_BYTES = 1 << 31
DEFAULT_MAX_NUM_EXAMPLES = 10_000_000
NUM_EXAMPLES = "num_examples"
_OPT_PREFIX = optimizers.STATE_PREFIX
_AGG_PREFIX = "aggregator/"
_KIND_KEY = "fcp_kind"
_STATE_KEY = "fcp_state"

Spec = tuple[tuple[int, ...], np.dtype[Any]]


class InvalidUpdate(CheckpointError):
    """A device update is rejected; the message names the offending tensor."""


def _dtype(spec: plan_pb2.TensorSpec) -> np.dtype[Any]:
    if spec.dtype not in SUPPORTED_DTYPES:
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
