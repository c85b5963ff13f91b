"""Device check-in (create-task-assignment): pick an eligible round and take a slot atomically.

Follows ODP's `TaskAssignmentCoreImpl` (odp-federated-compute.md section 2.2): each active
round of the population is rated SUCCESS < ITERATION_FULL < ITERATION_NOT_OPEN <
CLIENT_VERSION_MISMATCH (none: ITERATION_NOT_ACTIVE), the best rating decides the rejection,
and among eligible rounds one is drawn by `traffic_weight`. Fixed here: the capacity check is
the `active_count < capacity` condition of the UPDATE that takes the slot (the reference
counted in a separate read and could over-assign), zero-weight rounds are never drawn, and
"only zero weights" is NO_ACTIVE_TASK_EXISTS instead of an exception. With device auth, an
authenticated device gets at most one assignment per round (a unique index on the round and the
device's token hash, checked again under concurrency), so it cannot contribute twice; a round it
already holds is rated ITERATION_FULL for it.
"""

import dataclasses
import datetime as dt
import enum
import re
import uuid

import numpy as np
from sqlalchemy import bindparam, delete, insert, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from fcp_server import errors
from fcp_server.protos import common_pb2
from fcp_server.storage import transitions
from fcp_server.storage.models import (
    ACTIVE_ROUND_STATUSES,
    Assignment,
    AssignmentStatus,
    EntityKind,
    Round,
    RoundStatus,
    StatusChange,
    Task,
    TaskStatus,
)

_VERSION_RE = re.compile(r"^[0-9]{1,18}$")
_Reason = common_pb2.RejectionReason
# The population's active rounds with their tasks, built once: constructing the statement
# on every check-in cost about as much CPU as running it.
_ACTIVE_ROUNDS = (
    select(Round, Task)
    .join(Task, Round.task_pk == Task.id)
    .where(
        Task.population_name == bindparam("pop"),
        Task.status == TaskStatus.OPEN,
        Round.status.in_(ACTIVE_ROUND_STATUSES),
    )
    .order_by(Round.id)
)
# Retry windows of ODP's server, seconds.
SHORT_RETRY = (60, 300)
LONG_RETRY = (86_400, 172_800)


class Rating(enum.IntEnum):
    """How a round fits a device; lower is better (ODP CheckInResult order)."""

    SUCCESS = 1
    ITERATION_FULL = 101
    ITERATION_NOT_OPEN = 110
    CLIENT_VERSION_MISMATCH = 120
    ITERATION_NOT_ACTIVE = 130


@dataclasses.dataclass(frozen=True)
class Rejection:
    """Why the device got no task and when to come back."""

    reason: common_pb2.RejectionReason.Enum
    retry_seconds: tuple[int, int]
    rating: Rating


@dataclasses.dataclass(frozen=True)
class Assigned:
    """A new assignment and the round and task it belongs to."""

    assignment: Assignment
    round: Round
    task: Task


_REJECTIONS = {
    Rating.ITERATION_FULL: (_Reason.NO_TASK_AVAILABLE, SHORT_RETRY),
    Rating.ITERATION_NOT_OPEN: (_Reason.NO_TASK_AVAILABLE, SHORT_RETRY),
    Rating.CLIENT_VERSION_MISMATCH: (_Reason.CLIENT_VERSION_MISMATCH, LONG_RETRY),
    Rating.ITERATION_NOT_ACTIVE: (_Reason.NO_ACTIVE_TASK_EXISTS, LONG_RETRY),
}


def rejection(rating: Rating) -> Rejection:
    """The rejection sent for a rating other than SUCCESS."""
    reason, window = _REJECTIONS[rating]
    return Rejection(reason=reason, retry_seconds=window, rating=rating)


def parse_client_version(version_code: str) -> int:
    """The numeric client version (ODP compares versions as longs)."""
    if not _VERSION_RE.fullmatch(version_code):
        raise errors.BadRequest(
            f"client_version.version_code must be a decimal version code, got {version_code[:40]!r}"
        )
    return int(version_code)


def version_in_range(version: int, minimum: str, maximum: str) -> bool:
    """Whether `version` lies in the task's [min, max] (empty bounds are open)."""
    return (not minimum or version >= int(minimum)) and (not maximum or version <= int(maximum))


def rate(rnd: Round, task: Task, version: int, *, already_assigned: bool = False) -> Rating:
    """Rates one round for a device, in ODP's check order (status, version, capacity).

    A round the device already holds an assignment in is full for it.
    """
    if rnd.status != RoundStatus.COLLECTING:
        return Rating.ITERATION_NOT_OPEN
    if not version_in_range(version, task.min_client_version, task.max_client_version):
        return Rating.CLIENT_VERSION_MISMATCH
    if already_assigned or rnd.active_count >= rnd.capacity:
        return Rating.ITERATION_FULL
    return Rating.SUCCESS


def draw_weighted(weights: list[int], rng: np.random.Generator) -> int | None:
    """Index drawn with probability weight/sum; zero weights are never drawn; None if all 0."""
    if any(w < 0 for w in weights):
        raise ValueError(f"traffic weights must be >= 0, got {weights}")
    total = sum(weights)
    if total == 0:
        return None
    point = int(rng.integers(0, total))  # uniform in [0, total)
    for index, weight in enumerate(weights):
        if point < weight:
            return index
        point -= weight
    raise AssertionError("unreachable: point < total")


def _rounds_held(session: Session, device_key: str | None, round_pks: list[int]) -> set[int]:
    if device_key is None or not round_pks:
        return set()
    return set(
        session.scalars(
            select(Assignment.round_pk).where(
                Assignment.device_key == device_key, Assignment.round_pk.in_(round_pks)
            )
        )
    )


def _insert_assignment(session: Session, values: dict[str, object]) -> bool:
    """Inserts the assignment row; False if the device already holds one in the round.

    With device auth the unique (round, device) index can refuse the row. `ON CONFLICT DO
    NOTHING` (PostgreSQL and SQLite alike) reports that as no row instead of an error, so no
    savepoint (two more round trips per check-in) is needed to survive it.
    """
    if values["device_key"] is None:  # anonymous: NULL keys never conflict
        session.execute(insert(Assignment), values)
        return True
    dialect = session.get_bind().dialect.name
    stmt = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(Assignment)
    # RETURNING, not rowcount: psycopg reports -1 for an INSERT ... ON CONFLICT here.
    inserted = stmt.values(values).on_conflict_do_nothing().returning(Assignment.id)
    return session.execute(inserted).first() is not None


_ASYNC_COMMIT = text("SET LOCAL synchronous_commit TO OFF")


def _take_slot(
    session: Session, rnd: Round, version_code: str, device_key: str | None, now: dt.datetime
) -> Assignment | None:
    """Creates the assignment and claims its slot; None if the round is full for this device.

    The rows are written first and the slot's conditional UPDATE comes last, right before the
    caller commits: the UPDATE locks the round's row (the one row every check-in of the round
    writes) until the commit, so nothing else runs while it is held. A lost claim deletes the
    rows again inside the same transaction, so no other transaction ever sees them.
    """
    assignment_id = str(uuid.uuid4())
    values: dict[str, object] = {
        "id": assignment_id,
        "round_pk": rnd.id,
        "status": AssignmentStatus.ASSIGNED,
        "client_version": version_code,
        "created_at": now,
        "status_changed_at": now,
        "device_key": device_key,
    }
    if not _insert_assignment(session, values):
        return None  # a concurrent check-in of the same device took this round first
    session.execute(
        insert(StatusChange),
        {
            "entity": EntityKind.ASSIGNMENT,
            "entity_id": assignment_id,
            "from_status": None,
            "to_status": AssignmentStatus.ASSIGNED.value,
            "changed_at": now,
            "reason": "",
        },
    )
    if session.get_bind().dialect.name == "postgresql":
        # The round row stays locked until the commit, so its fsync would serialize every
        # check-in of the round. An assignment lost in a crash costs nothing but a retry (its
        # report and upload are refused, and uploads commit synchronously), so this
        # transaction alone commits without waiting for the WAL flush.
        session.execute(_ASYNC_COMMIT)
    # The capacity check that counts: a conditional UPDATE, atomic under concurrency.
    if transitions.claim_slot(session, rnd.id):
        return Assignment(**values)  # detached: the row is written, callers only read it
    session.execute(
        delete(StatusChange).where(
            StatusChange.entity == EntityKind.ASSIGNMENT, StatusChange.entity_id == assignment_id
        )
    )
    session.execute(delete(Assignment).where(Assignment.id == assignment_id))
    return None


def check_in(
    *,
    session: Session,
    pop: str,
    version_code: str,
    rng: np.random.Generator,
    now: dt.datetime,
    device_key: str | None = None,
) -> Assigned | Rejection:
    """Assigns the device to a round of the population, or says why not.

    Args:
        session: Open session inside the caller's transaction.
        pop: Population name.
        version_code: The device's ClientVersion.version_code.
        rng: Source of the weighted draw between training and eval rounds.
        now: Current time.
        device_key: SHA-256 of the device's token (device auth on), else None (anonymous).

    Returns:
        The assignment, or a rejection with its retry window.

    Raises:
        BadRequest: The version code is not numeric.
    """
    version = parse_client_version(version_code)
    rows = session.execute(_ACTIVE_ROUNDS, {"pop": pop}).all()
    held = _rounds_held(session, device_key, [rnd.id for rnd, _ in rows])
    ratings = [
        (rate(rnd, task, version, already_assigned=rnd.id in held), rnd, task) for rnd, task in rows
    ]
    best = min((r for r, _, _ in ratings), default=Rating.ITERATION_NOT_ACTIVE)
    if best != Rating.SUCCESS:
        return rejection(best)
    candidates = [(rnd, task) for r, rnd, task in ratings if r == Rating.SUCCESS]
    while candidates:
        index = draw_weighted([task.traffic_weight for _, task in candidates], rng)
        if index is None:
            return rejection(Rating.ITERATION_NOT_ACTIVE)
        rnd, task = candidates.pop(index)
        assignment = _take_slot(session, rnd, version_code, device_key, now)
        if assignment is not None:
            return Assigned(assignment=assignment, round=rnd, task=task)
    return rejection(Rating.ITERATION_FULL)
