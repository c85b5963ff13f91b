"""Task management use cases: create (training + linked eval), get and list tasks.

Implements the ODP TaskManagement service contract (odp-federated-compute.md section 2.4) and
fixes its gaps: inputs are validated, the eval task of a TRAINING_AND_EVAL build is created
in the same transaction and linked to the new training task, there is a cancel call the
builder uses to roll back a failed build (`task_cancel`), and "one active training and one
active eval task per population" is backed by a unique partial index so concurrent creates
cannot both win.
"""

import datetime as dt
import re

from google.protobuf import json_format
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from fcp_server import errors
from fcp_server.protos import task_pb2
from fcp_server.services import blob_paths, eval_selection
from fcp_server.storage import transitions
from fcp_server.storage.models import (
    ACTIVE_TASK_STATUSES,
    MAX_ID,
    EntityKind,
    Task,
    TaskKind,
    TaskStatus,
)

MAX_ITERATIONS = 1_000_000
MAX_REPORT_GOAL = 1_000_000
MAX_TRAFFIC_WEIGHT = 1_000_000_000
_VERSION_RE = re.compile(r"^[0-9]{1,18}$")
_PROTO_STATUS = {
    TaskStatus.CREATED: task_pb2.TaskStatus.CREATED,
    TaskStatus.OPEN: task_pb2.TaskStatus.OPEN,
    TaskStatus.COMPLETED: task_pb2.TaskStatus.COMPLETED,
    TaskStatus.CANCELED: task_pb2.TaskStatus.CANCELED,
    TaskStatus.FAILED: task_pb2.TaskStatus.FAILED,
}


def check_population(pop: str) -> None:
    """Raises BadRequest unless `pop` is a valid population name."""
    if not blob_paths.is_valid_population(pop):
        raise errors.BadRequest(
            f"population name {pop[:80]!r} is invalid: use 1-64 of [A-Za-z0-9_.-], "
            "starting with a letter or digit"
        )


def _kind(task: task_pb2.Task) -> TaskKind:
    has_eval = task.HasField("info") and task.info.WhichOneof("info") == "evaluation_info"
    return TaskKind.EVALUATION if has_eval else TaskKind.TRAINING


def _check_version(value: str, field: str) -> None:
    if value and not _VERSION_RE.fullmatch(value):
        raise errors.BadRequest(f"task.{field} must be a decimal version code, got {value!r}")


def _validate(task: task_pb2.Task, what: str) -> None:
    if not 1 <= task.total_iteration <= MAX_ITERATIONS:
        raise errors.BadRequest(f"{what}.total_iteration must be in 1..{MAX_ITERATIONS}")
    if not 1 <= task.min_aggregation_size <= MAX_REPORT_GOAL:
        raise errors.BadRequest(
            f"{what}.min_aggregation_size (the report goal) must be in 1..{MAX_REPORT_GOAL}"
        )
    if task.max_aggregation_size and task.max_aggregation_size < task.min_aggregation_size:
        raise errors.BadRequest(f"{what}.max_aggregation_size must be >= min_aggregation_size")
    if task.max_aggregation_size > 10 * MAX_REPORT_GOAL:
        raise errors.BadRequest(f"{what}.max_aggregation_size is too large")
    _check_version(task.min_client_version, "min_client_version")
    _check_version(task.max_client_version, "max_client_version")
    if (
        task.min_client_version
        and task.max_client_version
        and int(task.min_client_version) > int(task.max_client_version)
    ):
        raise errors.BadRequest(f"{what}.min_client_version is above max_client_version")
    if not 0 <= task.info.traffic_weight <= MAX_TRAFFIC_WEIGHT:
        raise errors.BadRequest(f"{what}.info.traffic_weight must be in 0..{MAX_TRAFFIC_WEIGHT}")
    if _kind(task) == TaskKind.EVALUATION:
        try:
            eval_selection.selector_from_info(task.info)
        except ValueError as e:
            raise errors.BadRequest(
                f"{what}.info.evaluation_info.check_point_selector is invalid: {e}"
            ) from e


def _new_row(pop: str, task_id: int, task: task_pb2.Task, now: dt.datetime) -> Task:
    info = task_pb2.TaskInfo()
    if task.HasField("info"):
        info.CopyFrom(task.info)
    else:
        # ODP's default: weight 1, a training task.
        info.traffic_weight = 1
        info.training_info.SetInParent()
    return Task(
        population_name=pop,
        task_id=task_id,
        kind=_kind(task),
        status=TaskStatus.CREATED,
        total_iteration=task.total_iteration,
        report_goal=task.min_aggregation_size,
        max_aggregation_size=task.max_aggregation_size or task.min_aggregation_size,
        min_client_version=task.min_client_version,
        max_client_version=task.max_client_version,
        traffic_weight=info.traffic_weight,
        round_deadline_seconds=0,
        info_json=json_format.MessageToJson(info, indent=None),
        correlation_id=task.correlation_id[:128],
        created_at=now,
        completed_iterations=0,
        current_iteration=0,
        epsilon_spent=0.0,
        status_reason="",
    )


def _check_no_active(session: Session, pop: str, kind: TaskKind) -> None:
    active = session.scalar(
        select(Task.task_id).where(
            Task.population_name == pop,
            Task.kind == kind,
            Task.status.in_(ACTIVE_TASK_STATUSES),
        )
    )
    if active is not None:
        raise errors.AlreadyExists(
            f"population {pop!r} already has an active {kind.value.lower()} task "
            f"({active}); only one active training and one evaluation task are allowed"
        )


def _link_training(session: Session, pop: str, row: Task, task: task_pb2.Task) -> None:
    eval_info = task.info.evaluation_info
    train_pop = eval_info.training_population_name or pop
    if not 0 < eval_info.training_task_id <= MAX_ID:  # PostgreSQL cannot compare larger ones
        raise errors.BadRequest(
            f"eval task refers to training task id {eval_info.training_task_id}, "
            f"which is not in 1..{MAX_ID}"
        )
    training = session.scalar(
        select(Task).where(
            Task.population_name == train_pop,
            Task.task_id == eval_info.training_task_id,
            Task.kind == TaskKind.TRAINING,
        )
    )
    if training is None:
        raise errors.BadRequest(
            f"eval task refers to training task {train_pop}/{eval_info.training_task_id}, "
            "which does not exist"
        )
    row.training_task_pk = training.id


def create_tasks(
    *,
    session: Session,
    pop: str,
    request: task_pb2.CreateTaskRequest,
    now: dt.datetime,
) -> tuple[Task, Task | None]:
    """Creates a task (and optionally its linked eval task) in status CREATED.

    Args:
        session: Open session; the caller owns the transaction.
        pop: Population from the path (overrides the body's).
        request: The builder's request; `eval_task` is linked to `task` when given.
        now: Creation time.

    Returns:
        The main task row and the eval task row (None when not requested).

    Raises:
        BadRequest: A field is invalid or an eval task names an unknown training task.
        AlreadyExists: The population already has an active task of that kind.
    """
    check_population(pop)
    if not request.HasField("task"):
        raise errors.BadRequest("CreateTaskRequest.task is required")
    _validate(request.task, "task")
    if request.HasField("eval_task"):
        _validate(request.eval_task, "eval_task")
        if _kind(request.task) != TaskKind.TRAINING:
            raise errors.BadRequest("task must be a training task when eval_task is given")
        if _kind(request.eval_task) != TaskKind.EVALUATION and request.eval_task.HasField("info"):
            raise errors.BadRequest("eval_task.info must carry evaluation_info")
    next_id = (
        session.scalar(select(func.max(Task.task_id)).where(Task.population_name == pop)) or 0
    ) + 1
    main = _new_row(pop, next_id, request.task, now)
    _check_no_active(session, pop, main.kind)
    if main.kind == TaskKind.EVALUATION:
        _link_training(session, pop, main, request.task)
    rows = [main]
    evaluation: Task | None = None
    if request.HasField("eval_task"):
        eval_task = task_pb2.Task()
        eval_task.CopyFrom(request.eval_task)
        eval_info = eval_task.info.evaluation_info
        eval_info.training_task_id = next_id
        eval_info.training_population_name = eval_info.training_population_name or pop
        evaluation = _new_row(pop, next_id + 1, eval_task, now)
        _check_no_active(session, pop, TaskKind.EVALUATION)
        rows.append(evaluation)
    try:
        for row in rows:
            session.add(row)
            session.flush()
            if row is evaluation:
                row.training_task_pk = main.id
            transitions.record_change(session, EntityKind.TASK, row.id, None, row.status, now=now)
        session.flush()
    except IntegrityError as e:
        # A concurrent create took the id or the active slot first.
        raise errors.AlreadyExists(
            f"a concurrent request created a task in population {pop!r}; retry"
        ) from e
    return main, evaluation


def get_task(session: Session, pop: str, task_id: int) -> Task:
    """Returns the task or raises NotFound."""
    task = session.scalar(select(Task).where(Task.population_name == pop, Task.task_id == task_id))
    if task is None:
        raise errors.NotFound(f"task {pop}/{task_id} not found")
    return task


def list_tasks(session: Session, pop: str | None = None, limit: int = 1000) -> list[Task]:
    """Tasks of a population (or all), newest first, at most `limit`."""
    query = select(Task).order_by(Task.population_name, Task.task_id.desc()).limit(limit)
    if pop is not None:
        query = query.where(Task.population_name == pop)
    return list(session.scalars(query))


def task_proto(task: Task) -> task_pb2.Task:
    """The fcp.Task view of a row, with artifact URLs (server-relative paths)."""
    pop, tid = task.population_name, task.task_id
    proto = task_pb2.Task(
        population_name=pop,
        task_id=tid,
        total_iteration=task.total_iteration,
        min_aggregation_size=task.report_goal,
        max_aggregation_size=task.max_aggregation_size,
        status=_PROTO_STATUS[task.status],
        correlation_id=task.correlation_id,
        min_client_version=task.min_client_version,
        max_client_version=task.max_client_version,
        client_only_plan_url=[blob_paths.artifact_url(pop, tid, "client_only_plan")],
        server_phase_url=[blob_paths.artifact_url(pop, tid, "server_phase")],
        metrics_url=[blob_paths.metrics_url(pop, tid)],
        completed_iterations=task.completed_iterations,
        epsilon_spent=task.epsilon_spent,
        status_reason=task.status_reason,
        current_iteration=task.current_iteration,
    )
    if task.kind == TaskKind.TRAINING:
        proto.init_checkpoint_url.append(blob_paths.artifact_url(pop, tid, "checkpoint"))
    json_format.Parse(task.info_json, proto.info)
    proto.created_time.FromDatetime(task.created_at)
    if task.started_at is not None:
        proto.started_time.FromDatetime(task.started_at)
    if task.stopped_at is not None:
        proto.stop_time.FromDatetime(task.stopped_at)
    return proto
