"""Round lifecycle: open a task's first round, advance after a close, retry or fail stuck rounds.

A round (ODP "iteration") moves COLLECTING -> AGGREGATING -> APPLYING -> COMPLETED, every move
a compare-and-swap (see `storage.transitions`). Unlike the reference, a round can never stay
stuck: a COLLECTING round past its deadline is retried as a new attempt (the same iteration,
uploads of the expired attempt discarded so exactly report_goal fresh updates are aggregated)
and after `max_round_attempts` the task fails; an aggregation that errors or whose worker died
is retried `max_apply_attempts` times, then the round and task fail.

Training round N starts from result N-1 ({pop}/{task}/{N-1}/d/0/client_checkpoint) and
publishes result N. Evaluation rounds evaluate the newest training result not yet evaluated
(every k training rounds for an `iteration_selector` of size k), from a copy of its client
checkpoint; they publish metrics only.
"""

import datetime as dt
import hashlib
import json
import logging

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from fcp_server import checkpoints, errors
from fcp_server.services import artifacts, blob_paths, privacy_budget, tasks
from fcp_server.settings import ServerSettings
from fcp_server.storage import transitions
from fcp_server.storage.blobs import BlobNotFound, BlobStore
from fcp_server.storage.models import (
    ACTIVE_ROUND_STATUSES,
    EntityKind,
    Round,
    RoundStatus,
    Task,
    TaskKind,
    TaskStatus,
)

_LOG = logging.getLogger(__name__)
_TERMINAL_TASK = (TaskStatus.COMPLETED, TaskStatus.CANCELED, TaskStatus.FAILED)


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


def open_task(
    *,
    session: Session,
    blobs: BlobStore,
    pop: str,
    task_id: int,
    now: dt.datetime,
    settings: ServerSettings,
) -> Task:
    """CREATED -> OPEN once every artifact is present and consistent; starts the first round.

    Raises:
        NotFound: Unknown task.
        Conflict: Not CREATED, or an artifact is missing.
        BadRequest: The artifacts do not agree.
    """
    task = tasks.get_task(session, pop, task_id)
    if task.status != TaskStatus.CREATED:
        raise errors.Conflict(f"task {pop}/{task_id} is {task.status.value}, not CREATED")
    opened = artifacts.validate_for_open(blobs, task, settings.max_artifact_bytes)
    spec = opened.server_plan.aggregation
    if privacy_budget.next_round_exceeds_budget(spec, task.report_goal, 0):
        raise errors.BadRequest(
            f"one round already spends epsilon "
            f"{privacy_budget.epsilon_after(spec, task.report_goal, 1):.4g}, above the plan's "
            f"dp_target_epsilon {spec.dp_target_epsilon}"
        )
    deadline = opened.server_plan.round_deadline_seconds or settings.round_deadline_seconds
    if not transitions.move_task(
        session,
        task.id,
        TaskStatus.CREATED,
        TaskStatus.OPEN,
        now=now,
        started_at=now,
        round_deadline_seconds=deadline,
    ):
        raise errors.Conflict(f"task {pop}/{task_id} changed state concurrently")
    session.refresh(task)
    if opened.initial_state is not None:
        data = checkpoints.encode_client_checkpoint(opened.initial_state.weights)
        blobs.put(blob_paths.client_checkpoint_blob(pop, task_id, 0), data, gzip=True)
        start_round(
            session,
            task,
            iteration_id=1,
            attempt=0,
            base_result_id=0,
            checkpoint_sha256=hashlib.sha256(data).hexdigest(),
            now=now,
        )
    else:
        maybe_start_eval_round(session=session, blobs=blobs, task=task, now=now)
    return task


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


def _eval_selector_size(task: Task) -> int:
    info = json.loads(task.info_json)
    selector = info.get("evaluationInfo", {}).get("checkPointSelector", {})
    size = int(selector.get("iterationSelector", {}).get("size", 1) or 1)
    return max(size, 1)


def maybe_start_eval_round(
    *, session: Session, blobs: BlobStore, task: Task, now: dt.datetime
) -> Round | None:
    """Starts the next eval round when the training task has a new result to evaluate.

    Completes the eval task when it ran `total_iteration` rounds, or when its training task
    ended and every result worth evaluating was evaluated.
    """
    if task.status != TaskStatus.OPEN or task.training_task_pk is None:
        return None
    active = session.scalar(
        select(func.count())
        .select_from(Round)
        .where(Round.task_pk == task.id, Round.status.in_(ACTIVE_ROUND_STATUSES))
    )
    if active:
        return None
    if task.completed_iterations >= task.total_iteration:
        end_task(session, task, TaskStatus.COMPLETED, now=now, reason="all rounds completed")
        return None
    training = session.get(Task, task.training_task_pk)
    if training is None or training.started_at is None:
        return None  # the training task has not published result 0 yet
    last = session.scalar(
        select(func.max(Round.evaluated_result_id)).where(
            Round.task_pk == task.id, Round.status == RoundStatus.COMPLETED
        )
    )
    latest = training.completed_iterations
    if last is not None and latest - last < _eval_selector_size(task):
        if training.status in _TERMINAL_TASK:
            end_task(
                session,
                task,
                TaskStatus.COMPLETED,
                now=now,
                reason="training task ended; its results were evaluated",
            )
        return None
    source = blob_paths.client_checkpoint_blob(training.population_name, training.task_id, latest)
    try:
        data = blobs.get(source)
    except BlobNotFound:
        _LOG.warning("eval task %s waits: %s is missing", task.task_id, source)
        return None
    iteration = task.completed_iterations + 1
    blobs.put(
        blob_paths.client_checkpoint_blob(task.population_name, task.task_id, iteration),
        data,
        gzip=True,
    )
    return start_round(
        session,
        task,
        iteration_id=iteration,
        attempt=0,
        base_result_id=iteration,
        evaluated_result_id=latest,
        checkpoint_sha256=hashlib.sha256(data).hexdigest(),
        now=now,
    )


def advance_after_close(
    *,
    session: Session,
    blobs: BlobStore,
    task: Task,
    rnd: Round,
    now: dt.datetime,
    budget_exhausted: bool,
    checkpoint_sha256: str | None,
) -> None:
    """After round N COMPLETED: start round N+1, or end the task (rounds done / DP budget)."""
    task.completed_iterations = rnd.iteration_id
    if task.kind == TaskKind.EVALUATION:
        maybe_start_eval_round(session=session, blobs=blobs, task=task, now=now)
        return
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
