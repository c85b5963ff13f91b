"""Canceling a task: any active status -> CANCELED, and its active rounds with it.

The builder rolls back a failed build this way and administrators stop a task (`fcp-server
tasks cancel`). Every change is a compare-and-swap; the rounds are canceled before the task,
the order in which a round close and a deadline retry lock their round and then its task, so
the two never wait for each other in a cycle on PostgreSQL.
"""

import datetime as dt

from sqlalchemy import select
from sqlalchemy.orm import Session

from fcp_server import errors
from fcp_server.services.tasks import get_task
from fcp_server.storage import transitions
from fcp_server.storage.models import (
    ACTIVE_ROUND_STATUSES,
    ACTIVE_TASK_STATUSES,
    Round,
    RoundStatus,
    Task,
    TaskStatus,
)


def cancel_task(
    *,
    session: Session,
    pop: str,
    task_id: int,
    now: dt.datetime,
    reason: str = "canceled by an administrator",
) -> Task:
    """Moves an active task to CANCELED and cancels its active rounds.

    Raises:
        NotFound: Unknown task.
        Conflict: The task already ended.
    """
    task = get_task(session, pop, task_id)
    not_active = errors.Conflict(f"task {pop}/{task_id} is {task.status.value}, not active")
    if task.status not in ACTIVE_TASK_STATUSES:
        raise not_active
    # Rounds first: a round close and a deadline retry lock their round, then its task; the
    # opposite order here made PostgreSQL kill one of them as a deadlock. A Conflict below
    # rolls these changes back.
    _cancel_active_rounds(session, task.id, now)
    for status in ACTIVE_TASK_STATUSES:
        if transitions.move_task(
            session,
            task.id,
            status,
            TaskStatus.CANCELED,
            now=now,
            reason=reason,
            stopped_at=now,
            status_reason=reason,
        ):
            break
    else:
        raise not_active
    # Rounds started meanwhile: their transactions updated the task, so the CAS above waited
    # for them to commit. Later starts wait for this transaction, then find the task or their
    # round no longer active.
    _cancel_active_rounds(session, task.id, now)
    session.refresh(task)
    return task


def _cancel_active_rounds(session: Session, task_pk: int, now: dt.datetime) -> None:
    rounds = session.scalars(
        select(Round.id).where(Round.task_pk == task_pk, Round.status.in_(ACTIVE_ROUND_STATUSES))
    )
    for round_pk in rounds.all():
        _cancel_round(session, round_pk, now)


def _cancel_round(session: Session, round_pk: int, now: dt.datetime) -> None:
    # A round read as active may move on before its CAS (the upload filling its goal, a
    # worker's claim): retry from its current status until canceled or no longer active.
    while True:
        status = session.scalar(select(Round.status).where(Round.id == round_pk))
        if status not in ACTIVE_ROUND_STATUSES:
            return
        if transitions.move_round(
            session,
            round_pk,
            status,
            RoundStatus.CANCELED,
            now=now,
            reason="task canceled",
            status_reason="task canceled",
        ):
            return
