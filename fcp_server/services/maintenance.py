"""Background maintenance the worker runs every tick: timeouts, deadlines, stale claims, eval.

* assignment timeouts (ODP collector `processTimeouts`): ASSIGNED longer than the local compute
  timeout -> LOCAL_TIMEOUT, LOCAL_COMPLETED longer than the upload timeout -> UPLOAD_TIMEOUT,
  each freeing its round slot so other devices can take it;
* leftovers: assignments still ASSIGNED/LOCAL_COMPLETED in a round that stopped collecting are
  CANCELED (their uploads would be refused anyway);
* round deadlines: a COLLECTING round past `deadline_at` is retried or failed
  (`rounds.expire_round`); the reference had no deadline and could wait forever;
* stale claims: an APPLYING round untouched for `apply_lease_seconds` belonged to a worker that
  died; its claim is released for retry or the round fails (`rounds.fail_apply`);
* eval scheduling: OPEN eval tasks without a round start one when a new training result exists.

Each function works in the caller's transaction on a bounded batch and is safe to run from
many processes at once: every change is a compare-and-swap.
"""

import collections
import datetime as dt

from sqlalchemy import select
from sqlalchemy.orm import Session

from fcp_server.services import eval_rounds, rounds
from fcp_server.settings import ServerSettings
from fcp_server.storage import transitions
from fcp_server.storage.blobs import BlobStore
from fcp_server.storage.models import (
    ACTIVE_ROUND_STATUSES,
    Assignment,
    AssignmentStatus,
    Round,
    RoundStatus,
    Task,
    TaskKind,
    TaskStatus,
)

BATCH = 500


def expire_assignments(session: Session, *, now: dt.datetime, settings: ServerSettings) -> int:
    """Times out devices that went silent; returns how many assignments timed out.

    Lock order: every assignment first (by id), then the rounds whose slots are freed (by
    id), as uploads and reports lock their assignment before its round. Freeing a slot right
    after each timeout held the round while waiting for the next assignment, which an upload
    could hold while waiting for that round: a deadlock PostgreSQL breaks by aborting one.
    """
    rules = (
        (
            AssignmentStatus.ASSIGNED,
            AssignmentStatus.LOCAL_TIMEOUT,
            settings.local_compute_timeout_seconds,
        ),
        (
            AssignmentStatus.LOCAL_COMPLETED,
            AssignmentStatus.UPLOAD_TIMEOUT,
            settings.upload_timeout_seconds,
        ),
    )
    freed: collections.Counter[int] = collections.Counter()
    for source, target, seconds in rules:
        cutoff = now - dt.timedelta(seconds=seconds)
        rows = session.execute(
            select(Assignment.id, Assignment.round_pk)
            .join(Round, Assignment.round_pk == Round.id)
            .where(
                Assignment.status == source,
                Assignment.status_changed_at < cutoff,
                Round.status == RoundStatus.COLLECTING,
            )
            .order_by(Assignment.id)
            .limit(BATCH)
        ).all()
        for assignment_id, round_pk in rows:
            if transitions.move_assignment(
                session,
                assignment_id,
                source,
                target,
                now=now,
                reason=f"no progress for {seconds} s",
            ):
                freed[round_pk] += 1
    for round_pk in sorted(freed):
        for _ in range(freed[round_pk]):
            transitions.release_slot(session, round_pk)
    return freed.total()


def cancel_leftover_assignments(session: Session, *, now: dt.datetime) -> int:
    """Cancels unfinished assignments of rounds that stopped collecting."""
    rows = session.execute(
        select(Assignment.id, Assignment.status)
        .join(Round, Assignment.round_pk == Round.id)
        .where(
            Assignment.status.in_((AssignmentStatus.ASSIGNED, AssignmentStatus.LOCAL_COMPLETED)),
            Round.status != RoundStatus.COLLECTING,
        )
        .order_by(Assignment.id)  # the timeout sweep's lock order
        .limit(BATCH)
    ).all()
    canceled = 0
    for assignment_id, status in rows:
        canceled += transitions.move_assignment(
            session,
            assignment_id,
            status,
            AssignmentStatus.CANCELED,
            now=now,
            reason="round stopped collecting",
        )
    return canceled


def expire_rounds(session: Session, *, now: dt.datetime, settings: ServerSettings) -> int:
    """Retries or fails COLLECTING rounds past their deadline; returns how many expired."""
    rows = session.execute(
        select(Round, Task)
        .join(Task, Round.task_pk == Task.id)
        .where(Round.status == RoundStatus.COLLECTING, Round.deadline_at < now)
        .limit(BATCH)
    ).all()
    return sum(
        rounds.expire_round(session=session, rnd=rnd, task=task, now=now, settings=settings)
        for rnd, task in rows
    )


def recover_stale_applies(session: Session, *, now: dt.datetime, settings: ServerSettings) -> int:
    """Releases (or fails) APPLYING claims of workers that stopped; returns how many."""
    cutoff = now - dt.timedelta(seconds=settings.apply_lease_seconds)
    rows = session.execute(
        select(Round, Task)
        .join(Task, Round.task_pk == Task.id)
        .where(Round.status == RoundStatus.APPLYING, Round.status_changed_at < cutoff)
        .limit(BATCH)
    ).all()
    return sum(
        rounds.fail_apply(
            session=session,
            rnd=rnd,
            task=task,
            now=now,
            settings=settings,
            claim=rnd.apply_attempts,
            reason="aggregation lease expired",
        )
        for rnd, task in rows
    )


def schedule_eval_rounds(session: Session, *, blobs: BlobStore, now: dt.datetime) -> int:
    """Starts eval rounds for OPEN eval tasks that have none running; returns how many."""
    busy = select(Round.task_pk).where(Round.status.in_(ACTIVE_ROUND_STATUSES))
    idle = session.scalars(
        select(Task)
        .where(
            Task.kind == TaskKind.EVALUATION, Task.status == TaskStatus.OPEN, Task.id.not_in(busy)
        )
        .limit(BATCH)
    ).all()
    started = 0
    for task in idle:
        started += (
            eval_rounds.maybe_start_eval_round(session=session, blobs=blobs, task=task, now=now)
            is not None
        )
    return started
