"""Device update upload: validate, store once per assignment, count it, close the round at goal.

In ODP devices PUT straight to a bucket and a collector lists it later (odp-federated-compute.md
section 2.6 step 4), which lets more than report_goal updates in. Here the upload is a server
call that, in order: checks the assignment may upload (LOCAL_COMPLETED, round COLLECTING below
its goal), decodes the body (bounded gzip) and validates it against the plan WITHOUT pickle
(`checkpoints.decode_update`: names, shapes, dtypes, finiteness), writes the blob create-only
at {pop}/{task}/{round}/d/{assignment}/gradient (the body is hashed once: the same SHA-256 goes
into the blob header and the assignment row), then in one transaction moves the assignment
LOCAL_COMPLETED -> UPLOAD_COMPLETED and increments the round's `reported_count` only while it
is below report_goal; the upload that reaches the goal moves the round COLLECTING ->
AGGREGATING and rings the workers' doorbell (`round_doorbell`). A rejected upload changes
nothing; a retried identical upload is acknowledged without being counted twice.

This use case spans several short transactions around blob I/O, so it takes the `Database`.
"""

import dataclasses
import datetime as dt
import hashlib
import logging

from sqlalchemy import select
from sqlalchemy.orm import Session

from fcp_server import checkpoints, errors, fault_points
from fcp_server.protos import plan_pb2
from fcp_server.services import blob_paths, compression, reports
from fcp_server.services.plan_cache import PlanCache
from fcp_server.storage import round_doorbell, transitions
from fcp_server.storage.blobs import BlobStore
from fcp_server.storage.db import Database
from fcp_server.storage.models import (
    Assignment,
    AssignmentStatus,
    Round,
    RoundStatus,
    Task,
    TaskKind,
)

_LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class UploadResult:
    """How an accepted upload ended."""

    # False when this was a retry of an upload already counted.
    counted: bool
    # True when this upload reached the report goal and closed collection.
    closed_round: bool


@dataclasses.dataclass(frozen=True)
class _Target:
    assignment_id: str
    round_pk: int
    blob: str
    task: Task
    already_uploaded: str | None


def update_plan(plan: plan_pb2.ServerPlan, kind: TaskKind) -> plan_pb2.ServerPlan:
    """The plan an update is checked against: eval devices upload metrics only, no delta."""
    if kind == TaskKind.TRAINING:
        return plan
    metrics_only = plan_pb2.ServerPlan()
    metrics_only.CopyFrom(plan)
    metrics_only.ClearField("model")
    return metrics_only


def _round_state(session: Session, round_pk: int) -> tuple[RoundStatus, int, int]:
    row = session.execute(
        select(Round.status, Round.reported_count, Round.report_goal).where(Round.id == round_pk)
    ).one()
    return row._tuple()


def _too_late(status: RoundStatus, reported: int, goal: int) -> errors.Conflict | None:
    if status != RoundStatus.COLLECTING:
        return errors.Conflict(f"the round is {status.value}; it no longer accepts updates")
    if reported >= goal:
        return errors.Conflict(f"the round already has its {goal} updates; upload refused")
    return None


def _prepare(
    session: Session,
    pop: str,
    task_id: int,
    iteration_id: int,
    assignment_id: str,
    device_key: str | None,
) -> _Target:
    found = reports.locate(session, pop, task_id, iteration_id, assignment_id, device_key)
    assignment = found.assignment
    if assignment.status == AssignmentStatus.UPLOAD_COMPLETED:
        already = assignment.upload_sha256
    elif assignment.status == AssignmentStatus.LOCAL_COMPLETED:
        # `locate` read the round in this transaction (a fresh session): no second query.
        rnd = found.round
        late = _too_late(rnd.status, rnd.reported_count, rnd.report_goal)
        if late is not None:
            raise late
        already = None
    elif assignment.status == AssignmentStatus.ASSIGNED:
        raise errors.Conflict("report the result COMPLETED before uploading")
    else:
        raise errors.Conflict(f"assignment is {assignment.status.value}; upload refused")
    blob = blob_paths.gradient_blob(pop, task_id, found.round.iteration_id, assignment_id)
    return _Target(assignment.id, assignment.round_pk, blob, found.task, already)


def decode_body(
    body: bytes | memoryview, content_encoding: str, max_bytes: int
) -> bytes | memoryview:
    """The raw update from the request body (identity or gzip), bounded."""
    encoding = content_encoding.strip().lower()
    if len(body) > max_bytes:
        raise errors.PayloadTooLarge(f"upload is {len(body)} bytes, the limit is {max_bytes}")
    if encoding == "gzip":
        return compression.gunzip_bounded(body, max_bytes)
    if encoding in ("", "identity"):
        return body
    raise errors.UnsupportedMediaType(f"Content-Encoding {encoding!r} is not supported (use gzip)")


def _store_once(blobs: BlobStore, name: str, data: bytes | memoryview, digest: str) -> bool:
    """Create-only write; True if this call created the blob."""
    if blobs.put_if_absent(name, data, sha256=digest):
        return True
    if blobs.get(name) != data:
        raise errors.Conflict("a different update was already uploaded for this assignment")
    return False


def _explain_lost_move(session: Session, assignment_id: str, digest: str) -> None:
    """Returns if the assignment already holds this very upload; raises why it cannot take it."""
    current = session.execute(
        select(Assignment.status, Assignment.upload_sha256).where(Assignment.id == assignment_id)
    ).one_or_none()
    if current is None:
        raise errors.NotFound(f"assignment {assignment_id} not found")
    status, uploaded = current._tuple()
    if status != AssignmentStatus.UPLOAD_COMPLETED:
        raise errors.Conflict(f"assignment is {status.value}; upload refused")
    if uploaded != digest:
        raise errors.Conflict("a different update was already uploaded for this assignment")


def _commit(
    session: Session, target: _Target, digest: str, size: int, now: dt.datetime
) -> UploadResult:
    if not transitions.move_assignment(
        session,
        target.assignment_id,
        AssignmentStatus.LOCAL_COMPLETED,
        AssignmentStatus.UPLOAD_COMPLETED,
        now=now,
        reason="upload",
        upload_sha256=digest,
        upload_bytes=size,
    ):
        # Rare: the assignment moved since `_prepare` (a concurrent retry, a timeout).
        _explain_lost_move(session, target.assignment_id, digest)
        return UploadResult(counted=False, closed_round=False)
    if not transitions.count_report(session, target.round_pk):
        late = _too_late(*_round_state(session, target.round_pk))
        raise late or errors.Conflict("the round no longer accepts updates")
    _, reported, goal = _round_state(session, target.round_pk)
    closed = reported == goal and transitions.move_round(
        session,
        target.round_pk,
        RoundStatus.COLLECTING,
        RoundStatus.AGGREGATING,
        now=now,
        reason=f"report goal {goal} reached",
    )
    if closed:
        round_doorbell.ring_in_transaction(session.connection())
    return UploadResult(counted=True, closed_round=closed)


def accept_upload(
    *,
    database: Database,
    blobs: BlobStore,
    plans: PlanCache,
    ids: tuple[str, int, int, str],
    body: bytes | memoryview,
    content_encoding: str,
    now: dt.datetime,
    max_bytes: int,
    device_key: str | None = None,
) -> UploadResult:
    """Validates, stores and counts one device update.

    Args:
        database: Where round state lives (short transactions are opened here).
        blobs: Where the update is stored.
        plans: Cache of parsed server plans.
        ids: (population, task id, round id, assignment id) from the URL.
        body: The request body as received.
        content_encoding: The request's Content-Encoding ("" or "gzip").
        now: Current time.
        max_bytes: Upload size bound (compressed and decompressed).
        device_key: Token hash of the uploading device (None without device auth).

    Raises:
        NotFound: Unknown or foreign assignment.
        Conflict: Not in a state to upload, round closed or full, different bytes replayed.
        InvalidUpload / PayloadTooLarge / UnsupportedMediaType: The body is rejected.
    """
    with database.reads() as session, session.begin():
        target = _prepare(session, *ids, device_key)
    data = decode_body(body, content_encoding, max_bytes)
    digest = hashlib.sha256(data).hexdigest()
    if target.already_uploaded is not None:
        if target.already_uploaded != digest:
            raise errors.Conflict("a different update was already uploaded for this assignment")
        return UploadResult(counted=False, closed_round=False)
    plan = plans.server_plan(blobs, target.task, max_bytes)
    try:
        checkpoints.decode_update(data, update_plan(plan, target.task.kind), max_bytes=max_bytes)
    except checkpoints.InvalidUpdate as e:
        raise errors.InvalidUpload(f"update rejected: {e}") from e
    created = _store_once(blobs, target.blob, data, digest)
    fault_points.hit("upload.after_blob_write")
    try:
        with database.sessions() as session, session.begin():
            result = _commit(session, target, digest, len(data), now)
    except errors.FcpError:
        if created:  # leave nothing behind for an upload that was not counted
            blobs.delete(target.blob)
        raise
    if result.counted:
        fault_points.hit("upload.after_commit")
    if result.closed_round:
        round_doorbell.ring_after_commit(database.engine.url)
    return result
