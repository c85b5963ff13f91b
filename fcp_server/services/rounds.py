"""Round lifecycle: start a round, advance after a close, retry or fail stuck rounds.

A round (ODP "iteration") moves COLLECTING -> AGGREGATING -> APPLYING -> COMPLETED, every move
a compare-and-swap (see `storage.transitions`). Unlike the reference, a round can never stay
stuck: a COLLECTING round past its deadline is retried as a new attempt (the same iteration,
uploads of the expired attempt discarded so exactly report_goal fresh updates are aggregated)
and after `max_round_attempts` the task fails; an aggregation that errors or whose worker died
is retried `max_apply_attempts` times, then the round and task fail. An aggregation stopped by
an unavailable database or blob store is retried without counting (`release_uncounted`).

Training round N starts from result N-1 ({pop}/{task}/{N-1}/d/0/client_checkpoint) and
publishes result N. Opening a task is `task_open`; evaluation rounds are started by
`eval_rounds`, which uses `start_round` and `end_task` from here.
"""

import datetime as dt
import logging

from sqlalchemy.orm import Session

from fcp_server.settings import ServerSettings
from fcp_server.storage import transitions
from fcp_server.storage.models import (
    EntityKind,
    Round,
    RoundStatus,
    Task,
    TaskKind,
    TaskStatus,
)

_LOG = logging.getLogger(__name__)


def start_round(
    session: Session,
    task: Task,
    *,
    iteration_id: int,
    attempt: int,
    base_result_id: int,
    checkpoint_sha256: str,
    now: dt.datetime,
    evaluated_result_id: int | None = None,
) -> Round:
    """Inserts a COLLECTING round and points the task at it."""
    deadline = now + dt.timedelta(seconds=task.round_deadline_seconds)
    rnd = Round(
        task_pk=task.id,
        iteration_id=iteration_id,
        attempt=attempt,
        status=RoundStatus.COLLECTING,
        report_goal=task.report_goal,
        capacity=task.max_aggregation_size,
        active_count=0,
        reported_count=0,
        aggregated_count=0,
        base_result_id=base_result_id,
        evaluated_result_id=evaluated_result_id,
        client_checkpoint_sha256=checkpoint_sha256,
        created_at=now,
        deadline_at=deadline,
        status_changed_at=now,
        apply_attempts=0,
        status_reason="",
    )
    session.add(rnd)
    session.flush()
    transitions.record_change(session, EntityKind.ROUND, rnd.id, None, rnd.status, now=now)
    task.current_iteration = iteration_id
    return rnd


def end_task(
    session: Session, task: Task, status: TaskStatus, *, now: dt.datetime, reason: str
) -> bool:
    """OPEN -> COMPLETED/FAILED with a reason; False if the task was no longer OPEN."""
    changed = transitions.move_task(
        session,
        task.id,
        TaskStatus.OPEN,
        status,
        now=now,
        reason=reason,
        stopped_at=now,
        status_reason=reason,
    )
    if changed:
        _LOG.info("task %s/%s %s: %s", task.population_name, task.task_id, status.value, reason)
    return changed


def advance_after_close(
    *,
    session: Session,
    task: Task,
    rnd: Round,
    now: dt.datetime,
    budget_exhausted: bool,
    checkpoint_sha256: str | None,
) -> None:
    """After round N COMPLETED: start round N+1, or end the task (rounds done / DP budget)."""
    task.completed_iterations = rnd.iteration_id
    if task.kind == TaskKind.EVALUATION:
        return  # the next eval round waits for a new training result (`eval_rounds`)
    if rnd.iteration_id >= task.total_iteration:
        end_task(session, task, TaskStatus.COMPLETED, now=now, reason="all rounds completed")
    elif budget_exhausted:
        end_task(
            session,
            task,
            TaskStatus.COMPLETED,
            now=now,
            reason="DP budget: another round would exceed the target epsilon",
        )
    elif task.status == TaskStatus.OPEN and checkpoint_sha256 is not None:
        start_round(
            session,
            task,
            iteration_id=rnd.iteration_id + 1,
            attempt=0,
            base_result_id=rnd.iteration_id,
            checkpoint_sha256=checkpoint_sha256,
            now=now,
        )


def expire_round(
    *, session: Session, rnd: Round, task: Task, now: dt.datetime, settings: ServerSettings
) -> bool:
    """A COLLECTING round past its deadline: retry as a new attempt, or fail the task."""
    retry = rnd.attempt + 1 < settings.max_round_attempts and task.status == TaskStatus.OPEN
    reason = (
        f"deadline passed with {rnd.reported_count}/{rnd.report_goal} updates "
        f"(attempt {rnd.attempt + 1} of {settings.max_round_attempts})"
    )
    target = RoundStatus.CANCELED if retry else RoundStatus.FAILED
    if not transitions.move_round(
        session,
        rnd.id,
        RoundStatus.COLLECTING,
        target,
        now=now,
        reason=reason,
        status_reason=reason,
    ):
        return False
    if retry:
        start_round(
            session,
            task,
            iteration_id=rnd.iteration_id,
            attempt=rnd.attempt + 1,
            base_result_id=rnd.base_result_id,
            evaluated_result_id=rnd.evaluated_result_id,
            checkpoint_sha256=rnd.client_checkpoint_sha256 or "",
            now=now,
        )
    else:
        end_task(
            session,
            task,
            TaskStatus.FAILED,
            now=now,
            reason=f"round {rnd.iteration_id} failed: {reason}",
        )
    return True


def fail_apply(
    *,
    session: Session,
    rnd: Round,
    task: Task,
    now: dt.datetime,
    settings: ServerSettings,
    reason: str,
    claim: int,
) -> bool:
    """An aggregation attempt failed or was abandoned: retry it later, or fail the task.

    `claim` is the `apply_attempts` value of the attempt that failed, so a stale report
    cannot undo a newer attempt's claim.
    """
    if claim < settings.max_apply_attempts and task.status == TaskStatus.OPEN:
        return transitions.move_round(
            session,
            rnd.id,
            RoundStatus.APPLYING,
            RoundStatus.AGGREGATING,
            now=now,
            reason=reason,
            apply_claim=claim,
        )
    if not transitions.move_round(
        session,
        rnd.id,
        RoundStatus.APPLYING,
        RoundStatus.FAILED,
        now=now,
        reason=reason,
        status_reason=reason,
        apply_claim=claim,
    ):
        return False
    end_task(
        session,
        task,
        TaskStatus.FAILED,
        now=now,
        reason=f"round {rnd.iteration_id} aggregation failed: {reason}",
    )
    return True


def release_uncounted(
    *, session: Session, round_pk: int, claim: int, now: dt.datetime, reason: str
) -> bool:
    """Gives an interrupted aggregation claim back without counting it as an attempt.

    For an attempt stopped by an unavailable dependency (`storage.availability`), not by the
    round's own data: the round goes back to AGGREGATING with `apply_attempts` as before the
    claim, so an outage of any length never fails the task. Only the holder of `claim` can
    release it (the CAS also checks `apply_attempts == claim`). Returns False if the claim
    was no longer held.
    """
    return transitions.move_round(
        session,
        round_pk,
        RoundStatus.APPLYING,
        RoundStatus.AGGREGATING,
        now=now,
        reason=f"claim {claim} interrupted, not counted: {reason}"[:2000],
        apply_claim=claim,
        apply_attempts=claim - 1,
    )
