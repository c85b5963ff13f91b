"""Device updates and server/client checkpoints as safetensors, validated against the plan.

Implements the layout fixed in the header of `fcp_server/protos/plan.proto` (no pickle, no
TensorFlow): model tensors "trainable/<i>" / "non_trainable/<i>"; a server checkpoint adds
"server_optimizer/<name>" and "aggregator/<name>" plus JSON metadata (the round number); a client
checkpoint holds the weights only; a device update holds "trainable/<i>" (initial - trained),
"num_examples" (int64 scalar) and "metric/<metric>/<k>". Safetensors is by Hugging Face
(https://github.com/huggingface/safetensors, format spec in its README).

Blobs are untrusted, so `safetensors_codec` checks the header before any tensor is
materialised (size, header length, duplicate keys, dtypes, shapes, offsets) and every decoder
accepts exactly the tensors the plan expects (`plan_specs`). Device updates are
`update_codec`'s (re-exported here): a NaN/Inf update is rejected at upload with
`InvalidUpdate`, and aggregation still zeroes and counts any that slip through (as TFF does).
"""

import json
from collections.abc import Mapping

from fcp_server.aggregation import optimizers
from fcp_server.aggregation.state import (
    ClientUpdate,
    MetadataValue,
    ModelWeights,
    ServerState,
    Tensor,
)
from fcp_server.plan_specs import NUM_EXAMPLES, Spec, model_specs, tensor_dtype, tensor_shape
from fcp_server.protos import plan_pb2
from fcp_server.safetensors_codec import (
    CheckpointError,
    check_tensors,
    decode_tensors,
    encode_tensors,
)
from fcp_server.update_codec import (
    DEFAULT_MAX_NUM_EXAMPLES,
    InvalidUpdate,
    UpdateLayout,
    decode_update,
    encode_update,
    update_layout,
)

__all__ = [
    "DEFAULT_MAX_NUM_EXAMPLES",
    "NUM_EXAMPLES",
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
_OPT_PREFIX = optimizers.STATE_PREFIX
_AGG_PREFIX = "aggregator/"
_KIND_KEY = "fcp_kind"
_STATE_KEY = "fcp_state"


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
    check_tensors(tensors, model_specs(plan.model), CheckpointError)
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
    return {t.name: (tensor_shape(t), tensor_dtype(t)) for t in expected}


def _split_state(
    tensors: Mapping[str, Tensor], plan: plan_pb2.ServerPlan
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Checks model + optimizer tensors; returns (optimizer state, aggregator state)."""
    aggregator = {k: v for k, v in tensors.items() if k.startswith(_AGG_PREFIX)}
    rest = {k: v for k, v in tensors.items() if k not in aggregator}
    check_tensors(rest, {**model_specs(plan.model), **_optimizer_specs(plan)}, CheckpointError)
    check_tensors(
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
        check_tensors(tensors, model_specs(plan.model), CheckpointError)
        weights = _weights_from(tensors, plan.model)
        optimizer = optimizers.build_server_optimizer(plan.server_optimizer)
        return ServerState(weights, optimizer.initialize(weights.trainable), {}, 0, {})
    opt, agg = _split_state(tensors, plan)
    return ServerState(_weights_from(tensors, plan.model), opt, agg, 0, {})
