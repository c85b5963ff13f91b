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

Check-in is the server's hottest path, so it runs fixed SQL on the session's connection (no
ORM entities): one read of the active rounds, then the slot claim (see `_take_slot`).
"""

import contextlib
import dataclasses
import datetime as dt
import enum
import re
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
from sqlalchemy import Connection, Integer, String, bindparam, column, text
from sqlalchemy.orm import Session
from sqlalchemy.sql.expression import ColumnClause

from fcp_server import errors
from fcp_server.protos import common_pb2
from fcp_server.storage.models import (
    ACTIVE_ROUND_STATUSES,
    AssignmentStatus,
    EntityKind,
    RoundStatus,
    TaskStatus,
    UtcDateTime,
)

_VERSION_RE = re.compile(r"^[0-9]{1,18}$")
_Reason = common_pb2.RejectionReason
# Retry windows of ODP's server, seconds.
SHORT_RETRY = (60, 300)
LONG_RETRY = (86_400, 172_800)


@dataclasses.dataclass(frozen=True, slots=True)
class OpenRound:
    """An active round of the population with the fields of its task that check-in reads."""

    round_pk: int
    status: str  # a RoundStatus name, as stored
    capacity: int
    active_count: int
    iteration_id: int
    base_result_id: int
    client_checkpoint_sha256: str | None
    population_name: str
    task_id: int
    min_client_version: str
    max_client_version: str
    traffic_weight: int
    client_plan_sha256: str | None
    info_json: str


def _names(statuses: tuple[enum.Enum, ...]) -> str:
    return ", ".join(f"'{status.name}'" for status in statuses)


def _result_columns(*names: str) -> list[ColumnClause[Any]]:
    # Declared result columns let SQLAlchemy reuse the result metadata instead of rebuilding
    # it from the cursor description on every execution.
    return [column(name, Integer if name in _INT_COLUMNS else String) for name in names]


_INT_COLUMNS = frozenset(
    {"round_pk", "capacity", "active_count", "iteration_id", "base_result_id", "task_id"}
    | {"traffic_weight", "claimed", "inserted"}
)
# Statuses are stored as enum names in VARCHARs, so the constants are written into the SQL.
_ACTIVE_ROUNDS = text(
    "SELECT r.id, r.status, r.capacity, r.active_count, r.iteration_id, r.base_result_id,"
    " r.client_checkpoint_sha256, t.population_name, t.task_id, t.min_client_version,"
    " t.max_client_version, t.traffic_weight, t.client_plan_sha256, t.info_json"
    " FROM rounds AS r JOIN tasks AS t ON r.task_pk = t.id"
    f" WHERE t.population_name = :pop AND t.status = '{TaskStatus.OPEN.name}'"
    f" AND r.status IN ({_names(ACTIVE_ROUND_STATUSES)}) ORDER BY r.id"
).columns(*_result_columns(*(field.name for field in dataclasses.fields(OpenRound))))
_ROUNDS_HELD = (
    text("SELECT round_pk FROM assignments WHERE device_key = :key AND round_pk IN :round_pks")
    .bindparams(bindparam("round_pks", expanding=True))
    .columns(*_result_columns("round_pk"))
)
# The capacity check that counts: a conditional UPDATE, atomic under concurrency.
_CLAIM = (
    "UPDATE rounds SET active_count = active_count + 1 WHERE id = :round_pk"
    f" AND status = '{RoundStatus.COLLECTING.name}' AND active_count < capacity"
)
_RELEASE = text("UPDATE rounds SET active_count = active_count - 1 WHERE id = :round_pk")
_INSERT_ASSIGNMENT = (
    "INSERT INTO assignments"
    " (id, round_pk, status, client_version, created_at, status_changed_at, device_key)"
)
_INSERT_HISTORY = (
    "INSERT INTO status_history (entity, entity_id, from_status, to_status, changed_at, reason)"
)
# Only the unique (round, device) index may skip the insert: NULL keys (anonymous devices)
# never conflict there, so for them the insert either happens or fails the whole statement.
_SKIP_HELD = "ON CONFLICT (round_pk, device_key) DO NOTHING RETURNING id"
_ASSIGNED, _ENTITY = AssignmentStatus.ASSIGNED.name, EntityKind.ASSIGNMENT.name
_NOW = bindparam("now", type_=UtcDateTime())
# SQLite: three statements inside the BEGIN IMMEDIATE transaction, which already excludes
# every other writer.
_SQLITE_CLAIM = text(_CLAIM)
_SQLITE_ASSIGNMENT = (
    text(
        f"{_INSERT_ASSIGNMENT} VALUES (:id, :round_pk, '{_ASSIGNED}', :version, :now, :now,"
        f" :device_key) {_SKIP_HELD}"
    )
    .bindparams(_NOW)
    .columns(column("id", String))
)
_SQLITE_HISTORY = text(
    f"{_INSERT_HISTORY} VALUES ('{_ENTITY}', :id, NULL, '{_ASSIGNED}', :now, '')"
).bindparams(_NOW)
# PostgreSQL: one statement, one round trip, that inserts the rows only if the claim
# succeeded. The claim locks the round's row (the one row every check-in of the round
# writes) until the commit, so nothing but this statement and its commit may run meanwhile.
# The commit does not wait for the WAL flush: an assignment lost in a crash costs nothing but
# a retry (its report and upload are refused; uploads commit synchronously).
_PG_TAKE_SLOT = (
    text(
        f"WITH claim AS ({_CLAIM} RETURNING id),"
        f" assignment AS ({_INSERT_ASSIGNMENT} SELECT CAST(:id AS VARCHAR), claim.id,"
        f" '{_ASSIGNED}', CAST(:version AS VARCHAR), :now, :now, CAST(:device_key AS VARCHAR)"
        f" FROM claim {_SKIP_HELD}),"
        f" history AS ({_INSERT_HISTORY} SELECT '{_ENTITY}', assignment.id, NULL,"
        f" '{_ASSIGNED}', :now, '' FROM assignment)"
        " SELECT (SELECT count(*) FROM claim) AS claimed,"
        " (SELECT count(*) FROM assignment) AS inserted,"
        " set_config('synchronous_commit', 'off', true) AS sync"
    )
    .bindparams(_NOW)
    .columns(*_result_columns("claimed", "inserted", "sync"))
)


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
    """A new assignment (already written) and the round it belongs to."""

    assignment_id: str
    created_at: dt.datetime
    round: OpenRound


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


def rate(rnd: OpenRound, version: int, *, already_assigned: bool = False) -> Rating:
    """Rates one round for a device, in ODP's check order (status, version, capacity).

    A round the device already holds an assignment in is full for it.
    """
    if rnd.status != RoundStatus.COLLECTING.name:
        return Rating.ITERATION_NOT_OPEN
    if not version_in_range(version, rnd.min_client_version, rnd.max_client_version):
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


def active_rounds(conn: Connection, pop: str) -> list[OpenRound]:
    """The population's rounds in an active status, of its OPEN tasks, oldest first."""
    return [OpenRound(*row) for row in conn.execute(_ACTIVE_ROUNDS, {"pop": pop})]


def _rounds_held(conn: Connection, device_key: str | None, round_pks: list[int]) -> set[int]:
    if device_key is None or not round_pks:
        return set()
    return set(conn.scalars(_ROUNDS_HELD, {"key": device_key, "round_pks": round_pks}))


def _take_slot(
    session: Session, round_pk: int, version_code: str, device_key: str | None, now: dt.datetime
) -> str | None:
    """Claims a slot of the round and writes the assignment; its id, or None if it is full.

    The claim comes first and the assignment and its status change are written only if it
    succeeded. With device auth the unique (round, device) index may still skip the
    assignment (a concurrent check-in of the same device took the round first); the slot is
    then given back inside the same transaction, so no other transaction ever sees it taken.
    """
    conn = session.connection()
    params: dict[str, object] = {
        "round_pk": round_pk,
        "id": str(uuid.uuid4()),
        "version": version_code,
        "now": now,
        "device_key": device_key,
    }
    if conn.dialect.name == "postgresql":
        claimed, inserted, _ = conn.execute(_PG_TAKE_SLOT, params).one()
    else:
        claimed = conn.execute(_SQLITE_CLAIM, params).rowcount
        inserted = claimed and len(conn.execute(_SQLITE_ASSIGNMENT, params).all())
        if inserted:
            conn.execute(_SQLITE_HISTORY, params)
    if claimed != 1:
        return None
    if inserted != 1:
        conn.execute(_RELEASE, params)
        return None
    return str(params["id"])


@contextlib.contextmanager
def transaction(session: Session, device_key: str | None) -> Iterator[None]:
    """The check-in's transaction on `session` (commits on success, else rolls back).

    An anonymous check-in on PostgreSQL runs in autocommit mode: its only write is the one
    statement of `_take_slot`, atomic by itself (nothing can make it skip its insert, so
    nothing is ever given back), and the read before it needs no snapshot of its own. That
    saves the BEGIN and COMMIT round trips of every check-in.
    """
    with session.begin():
        if device_key is None and session.get_bind().dialect.name == "postgresql":
            session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
        yield


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
    conn = session.connection()
    rounds = active_rounds(conn, pop)
    held = _rounds_held(conn, device_key, [rnd.round_pk for rnd in rounds])
    ratings = [(rate(rnd, version, already_assigned=rnd.round_pk in held), rnd) for rnd in rounds]
    best = min((r for r, _ in ratings), default=Rating.ITERATION_NOT_ACTIVE)
    if best != Rating.SUCCESS:
        return rejection(best)
    candidates = [rnd for r, rnd in ratings if r == Rating.SUCCESS]
    while candidates:
        index = draw_weighted([rnd.traffic_weight for rnd in candidates], rng)
        if index is None:
            return rejection(Rating.ITERATION_NOT_ACTIVE)
        rnd = candidates.pop(index)
        assignment_id = _take_slot(session, rnd.round_pk, version_code, device_key, now)
        if assignment_id is not None:
            return Assigned(assignment_id=assignment_id, created_at=now, round=rnd)
    return rejection(Rating.ITERATION_FULL)
