"""Reads configs and writes built artifacts at local paths, `file://` or `gs://` URIs.

Step 7 of the build pipeline: with --build_artifact_only the plans and the initial checkpoint
go to the config's `artifact_building` URLs instead of the server (ODP artifact-only mode,
odp-federated-compute.md section 1.10), one set for training and one for evaluation. Local
writes are atomic (temp file + rename) so that a failed build never leaves half a plan.
"""

import contextlib
import os
import pathlib
import tempfile
import urllib.parse
from typing import Protocol

from fcp_server.protos import plan_pb2, task_builder_pb2
from fcp_server.storage import blobs
from task_builder import config_defaults as d
from task_builder.config_validation import config_error
from task_builder.errors import ArtifactBuildError

_GCS_TIMEOUT_SECONDS = 120.0


class UriError(OSError):
    """A URI cannot be read or written (bad scheme, missing object, storage failure)."""


def _local_path(uri: str) -> pathlib.Path | None:
    if "://" not in uri:
        return pathlib.Path(uri)
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme != "file":
        return None
    if parsed.netloc not in ("", "localhost"):
        raise UriError(f"file URI {uri!r} must not name a host")
    return pathlib.Path(urllib.parse.unquote(parsed.path))


def _gcs_location(uri: str) -> tuple[str, str]:
    """Splits gs://bucket/dir/name into the store URL gs://bucket/dir and the name."""
    parsed = urllib.parse.urlparse(uri)
    path = parsed.path.strip("/")
    if parsed.scheme != "gs" or not parsed.netloc or not path:
        raise UriError(f"unsupported URI {uri!r}: use a local path, file:// or gs://bucket/object")
    directory, _, name = path.rpartition("/")
    return f"gs://{parsed.netloc}/{directory}".rstrip("/"), name


def _read_gcs(uri: str, max_bytes: int) -> bytes:
    store_url, name = _gcs_location(uri)
    try:
        store = blobs.make_blob_store(store_url, timeout_s=_GCS_TIMEOUT_SECONDS)
        try:
            return store.get(name, max_bytes=max_bytes)
        finally:
            store.close()
    except blobs.BlobStoreError as e:
        raise UriError(f"cannot read {uri!r}: {e}") from e


def _write_gcs(uri: str, data: bytes) -> None:
    store_url, name = _gcs_location(uri)
    try:
        store = blobs.make_blob_store(store_url, timeout_s=_GCS_TIMEOUT_SECONDS)
        try:
            store.put(name, data)
        finally:
            store.close()
    except blobs.BlobStoreError as e:
        raise UriError(f"cannot write {uri!r}: {e}") from e


def read_uri(uri: str, *, max_bytes: int) -> bytes:
    """Returns the bytes at `uri`, refusing files larger than `max_bytes`.

    Raises:
      UriError: (an OSError) when the URI cannot be read or is too large.
    """
    path = _local_path(uri)
    if path is None:
        return _read_gcs(uri, max_bytes)
    try:
        with path.open("rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise UriError(f"cannot read {uri!r}: {e.strerror or e}") from e
    if len(data) > max_bytes:
        raise UriError(f"{uri!r} is larger than {max_bytes} bytes")
    return data


def write_uri(uri: str, data: bytes) -> None:
    """Writes `data` to `uri` (creating local directories; atomic on disk).

    Raises:
      UriError: (an OSError) when the URI cannot be written.
    """
    path = _local_path(uri)
    if path is None:
        _write_gcs(uri, data)
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as e:
        raise UriError(f"cannot write {uri!r}: {e.strerror or e}") from e


def _urls(config: task_builder_pb2.TaskConfig) -> dict[str, task_builder_pb2.ArtifactBuilding]:
    urls: dict[str, task_builder_pb2.ArtifactBuilding] = {}
    if config.mode in d.TRAINING_MODES:
        urls["training"] = config.federated_learning.learning_process.artifact_building
    if config.mode in d.EVAL_MODES:
        urls["evaluation"] = config.federated_learning.evaluation.artifact_building
    return urls


def check_artifact_urls(config: task_builder_pb2.TaskConfig) -> None:
    """Checks that every artifact the normalized config's mode produces has a URL.

    Raises:
      TaskConfigError: naming the missing `artifact_building` key.
    """
    entities = {
        "training": "federated_learning.learning_process.artifact_building",
        "evaluation": "federated_learning.evaluation.artifact_building",
    }
    for kind, building in _urls(config).items():
        keys = ["plan_url", "client_plan_url"] + (["checkpoint_url"] if kind == "training" else [])
        for key in keys:
            value = getattr(building, key)
            if not value or len(value) > d.MAX_URI_LENGTH:
                debug = f"{key} is required when building artifacts only."
                raise config_error(key, value, entities[kind], debug)


class PlanArtifacts(Protocol):
    """The artifacts of one task, as task_builder.plans.TaskPlans has them (kept TF-free)."""

    @property
    def client_plan(self) -> plan_pb2.ClientOnlyPlan:
        """The device program and its data spec."""

    @property
    def server_plan(self) -> plan_pb2.ServerPlan:
        """The server's aggregation and update spec."""

    @property
    def initial_checkpoint(self) -> bytes | None:
        """The initial server checkpoint (safetensors); None for eval tasks."""


def write_artifacts(
    config: task_builder_pb2.TaskConfig,
    training: PlanArtifacts | None,
    evaluation: PlanArtifacts | None,
) -> list[str]:
    """Writes the built plans to the config's `artifact_building` URLs.

    Args:
      config: the normalized TaskConfig (its URLs were checked by check_artifact_urls).
      training: the training task's artifacts (None for EVAL_ONLY).
      evaluation: the eval task's artifacts (None for TRAINING_ONLY).

    Returns:
      The URIs written, in order.

    Raises:
      ArtifactBuildError: when a write fails or a plan the mode needs was not built.
    """
    written: list[str] = []
    for kind, building in _urls(config).items():
        built = training if kind == "training" else evaluation
        if built is None:
            raise ArtifactBuildError(f"the {kind} plans were not built for mode {config.mode}")
        blobs = [
            (building.plan_url, built.server_plan.SerializeToString()),
            (building.client_plan_url, built.client_plan.SerializeToString()),
        ]
        if built.initial_checkpoint is not None and building.checkpoint_url:
            blobs.append((building.checkpoint_url, built.initial_checkpoint))
        for uri, data in blobs:
            try:
                write_uri(uri, data)
            except UriError as e:
                raise ArtifactBuildError(f"Artifact failed to write to {uri}: {e}") from e
            written.append(uri)
    return written
