"""Report-result: a device says how its local work ended; COMPLETED gets an upload instruction.

ODP moves the assignment ASSIGNED -> LOCAL_* by compare-and-swap and, for COMPLETED, hands
out a signed upload URL (odp-federated-compute.md section 2.2). Here the upload goes to this
server. Unlike the reference (which keeps issuing upload URLs for rounds that already moved
on, wasting device work), a COMPLETED report for a round that reached its goal or stopped
collecting gets a NO_TASK_AVAILABLE rejection and no instruction, and its assignment is
canceled so the slot is freed.
"""

import dataclasses
import datetime as dt

from sqlalchemy import select
from sqlalchemy.orm import Session

from fcp_server import errors
from fcp_server.protos import task_assignments_pb2
from fcp_server.services import checkin
from fcp_server.storage import transitions
from fcp_server.storage.models import (
    Assignment,
    AssignmentStatus,
    Round,
    RoundStatus,
    Task,
)

_Result = task_assignments_pb2.ReportResultRequest.Result
_FAILURES = {
    _Result.FAILED: AssignmentStatus.LOCAL_FAILED,
    _Result.NOT_ELIGIBLE: AssignmentStatus.LOCAL_NOT_ELIGIBLE,
    _Result.FAILED_EXAMPLE_GENERATION: AssignmentStatus.LOCAL_FAILED_EXAMPLE_GENERATION,
    _Result.FAILED_MODEL_COMPUTATION: AssignmentStatus.LOCAL_FAILED_MODEL_COMPUTATION,
    _Result.FAILED_OPS_ERROR: AssignmentStatus.LOCAL_FAILED_OPS_ERROR,
}


@dataclasses.dataclass(frozen=True)
class Located:
    """An assignment with the round and task its URL named."""

    assignment: Assignment
    round: Round
    task: Task


@dataclasses.dataclass(frozen=True)
class ReportOutcome:
    """What to answer: an upload instruction, a rejection, or an empty acknowledgement."""

    upload: bool
    rejection: checkin.Rejection | None


def locate(
    session: Session,
    pop: str,
    task_id: int,
    iteration_id: int,
    assignment_id: str,
    device_key: str | None = None,
) -> Located:
    """Finds an assignment by the ids in its URL; any mismatch is NotFound (never leak).

    An assignment made to an authenticated device is only found for that device's key, so
    another device cannot report or upload under a stolen or guessed assignment id.
    """
    row = session.execute(
        select(Assignment, Round, Task)
        .join(Round, Assignment.round_pk == Round.id)
        .join(Task, Round.task_pk == Task.id)
        .where(Assignment.id == assignment_id)
    ).first()
    if row is None:
        raise errors.NotFound(f"assignment {assignment_id} not found")
    assignment, rnd, task = row._tuple()
    if (task.population_name, task.task_id, rnd.iteration_id) != (pop, task_id, iteration_id):
        raise errors.NotFound(
            f"assignment {assignment_id} not found in {pop}/task {task_id}/round {iteration_id}"
        )
    if assignment.device_key is not None and assignment.device_key != device_key:
        raise errors.NotFound(f"assignment {assignment_id} not found for this device")
    return Located(assignment=assignment, round=rnd, task=task)


def _fresh_round(session: Session, round_pk: int) -> tuple[RoundStatus, int, int]:
    row = session.execute(
        select(Round.status, Round.reported_count, Round.report_goal).where(Round.id == round_pk)
    ).one()
    return row._tuple()


def report_result(
    *,
    session: Session,
    located: Located,
    result: task_assignments_pb2.ReportResultRequest.Result,
    now: dt.datetime,
) -> ReportOutcome:
    """Applies a device's report to its assignment.

    Raises:
        BadRequest: The result is UNKNOWN or not a known value.
    """
    assignment = located.assignment
    if result == _Result.COMPLETED:
        return _completed(session, located, now)
    target = _FAILURES.get(result)
    if target is None:
        raise errors.BadRequest(f"ReportResultRequest.result {result} is not a final result")
    # As ODP, a failure report whose CAS loses (already reported/timed out) is acknowledged.
    if transitions.move_assignment(
        session, assignment.id, AssignmentStatus.ASSIGNED, target, now=now, reason="device report"
    ):
        transitions.release_slot(session, assignment.round_pk)
    return ReportOutcome(upload=False, rejection=None)


def _completed(session: Session, located: Located, now: dt.datetime) -> ReportOutcome:
    assignment = located.assignment
    status, reported, goal = _fresh_round(session, assignment.round_pk)
    collecting = status == RoundStatus.COLLECTING and reported < goal
    if assignment.status == AssignmentStatus.LOCAL_COMPLETED and collecting:
        return ReportOutcome(upload=True, rejection=None)  # a retried report: same answer
    if assignment.status != AssignmentStatus.ASSIGNED or not collecting:
        if transitions.move_assignment(
            session,
            assignment.id,
            AssignmentStatus.ASSIGNED,
            AssignmentStatus.CANCELED,
            now=now,
            reason="round no longer collecting",
        ):
            transitions.release_slot(session, assignment.round_pk)
        return ReportOutcome(
            upload=False, rejection=checkin.rejection(checkin.Rating.ITERATION_NOT_OPEN)
        )
    if not transitions.move_assignment(
        session,
        assignment.id,
        AssignmentStatus.ASSIGNED,
        AssignmentStatus.LOCAL_COMPLETED,
        now=now,
        reason="device report",
    ):
        # Lost the race: a duplicate report won (same answer) or the worker timed the device
        # out or canceled it meanwhile (final, so a rejection rather than "retry").
        now_status = session.scalar(select(Assignment.status).where(Assignment.id == assignment.id))
        if now_status != AssignmentStatus.LOCAL_COMPLETED:
            return ReportOutcome(
                upload=False, rejection=checkin.rejection(checkin.Rating.ITERATION_NOT_OPEN)
            )
    return ReportOutcome(upload=True, rejection=None)
