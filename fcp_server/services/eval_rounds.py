"""Evaluation rounds: start the next one when the training task has a result worth evaluating.

ODP creates an eval iteration when its checkpoint selector finds a COMPLETED training
iteration, and derives the eval devices' checkpoint from it (odp-federated-compute.md section
2.9). Here `eval_selection` picks the result (newest candidate first) and the eval round's
device checkpoint {pop}/{eval task}/{N}/d/0/client_checkpoint is a copy of that training
result's client checkpoint (the same model tensors: `artifacts.check_eval_model` checks the
plans agree when the eval task opens). This runs when an eval task opens, when one of its
rounds closes, right after each training round of the linked training task closes, and on
every worker tick (`maintenance.schedule_eval_rounds`), always inside the caller's
transaction; a compare-and-swap on the eval task's current iteration lets only one of
several concurrent callers start (and write the checkpoint of) the next round.
"""

import datetime as dt
import hashlib
import logging

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from fcp_server.services import blob_paths, eval_selection, rounds
from fcp_server.storage import transitions
from fcp_server.storage.blobs import BlobNotFound, BlobStore
from fcp_server.storage.models import (
    ACTIVE_ROUND_STATUSES,
    Round,
    RoundStatus,
    Task,
    TaskKind,
    TaskStatus,
)

_LOG = logging.getLogger(__name__)
_TERMINAL_TASK = (TaskStatus.COMPLETED, TaskStatus.CANCELED, TaskStatus.FAILED)


def _last_evaluated(session: Session, task: Task) -> int | None:
    return session.scalar(
        select(func.max(Round.evaluated_result_id)).where(
            Round.task_pk == task.id, Round.status == RoundStatus.COMPLETED
        )
    )


def maybe_start_eval_round(
    *, session: Session, blobs: BlobStore, task: Task, now: dt.datetime
) -> Round | None:
    """Starts the next eval round when the training task has a new result to evaluate.

    The result is chosen by the task's checkpoint selector (`eval_selection`: the newest
    every-k-rounds / every-k-hours candidate not evaluated yet), and the round's device
    checkpoint is a copy of that result's client checkpoint. Completes the eval task when it
    ran `total_iteration` rounds, or when its training task ended and no candidate is left.
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
        rounds.end_task(session, task, TaskStatus.COMPLETED, now=now, reason="all rounds completed")
        return None
    training = session.get(Task, task.training_task_pk)
    if training is None:
        return None
    selected = eval_selection.select_training_result(
        session, training, eval_selection.selector_of(task), _last_evaluated(session, task)
    )
    if selected is None:
        if training.status in _TERMINAL_TASK:
            rounds.end_task(
                session,
                task,
                TaskStatus.COMPLETED,
                now=now,
                reason="training task ended; its selected results were evaluated",
            )
        return None
    source = blob_paths.client_checkpoint_blob(training.population_name, training.task_id, selected)
    try:
        data = blobs.get(source)
    except BlobNotFound:
        _LOG.warning("eval task %s waits: %s is missing", task.task_id, source)
        return None
    iteration = task.completed_iterations + 1
    # Claim the iteration before writing its checkpoint, so of two processes racing here only
    # one writes {pop}/{eval task}/{N}/d/0/client_checkpoint (the other sees False); the claim
    # also requires the task still OPEN, as the status read above may be stale.
    if not transitions.claim_iteration(session, task.id, iteration):
        return None
    blobs.put(
        blob_paths.client_checkpoint_blob(task.population_name, task.task_id, iteration),
        data,
        gzip=True,
    )
    return rounds.start_round(
        session,
        task,
        iteration_id=iteration,
        attempt=0,
        base_result_id=iteration,
        evaluated_result_id=selected,
        checkpoint_sha256=hashlib.sha256(data).hexdigest(),
        now=now,
    )


def start_linked_eval_rounds(
    *, session: Session, blobs: BlobStore, training: Task, now: dt.datetime
) -> int:
    """Lets the training task's open eval tasks pick up its new result without a worker tick."""
    linked = session.scalars(
        select(Task).where(
            Task.training_task_pk == training.id,
            Task.kind == TaskKind.EVALUATION,
            Task.status == TaskStatus.OPEN,
        )
    )
    return sum(
        maybe_start_eval_round(session=session, blobs=blobs, task=evaluation, now=now) is not None
        for evaluation in linked.all()
    )


def after_round_closed(*, session: Session, blobs: BlobStore, task: Task, now: dt.datetime) -> None:
    """After a round of `task` completed: continue its evaluation, or its eval tasks'.

    Call after `rounds.advance_after_close` in the same transaction.
    """
    if task.kind == TaskKind.EVALUATION:
        maybe_start_eval_round(session=session, blobs=blobs, task=task, now=now)
        return
    session.flush()  # the eval tasks' selection reads the training task's new state
    session.refresh(task)
    start_linked_eval_rounds(session=session, blobs=blobs, training=task, now=now)
