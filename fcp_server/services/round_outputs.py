"""A closed round's outputs, staged once so that every close of the round publishes the same.

Each computation of a round close draws fresh DP noise from an OS-seeded generator. A close can
run more than once for the same round: the worker dies after publishing part of round N and
its claim is recovered, a transient blob or database error interrupts it, or a slow worker's
lease is taken over. If each run published its own result, round N's checkpoint would be
released twice with independent noise: averaging the two halves the noise variance, and the
accountant (which charges one Gaussian release per round, McMahan et al. 2018, arXiv
1710.06963) would understate the privacy spent. Re-running with *fresh* noise is only safe if
nothing of the first run was ever visible, which a crash after the first blob write cannot
promise.

So the close is identical and idempotent instead: before publishing anything it writes
everything it will publish (server checkpoint, client checkpoint, metrics, DP budget facts) as
ONE blob, create-only (`put_if_absent`), and publishes from whatever that blob holds. The first
run to stage wins; a later run finds the staged blob and republishes it byte for byte, and the
noise it drew itself is dropped unseen. The staged blob stays after the round completes as the
record of the round's release (a late, stale worker must find it too).

Format: `FCPO` magic, version byte, 4-byte big-endian header length, a JSON header, then the
server and client checkpoint bytes whose lengths the header gives.
"""

import dataclasses
import hashlib
import json
import math
import struct
from typing import Any, Final

from fcp_server import fault_points
from fcp_server.services import blob_paths
from fcp_server.storage.blobs import BlobStore

_MAGIC: Final = b"FCPO"
_VERSION: Final = 1
_PREFIX: Final = struct.Struct(">4sBI")


class StagedOutputsCorrupt(ValueError):
    """A staged-outputs blob cannot be decoded."""


@dataclasses.dataclass(frozen=True)
class Outputs:
    """What a closed round publishes."""

    # Server state after the round (safetensors); None for evaluation rounds.
    server_checkpoint: bytes | None
    # Weights devices download for the next round (safetensors); None for evaluation rounds.
    client_checkpoint: bytes | None
    # Flat round metrics, written as the round's metrics file.
    metrics: dict[str, float]
    # True when another round would exceed the plan's target epsilon.
    budget_exhausted: bool
    # Epsilon spent after this round; None without DP.
    epsilon: float | None


def _length(data: bytes | None) -> int | None:
    return None if data is None else len(data)


def encode(outputs: Outputs) -> bytes:
    """Serializes `outputs` into one staged blob."""
    header = json.dumps(
        {
            "metrics": outputs.metrics,
            "budget_exhausted": outputs.budget_exhausted,
            "epsilon": outputs.epsilon,
            "server_checkpoint": _length(outputs.server_checkpoint),
            "client_checkpoint": _length(outputs.client_checkpoint),
        },
        sort_keys=True,
    ).encode()
    body = (outputs.server_checkpoint or b"") + (outputs.client_checkpoint or b"")
    return _PREFIX.pack(_MAGIC, _VERSION, len(header)) + header + body


def _field(header: dict[str, Any], key: str, kinds: tuple[type, ...]) -> Any:
    value = header.get(key)
    if not isinstance(value, kinds) or isinstance(value, bool) != (bool in kinds):
        raise StagedOutputsCorrupt(f"staged outputs: header field {key!r} is malformed")
    return value


def decode(data: bytes) -> Outputs:
    """Parses a staged blob written by `encode`.

    Raises:
        StagedOutputsCorrupt: The bytes are not a complete staged-outputs blob.
    """
    if len(data) < _PREFIX.size:
        raise StagedOutputsCorrupt("staged outputs: shorter than the fixed prefix")
    magic, version, header_len = _PREFIX.unpack_from(data)
    if magic != _MAGIC or version != _VERSION:
        raise StagedOutputsCorrupt("staged outputs: wrong magic or version")
    raw_header = data[_PREFIX.size : _PREFIX.size + header_len]
    try:
        header = json.loads(raw_header)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StagedOutputsCorrupt(f"staged outputs: header is not JSON: {e}") from e
    if not isinstance(header, dict):
        raise StagedOutputsCorrupt("staged outputs: header is not an object")
    metrics = _field(header, "metrics", (dict,))
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in metrics.values()):
        raise StagedOutputsCorrupt("staged outputs: a metric value is not a number")
    epsilon = header.get("epsilon")
    if epsilon is not None and not isinstance(epsilon, int | float):
        raise StagedOutputsCorrupt("staged outputs: epsilon is not a number")
    sizes = [header.get("server_checkpoint"), header.get("client_checkpoint")]
    if any(s is not None and (not isinstance(s, int) or s < 0) for s in sizes):
        raise StagedOutputsCorrupt("staged outputs: a checkpoint length is malformed")
    body = data[_PREFIX.size + header_len :]
    if len(raw_header) != header_len or len(body) != sum(s or 0 for s in sizes):
        raise StagedOutputsCorrupt("staged outputs: truncated or with trailing bytes")
    server_len = sizes[0] or 0
    return Outputs(
        server_checkpoint=None if sizes[0] is None else body[:server_len],
        client_checkpoint=None if sizes[1] is None else body[server_len:],
        metrics={str(k): float(v) for k, v in metrics.items()},
        budget_exhausted=_field(header, "budget_exhausted", (bool,)),
        epsilon=None if epsilon is None else float(epsilon),
    )


def stage_once(blobs: BlobStore, name: str, outputs: Outputs) -> Outputs:
    """Stages `outputs` under `name` unless a run before this one did; returns the staged ones.

    Raises:
        BlobStoreError: The blob store failed (the caller retries the close later).
        StagedOutputsCorrupt: The existing staged blob is damaged.
    """
    if blobs.put_if_absent(name, encode(outputs)):
        return outputs
    return decode(blobs.get(name))


def load_staged(blobs: BlobStore, name: str) -> Outputs | None:
    """The outputs an earlier run staged, or None if no run got that far.

    Raises:
        BlobStoreError: The blob store failed.
        StagedOutputsCorrupt: The staged blob is damaged.
    """
    if not blobs.exists(name):
        return None
    return decode(blobs.get(name))


def metrics_json(values: dict[str, float]) -> bytes:
    """The round's metrics file: the finite values, keys sorted."""
    finite = {k: v for k, v in sorted(values.items()) if math.isfinite(v)}
    return json.dumps(finite, sort_keys=True).encode()


def publish(blobs: BlobStore, round_id: tuple[str, int, int], outputs: Outputs) -> str | None:
    """Writes the outputs at the ODP paths of (population, task id, round).

    Each put is atomic (temp file + rename, or one GCS upload), so a crash between them leaves
    some outputs whole and the rest absent; the next run completes them from the same staged
    bytes.

    Returns:
        The SHA-256 of the client checkpoint (None for evaluation rounds).

    Raises:
        BlobStoreError: A write failed.
    """
    pop, tid, n = round_id
    digest = None
    if outputs.server_checkpoint is not None and outputs.client_checkpoint is not None:
        blobs.put(blob_paths.server_checkpoint_blob(pop, tid, n), outputs.server_checkpoint)
        fault_points.hit("close.after_server_checkpoint")
        blobs.put(
            blob_paths.client_checkpoint_blob(pop, tid, n), outputs.client_checkpoint, gzip=True
        )
        fault_points.hit("close.after_client_checkpoint")
        digest = hashlib.sha256(outputs.client_checkpoint).hexdigest()
    blobs.put(
        blob_paths.metrics_blob(pop, tid, n),
        metrics_json(outputs.metrics),
        content_type="application/json",
    )
    fault_points.hit("close.after_metrics")
    return digest
