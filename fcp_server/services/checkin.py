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

Check-in is the server's hottest path; its SQL (one read of the active rounds, then the slot
claim) lives in `round_slots`. The read may come from a short-lived per-process cache
(`round_cache`), which only chooses the round to try: the claim decides, and no rejection is
given on cached rows.
"""

import contextlib
import dataclasses
import datetime as dt
import enum
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from sqlalchemy import Connection

from fcp_server import errors
from fcp_server.protos import common_pb2
from fcp_server.services.round_cache import OpenRoundsCache
from fcp_server.services.round_slots import OpenRound, active_rounds, rounds_held, take_slot
from fcp_server.storage.db import Database
from fcp_server.storage.models import RoundStatus

_VERSION_RE = re.compile(r"^[0-9]{1,18}$")
_Reason = common_pb2.RejectionReason
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


def draw_weighted(
    weights: list[int], rng: np.random.Generator | Callable[[], np.random.Generator]
) -> int | None:
    """Index drawn with probability weight/sum; zero weights are never drawn; None if all 0.

    `rng` may be a generator or a function returning one, called only when there is a choice
    to make: a lone positive weight is returned without a draw.
    """
    if any(w < 0 for w in weights):
        raise ValueError(f"traffic weights must be >= 0, got {weights}")
    total = sum(weights)
    if total == 0:
        return None
    if total in weights:  # one positive weight: certain, nothing to draw
        return weights.index(total)
    generator = rng if isinstance(rng, np.random.Generator) else rng()
    point = int(generator.integers(0, total))  # uniform in [0, total)
    for index, weight in enumerate(weights):
        if point < weight:
            return index
        point -= weight
    raise AssertionError("unreachable: point < total")


@contextlib.contextmanager
def transaction(database: Database, device_key: str | None) -> Iterator[Connection]:
    """The check-in's connection, in a transaction that commits on success, else rolls back.

    Check-in runs fixed SQL, so it needs a connection, not a session. An anonymous check-in on
    PostgreSQL runs in autocommit mode instead: its only write is the one statement of
    `round_slots.take_slot`, atomic by itself (nothing can make it skip its insert, so nothing
    is ever given back), and the read before it needs no snapshot of its own. That saves the
    BEGIN and COMMIT round trips of every check-in.
    """
    if device_key is not None or database.engine.dialect.name != "postgresql":
        # The transaction begins with the first statement (SQLAlchemy's autobegin), not on
        # entry: on SQLite that BEGIN IMMEDIATE takes the write lock (`storage.db`), and the
        # work before it (a cached round chosen, the draw) need not hold it.
        with database.engine.connect() as conn:
            yield conn
            conn.commit()
        return
    with database.engine.connect() as conn:
        # Switched on the driver's connection, not with SQLAlchemy's `isolation_level` option,
        # whose switch and reset per checkout cost about as much CPU as the statement. The
        # connection goes back to the pool as it came, unless it broke (then it is discarded).
        driver: Any = conn.connection.driver_connection  # psycopg's connection
        driver.autocommit = True
        try:
            yield conn
        finally:
            if not conn.invalidated:
                try:
                    driver.autocommit = False
                except Exception as e:  # it broke meanwhile: discarded instead of pooled
                    conn.invalidate(e)


def check_in(
    *,
    conn: Connection,
    pop: str,
    version_code: str,
    rng: Callable[[], np.random.Generator],
    now: dt.datetime,
    device_key: str | None = None,
    cache: OpenRoundsCache | None = None,
) -> Assigned | Rejection:
    """Assigns the device to a round of the population, or says why not.

    Args:
        conn: The connection of the caller's `transaction`.
        pop: Population name.
        version_code: The device's ClientVersion.version_code.
        rng: Returns the generator of the weighted draw between rounds; called only when
            there is more than one round to draw from.
        now: Current time.
        device_key: SHA-256 of the device's token (device auth on), else None (anonymous).
        cache: This process's cache of open rounds; without one, every check-in reads them.

    Returns:
        The assignment, or a rejection with its retry window.

    Raises:
        BadRequest: The version code is not numeric.
    """
    version = parse_client_version(version_code)
    if cache is None:
        rounds: Sequence[OpenRound] = active_rounds(conn, pop)
    else:
        cached = cache.get(pop, now)
        if cached is not None:
            # Cached rows may only lead to an assignment (see `round_cache`): a rejection or
            # a failed claim drops them, and the answer is decided again on a fresh read.
            outcome = _assign(
                conn, cached, version, version_code, rng, now, device_key, first_claim=True
            )
            if isinstance(outcome, Assigned):
                return outcome
            cache.invalidate(pop)
        rounds = cache.read(conn, pop, now)
    outcome = _assign(conn, rounds, version, version_code, rng, now, device_key)
    return outcome if isinstance(outcome, Assigned) else rejection(outcome)


def _assign(
    conn: Connection,
    rounds: Sequence[OpenRound],
    version: int,
    version_code: str,
    rng: Callable[[], np.random.Generator],
    now: dt.datetime,
    device_key: str | None,
    *,
    first_claim: bool = False,
) -> Assigned | Rating:
    """Rates `rounds`, draws among the eligible ones and claims a slot; else the rating.

    Tries every eligible round before giving up with ITERATION_FULL, or only the first one
    drawn with `first_claim`.
    """
    held = rounds_held(conn, device_key, [rnd.round_pk for rnd in rounds])
    ratings = [(rate(rnd, version, already_assigned=rnd.round_pk in held), rnd) for rnd in rounds]
    best = min((r for r, _ in ratings), default=Rating.ITERATION_NOT_ACTIVE)
    if best != Rating.SUCCESS:
        return best
    candidates = [rnd for r, rnd in ratings if r == Rating.SUCCESS]
    while candidates:
        index = draw_weighted([rnd.traffic_weight for rnd in candidates], rng)
        if index is None:
            return Rating.ITERATION_NOT_ACTIVE
        rnd = candidates.pop(index)
        assignment_id = take_slot(conn, rnd.round_pk, version_code, device_key, now)
        if assignment_id is not None:
            return Assigned(assignment_id=assignment_id, created_at=now, round=rnd)
        if first_claim:
            break
    return Rating.ITERATION_FULL
