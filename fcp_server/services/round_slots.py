"""Check-in's SQL: the population's open rounds, and taking a slot in one atomically.

Check-in is the server's hottest path, so it runs fixed SQL on a connection (no ORM
entities): one read of the active rounds (`active_rounds`, often served by `round_cache`, plus
`rounds_held` with device auth), then the slot claim (`take_slot`). The capacity check is the
`active_count < capacity` condition of the UPDATE that takes the slot, so concurrent check-ins
never over-assign, and its `status = COLLECTING` condition keeps a closed round closed.
"""

import dataclasses
import datetime as dt
import enum
import re
import uuid
import weakref
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, Dialect, Integer, String, bindparam, column, text
from sqlalchemy.sql.expression import ColumnClause

from fcp_server.storage.models import (
    ACTIVE_ROUND_STATUSES,
    AssignmentStatus,
    EntityKind,
    RoundStatus,
    TaskStatus,
    UtcDateTime,
)


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
    | {"traffic_weight"}
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
_SKIP_HELD = "ON CONFLICT (round_pk, device_key) DO NOTHING"
_ASSIGNED, _ENTITY = AssignmentStatus.ASSIGNED.name, EntityKind.ASSIGNMENT.name
# The slot's statements run as driver SQL (`exec_driver_sql`): SQLAlchemy's events, error
# wrapping and disconnect handling apply as to any statement, but without the compiled-cache
# lookup and per-statement parameter processing, which cost more than SQLite's own work for
# these one-row statements. Where a row count says enough, the statement returns no rows:
# SQLAlchemy rebuilds a result's column metadata from the cursor on every driver-SQL
# execution, which cost about a third of a one-row statement's CPU. `now` is converted once
# per check-in by the column type's own bind processor (`_bound_now`), so the rows hold
# exactly what the ORM writes. Placeholders are written `:name` (sqlite3's named style) and
# rewritten for psycopg (`%(name)s`).
_STAMP = UtcDateTime()
_STAMP_PROCESSORS: "weakref.WeakKeyDictionary[Dialect, Callable[[Any], Any] | None]" = (
    weakref.WeakKeyDictionary()
)
_PLACEHOLDER = re.compile(r"(?<![:\w]):(\w+)")
# SQLite: three statements inside the BEGIN IMMEDIATE transaction, which already excludes
# every other writer; the assignment's row count says whether the index skipped it.
_SQLITE_CLAIM = _CLAIM
_SQLITE_ASSIGNMENT = (
    f"{_INSERT_ASSIGNMENT} VALUES (:id, :round_pk, '{_ASSIGNED}', :version, :now, :now,"
    f" :device_key) {_SKIP_HELD}"
)
_SQLITE_HISTORY = f"{_INSERT_HISTORY} VALUES ('{_ENTITY}', :id, NULL, '{_ASSIGNED}', :now, '')"
# PostgreSQL: one statement, one round trip, that inserts the rows only if the claim
# succeeded. The claim locks the round's row (the one row every check-in of the round
# writes) until the commit, so nothing but this statement and its commit may run meanwhile.
# The commit does not wait for the WAL flush (`set_config`, local to the transaction): an
# assignment lost in a crash costs nothing but a retry (its report and upload are refused;
# uploads commit synchronously).
_PG_ASSIGNMENT = (
    f"{_INSERT_ASSIGNMENT} SELECT CAST(:id AS VARCHAR), claim.id, '{_ASSIGNED}',"
    " CAST(:version AS VARCHAR), :now, :now, CAST(:device_key AS VARCHAR) FROM claim"
)
_PG_HISTORY = (
    f"{_INSERT_HISTORY} SELECT '{_ENTITY}', assignment.id, NULL, '{_ASSIGNED}', :now, ''"
    " FROM assignment"
)
# With a device key the unique (round, device) index may skip the assignment after the
# claim, so the statement answers both counts and `take_slot` gives a skipped claim back.
_PG_TAKE_SLOT = _PLACEHOLDER.sub(
    r"%(\1)s",
    f"WITH claim AS ({_CLAIM} RETURNING id),"
    f" assignment AS ({_PG_ASSIGNMENT} {_SKIP_HELD} RETURNING id),"
    f" history AS ({_PG_HISTORY})"
    " SELECT (SELECT count(*) FROM claim) AS claimed,"
    " (SELECT count(*) FROM assignment) AS inserted,"
    " set_config('synchronous_commit', 'off', true) AS sync",
)
# Anonymous (a NULL key never conflicts, and there is no ON CONFLICT to skip a row: any
# conflict fails the whole statement): each claimed row makes exactly one assignment and one
# history row, so the history INSERT's row count is the claim's, and no rows are returned.
# The RETURNING of the claim runs `set_config` for the claimed row, the only case that writes.
_PG_TAKE_ANONYMOUS_SLOT = _PLACEHOLDER.sub(
    r"%(\1)s",
    f"WITH claim AS ({_CLAIM} RETURNING id, set_config('synchronous_commit', 'off', true)),"
    f" assignment AS ({_PG_ASSIGNMENT} RETURNING id)"
    f" {_PG_HISTORY}",
)


def _bound_now(dialect: Dialect, now: dt.datetime) -> Any:
    """`now` as the dialect's driver receives a `UtcDateTime` value (naive input refused)."""
    try:
        processor = _STAMP_PROCESSORS[dialect]
    except KeyError:
        processor = _STAMP_PROCESSORS.setdefault(dialect, _STAMP.bind_processor(dialect))
    return now if processor is None else processor(now)


def active_rounds(conn: Connection, pop: str) -> list[OpenRound]:
    """The population's rounds in an active status, of its OPEN tasks, oldest first."""
    return [OpenRound(*row) for row in conn.execute(_ACTIVE_ROUNDS, {"pop": pop})]


def rounds_held(conn: Connection, device_key: str | None, round_pks: list[int]) -> set[int]:
    """Which of `round_pks` the device already holds an assignment in (none if anonymous)."""
    if device_key is None or not round_pks:
        return set()
    return set(conn.scalars(_ROUNDS_HELD, {"key": device_key, "round_pks": round_pks}))


def take_slot(
    conn: Connection, round_pk: int, version_code: str, device_key: str | None, now: dt.datetime
) -> str | None:
    """Claims a slot of the round and writes the assignment; its id, or None if it is full.

    The claim comes first and the assignment and its status change are written only if it
    succeeded. With device auth the unique (round, device) index may still skip the
    assignment (a concurrent check-in of the same device took the round first); the slot is
    then given back inside the same transaction, so no other transaction ever sees it taken.
    """
    params: dict[str, Any] = {
        "round_pk": round_pk,
        "id": str(uuid.uuid4()),
        "version": version_code,
        "now": _bound_now(conn.dialect, now),
        "device_key": device_key,
    }
    if conn.dialect.name != "postgresql":
        claimed = conn.exec_driver_sql(_SQLITE_CLAIM, params).rowcount
        inserted = claimed and conn.exec_driver_sql(_SQLITE_ASSIGNMENT, params).rowcount
        if inserted:
            conn.exec_driver_sql(_SQLITE_HISTORY, params)
    elif device_key is None:
        claimed = inserted = conn.exec_driver_sql(_PG_TAKE_ANONYMOUS_SLOT, params).rowcount
    else:
        claimed, inserted, _ = conn.exec_driver_sql(_PG_TAKE_SLOT, params).one()
    if claimed != 1:
        return None
    if inserted != 1:
        conn.execute(_RELEASE, params)
        return None
    return str(params["id"])
