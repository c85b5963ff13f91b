"""Opening a task: CREATED -> OPEN once its artifacts agree, then its first round.

The builder uploads the plans and (training) the initial checkpoint, then calls `:open`
(ODP's scheduler moves CREATED -> OPEN when the artifacts exist; odp-federated-compute.md
section 2.6 step 1). Before the task opens: every artifact is cross-checked
(`artifacts.validate_for_open`), a DP plan must afford at least one round within its
`dp_target_epsilon` (`dp_budget`), and an eval plan must describe the training task's model,
which is final once the training task has left CREATED (an eval task opens after it).
A training task then publishes result 0's client checkpoint and starts round 1; an eval task
starts evaluating as soon as its training task has a result (`eval_rounds`).
"""

import datetime as dt
import hashlib

from sqlalchemy.orm import Session

from fcp_server import checkpoints, errors
from fcp_server.protos import plan_pb2
from fcp_server.services import artifacts, blob_paths, dp_budget, eval_rounds, rounds, tasks
from fcp_server.settings import ServerSettings
from fcp_server.storage import transitions
from fcp_server.storage.blobs import BlobStore
from fcp_server.storage.models import Task, TaskStatus


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
    _check_budget_allows_a_round(opened.server_plan, task.total_iteration)
    if task.training_task_pk is not None:
        training = session.get(Task, task.training_task_pk)
        assert training is not None  # foreign key
        if training.status == TaskStatus.CREATED:
            # Its server plan (the model this task evaluates) can still be replaced; once it
            # has left CREATED it never changes, so the check below holds for good.
            raise errors.Conflict(
                f"task {pop}/{task_id} evaluates training task {training.population_name}/"
                f"{training.task_id}, which is still CREATED: open that task first"
            )
        artifacts.check_eval_model(blobs, opened.server_plan, training, settings.max_artifact_bytes)
    deadline = opened.server_plan.round_deadline_seconds or settings.round_deadline_seconds
    # Only if no upload replaced an artifact since they were read and validated above.
    if not transitions.move_task(
        session,
        task.id,
        TaskStatus.CREATED,
        TaskStatus.OPEN,
        now=now,
        unless_changed=artifacts.unchanged_digests(task),
        started_at=now,
        round_deadline_seconds=deadline,
    ):
        raise errors.Conflict(
            f"task {pop}/{task_id} or its artifacts changed concurrently; retry the open"
        )
    session.refresh(task)
    artifacts.publish(blobs, task, opened)
    if opened.initial_state is not None:
        data = checkpoints.encode_client_checkpoint(opened.initial_state.weights)
        blobs.put(blob_paths.client_checkpoint_blob(pop, task_id, 0), data, gzip=True)
        rounds.start_round(
            session,
            task,
            iteration_id=1,
            attempt=0,
            base_result_id=0,
            checkpoint_sha256=hashlib.sha256(data).hexdigest(),
            now=now,
        )
    else:
        eval_rounds.maybe_start_eval_round(session=session, blobs=blobs, task=task, now=now)
    return task


def _check_budget_allows_a_round(plan: plan_pb2.ServerPlan, total_iteration: int) -> None:
    try:
        allowed = dp_budget.rounds_within_budget(plan, total_iteration)
        first = dp_budget.epsilon_after(plan, 1) if allowed == 0 else None
    except ValueError as e:
        raise errors.BadRequest(f"server_phase has invalid DP settings: {e}") from e
    if first is not None:
        raise errors.BadRequest(
            f"one round already spends epsilon {first:.4g}, "
            f"above the plan's dp_target_epsilon {plan.aggregation.dp_target_epsilon}"
        )
