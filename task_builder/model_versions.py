"""Model versions of a task: which rounds have a checkpoint, and their validated weights.

A task's versions are the rounds whose checkpoints the FCP server wrote to its blob store, in
the ODP `GCSBlobManager` layout (`fcp_server.services.blob_paths`): round 0 is the builder's
initial checkpoint, round N the server state after round N. Weights are read from the client
checkpoint (weights only) when present, else from the server checkpoint (weights plus
optimizer and aggregator state), both in the safetensors layout of plan.proto's header
(`fcp_server.checkpoints`). Every tensor is checked against the model's ModelSpec by name,
shape and dtype before use, for serving export (export.py) and warm start (plans.py).
TensorFlow-free, so listing versions stays light.
"""

import dataclasses
import re
from collections.abc import Mapping

import numpy as np
from google.protobuf.message import DecodeError

from fcp_server import checkpoints
from fcp_server.aggregation.state import ModelWeights, Tensor
from fcp_server.protos import plan_pb2
from fcp_server.services import blob_paths
from fcp_server.storage import blobs
from task_builder.errors import ModelLoadError

__all__ = [
    "ModelVersion",
    "ModelVersionError",
    "check_weights",
    "latest_version",
    "list_versions",
    "load_model_spec",
    "load_version_weights",
    "load_warm_start_weights",
    "weights_from_checkpoint",
]

# A 1.6M-parameter CNN checkpoint is ~7 MB; 2 GiB matches the server's checkpoint bound.
DEFAULT_MAX_CHECKPOINT_BYTES = checkpoints.DEFAULT_MAX_CHECKPOINT_BYTES
_MAX_PLAN_BYTES = 256 * 1024**2
_MAX_TASK_ID = 2**63 - 1
# What may sit next to the model tensors: a server checkpoint's optimizer/aggregator state.
_STATE_PREFIXES = ("server_optimizer/", "aggregator/")
# Relative to "{pop}/{task}/": the blobs of one round that make a version.
_ROUND_BLOB_RE = re.compile(
    r"^(0|[1-9][0-9]{0,17})/(s/0/checkpoint|d/0/client_checkpoint|s/0/metrics)$"
)


class ModelVersionError(ModelLoadError):
    """A version is missing, or its checkpoint does not fit the model (names the tensor)."""


@dataclasses.dataclass(frozen=True)
class ModelVersion:
    """One round's stored model: blob names in the task's blob store.

    Attributes:
        round: 0 for the task builder's initial checkpoint, N after round N.
        checkpoint: The server checkpoint, None if only the client checkpoint exists
            (evaluation tasks copy client checkpoints only).
        client_checkpoint: The weights devices download, None until the server publishes it.
        metrics: The round's flat JSON metrics, None for round 0 and unfinished rounds.
    """

    round: int
    checkpoint: str | None
    client_checkpoint: str | None
    metrics: str | None


def _check_task(population: str, task_id: int) -> None:
    if not isinstance(population, str) or not blob_paths.is_valid_population(population):
        raise ModelVersionError(
            f"invalid population name {population!r}: 1-64 of [A-Za-z0-9_.-], starting alphanumeric"
        )
    if isinstance(task_id, bool) or not isinstance(task_id, int) or not 0 < task_id <= _MAX_TASK_ID:
        raise ModelVersionError(f"task id must be a positive int64, got {task_id!r}")


def list_versions(store: blobs.BlobStore, population: str, task_id: int) -> list[ModelVersion]:
    """Lists the rounds of a task that have a checkpoint, sorted by round (blob listing only).

    The listing does not know whether the server committed a round: a round whose apply is
    being retried shows the blobs of its latest attempt.

    Raises:
        ModelVersionError: The population or task id is malformed.
        BlobStoreError: The store cannot be listed.
    """
    _check_task(population, task_id)
    prefix = f"{population}/{task_id}/"
    found: dict[int, dict[str, str]] = {}
    for name in store.list(prefix):
        match = _ROUND_BLOB_RE.match(name[len(prefix) :])
        if match:
            found.setdefault(int(match.group(1)), {})[match.group(2)] = name
    versions = []
    for rnd, kinds in sorted(found.items()):
        server, client = kinds.get("s/0/checkpoint"), kinds.get("d/0/client_checkpoint")
        if server is None and client is None:
            continue  # metrics without weights: an evaluation round, or a half-written one
        versions.append(ModelVersion(rnd, server, client, kinds.get("s/0/metrics")))
    return versions


def latest_version(store: blobs.BlobStore, population: str, task_id: int) -> ModelVersion:
    """The version with the highest round.

    Raises:
        ModelVersionError: The task has no checkpoint in this store.
    """
    versions = list_versions(store, population, task_id)
    if not versions:
        raise ModelVersionError(f"no checkpoint of task {population}/{task_id} in the blob store")
    return versions[-1]


def _describe(dtype: np.dtype[np.generic] | str, shape: tuple[int, ...]) -> str:
    return f"{np.dtype(dtype).name}{list(shape)}"


def _check_tensor(name: str, tensor: Tensor, spec: plan_pb2.TensorSpec) -> None:
    expected = tuple(int(d) for d in spec.shape)
    if tensor.shape != expected or tensor.dtype != np.dtype(spec.dtype):
        raise ModelVersionError(
            f"checkpoint tensor {name!r} is {_describe(tensor.dtype, tensor.shape)}, "
            f"the model expects {_describe(spec.dtype, expected)}"
        )
    if np.issubdtype(tensor.dtype, np.inexact) and not np.all(np.isfinite(tensor)):
        raise ModelVersionError(f"checkpoint tensor {name!r} has NaN or infinite values")


def _named_specs(model_spec: plan_pb2.ModelSpec) -> dict[str, plan_pb2.TensorSpec]:
    specs = {f"trainable/{i}": t for i, t in enumerate(model_spec.trainable)}
    specs.update({f"non_trainable/{i}": t for i, t in enumerate(model_spec.non_trainable)})
    return specs


def _weights(tensors: Mapping[str, Tensor], model_spec: plan_pb2.ModelSpec) -> ModelWeights:
    specs = _named_specs(model_spec)
    missing = [name for name in specs if name not in tensors]
    if missing:
        raise ModelVersionError(f"checkpoint lacks model tensor(s) {', '.join(missing[:10])}")
    unexpected = sorted(n for n in tensors if n not in specs and not n.startswith(_STATE_PREFIXES))
    if unexpected:
        raise ModelVersionError(
            f"checkpoint has tensor(s) the model does not: {', '.join(unexpected[:10])}"
        )
    for name, spec in specs.items():
        _check_tensor(name, tensors[name], spec)
    return ModelWeights(
        trainable=tuple(tensors[f"trainable/{i}"] for i in range(len(model_spec.trainable))),
        non_trainable=tuple(
            tensors[f"non_trainable/{i}"] for i in range(len(model_spec.non_trainable))
        ),
    )


def weights_from_checkpoint(
    data: bytes,
    model_spec: plan_pb2.ModelSpec,
    *,
    max_bytes: int = DEFAULT_MAX_CHECKPOINT_BYTES,
) -> ModelWeights:
    """Reads the model weights of a server, client or initial checkpoint.

    Optimizer and aggregator state in a server checkpoint is ignored; any other tensor the
    model does not have is an error, so a checkpoint of another model is never half-read.

    Raises:
        ModelVersionError: The bytes are not safetensors, or a tensor is missing, extra,
            non-finite, or has another shape or dtype (the message names it).
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ModelVersionError(f"checkpoint must be bytes, got {type(data).__name__}")
    try:
        tensors, _ = checkpoints.decode_tensors(bytes(data), max_bytes=max_bytes)
    except checkpoints.CheckpointError as e:
        raise ModelVersionError(f"checkpoint is not readable: {e}") from e
    return _weights(tensors, model_spec)


def check_weights(weights: ModelWeights, model_spec: plan_pb2.ModelSpec) -> ModelWeights:
    """Validates weights against a ModelSpec (count, shape, dtype, finite) and copies them.

    Returns:
        The weights as contiguous numpy arrays, in the spec's order.

    Raises:
        ModelVersionError: The weights do not fit; the message names the tensor.
    """
    groups = (("trainable", weights.trainable), ("non_trainable", weights.non_trainable))
    tensors: dict[str, Tensor] = {}
    for prefix, group in groups:
        expected = len(getattr(model_spec, prefix))
        if len(group) != expected:
            raise ModelVersionError(
                f"the weights have {len(group)} {prefix} tensors, the model has {expected}"
            )
        tensors.update({f"{prefix}/{i}": np.ascontiguousarray(w) for i, w in enumerate(group)})
    return _weights(tensors, model_spec)


def load_model_spec(
    store: blobs.BlobStore, population: str, task_id: int, *, max_bytes: int = _MAX_PLAN_BYTES
) -> plan_pb2.ModelSpec:
    """The ModelSpec of the task's ServerPlan (`server_phase` artifact), without TensorFlow.

    Raises:
        ModelVersionError: The task has no server plan, or it does not parse.
    """
    _check_task(population, task_id)
    name = blob_paths.artifact_blob(population, task_id, "server_phase")
    try:
        data = store.get(name, max_bytes=max_bytes)
    except blobs.BlobNotFound as e:
        raise ModelVersionError(f"task {population}/{task_id} has no server plan") from e
    try:
        plan = plan_pb2.ServerPlan.FromString(data)
    except DecodeError as e:
        raise ModelVersionError(f"server plan {name!r} does not parse: {e}") from e
    return plan.model


def load_version_weights(
    store: blobs.BlobStore,
    population: str,
    task_id: int,
    model_spec: plan_pb2.ModelSpec,
    *,
    round_num: int | None = None,
    max_bytes: int = DEFAULT_MAX_CHECKPOINT_BYTES,
) -> tuple[ModelVersion, ModelWeights]:
    """Reads and validates one round's weights (default: the latest round).

    Args:
        store: The server's blob store (`blobs.make_blob_store(url)`).
        population: The task's population name.
        task_id: The task id.
        model_spec: The model the weights must fit (`plans.build_model_spec(model)` or
            `load_model_spec`).
        round_num: The round to read; None for the latest.
        max_bytes: Largest checkpoint accepted.

    Returns:
        The version read and its weights.

    Raises:
        ModelVersionError: No such round, or its checkpoint does not fit the model.
        BlobStoreError: The store failed.
    """
    if round_num is None:
        version = latest_version(store, population, task_id)
    else:
        if isinstance(round_num, bool) or not isinstance(round_num, int) or round_num < 0:
            raise ModelVersionError(f"round must be an int >= 0, got {round_num!r}")
        by_round = {v.round: v for v in list_versions(store, population, task_id)}
        if round_num not in by_round:
            known = ", ".join(str(r) for r in sorted(by_round)[-10:]) or "none"
            raise ModelVersionError(
                f"task {population}/{task_id} has no checkpoint for round {round_num} "
                f"(latest rounds: {known})"
            )
        version = by_round[round_num]
    name = version.client_checkpoint or version.checkpoint
    assert name is not None  # list_versions keeps only rounds with a checkpoint
    try:
        data = store.get(name, max_bytes=max_bytes)
    except blobs.BlobNotFound as e:
        raise ModelVersionError(f"checkpoint {name!r} disappeared while reading it") from e
    try:
        return version, weights_from_checkpoint(data, model_spec, max_bytes=max_bytes)
    except ModelVersionError as e:
        raise ModelVersionError(f"{name}: {e}") from e


def load_warm_start_weights(
    blob_url: str,
    population: str,
    task_id: int,
    model_spec: plan_pb2.ModelSpec,
    *,
    round_num: int | None = None,
) -> tuple[ModelVersion, ModelWeights]:
    """Warm start: reads a round's weights (default latest) from the blob store at a URL.

    For the build pipeline: pass the result's weights to `plans.build_plans(...,
    initial_weights=...)`. Store failures become ModelVersionError (INVALID_REQUEST), as the
    request named a source that cannot be read.

    Raises:
        ModelVersionError: The URL, task or round is unusable, or the weights do not fit.
    """
    try:
        store = blobs.make_blob_store(blob_url)
    except blobs.BlobStoreError as e:
        raise ModelVersionError(f"cannot open the warm-start blob store: {e}") from e
    try:
        return load_version_weights(store, population, task_id, model_spec, round_num=round_num)
    except blobs.BlobStoreError as e:
        raise ModelVersionError(f"cannot read the warm-start checkpoint: {e}") from e
    finally:
        store.close()
