"""Task artifacts: accept the builder's plans and initial checkpoint, validate, read them back.

The builder PUTs three artifacts to the URLs the create-task answer carries (ODP task builder
step 6): the serialized fcp.ClientOnlyPlan, the fcp.ServerPlan and (training only) the initial
server checkpoint in safetensors. Each is parsed when it arrives; because the builder uploads
the checkpoint before the server plan (ODP order), the cross-checks between them (checkpoint
vs the plan's ModelSpec, client vs server plan) run again when the task is opened.

An open task's artifacts never change: devices and the download caches hold them. So an
upload stores its bytes under a name of their own (`blob_paths.uploaded_artifact_blob`, by
SHA-256) and records the digest in the task row with a compare-and-swap on CREATED; the open
reads the artifacts the row names, checks their digests, moves CREATED -> OPEN only if the
digests are still the ones it validated, and then publishes those bytes at the reference
names devices download (`publish`). A losing or failed upload thus never touches a
published blob, on any number of processes and hosts.
"""

import dataclasses
import hashlib
from typing import Any

from google.protobuf.message import DecodeError
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from fcp_server import checkpoints, errors
from fcp_server.aggregation import RoundAccumulator, ServerState
from fcp_server.protos import plan_pb2, task_builder_pb2
from fcp_server.services import blob_paths, dp_budget, tasks
from fcp_server.storage import transitions
from fcp_server.storage.blobs import BlobNotFound, BlobStore
from fcp_server.storage.models import Task, TaskKind, TaskStatus

_PLAN_KIND = {
    TaskKind.TRAINING: plan_pb2.PlanKind.TRAINING,
    TaskKind.EVALUATION: plan_pb2.PlanKind.EVALUATION,
}
_Algo = task_builder_pb2.LearningAlgo
# FED_AVG devices upload initial - trained weights, FED_SGD devices their mean gradient; the
# server aggregates both the same way (DP mean + server optimizer, as TFF's build_fed_sgd).
_ALGORITHMS = (_Algo.UNKNOWN, _Algo.FED_AVG, _Algo.FED_SGD)
_SHA_COLUMN = {
    "client_only_plan": "client_plan_sha256",
    "server_phase": "server_plan_sha256",
    "checkpoint": "init_checkpoint_sha256",
}


@dataclasses.dataclass(frozen=True)
class OpenArtifacts:
    """What opening a task needs: the validated plans and (training) the initial state."""

    server_plan: plan_pb2.ServerPlan
    client_plan: plan_pb2.ClientOnlyPlan
    initial_state: ServerState | None
    # Artifact kind -> the validated bytes, to publish once the task is OPEN.
    contents: dict[str, bytes]


def required_kinds(task: Task) -> tuple[str, ...]:
    """Artifacts a task needs before it can open."""
    if task.kind == TaskKind.TRAINING:
        return ("client_only_plan", "server_phase", "checkpoint")
    return ("client_only_plan", "server_phase")


def missing_kinds(task: Task) -> list[str]:
    """Required artifacts not uploaded yet."""
    return [k for k in required_kinds(task) if getattr(task, _SHA_COLUMN[k]) is None]


def parse_server_plan(data: bytes, task: Task) -> plan_pb2.ServerPlan:
    """Parses and checks a server plan against its task (kind, report goal, aggregation)."""
    plan = plan_pb2.ServerPlan()
    try:
        plan.ParseFromString(data)
    except DecodeError as e:
        raise errors.BadRequest(f"server_phase is not a serialized fcp.ServerPlan: {e}") from e
    if plan.kind != _PLAN_KIND[task.kind]:
        raise errors.BadRequest(
            f"server_phase kind is {plan_pb2.PlanKind.Enum.Name(plan.kind)}, "
            f"the task is {task.kind.value}"
        )
    if not plan.model.trainable and task.kind == TaskKind.TRAINING:
        raise errors.BadRequest("server_phase.model has no trainable tensors")
    if plan.report_goal and plan.report_goal != task.report_goal:
        raise errors.BadRequest(
            f"server_phase.report_goal {plan.report_goal} differs from the task's "
            f"min_aggregation_size {task.report_goal}"
        )
    if plan.round_deadline_seconds < 0:
        raise errors.BadRequest("server_phase.round_deadline_seconds must be >= 0")
    if plan.algorithm not in _ALGORITHMS:
        raise errors.BadRequest(
            f"server_phase.algorithm {plan.algorithm} is not FED_AVG or FED_SGD"
        )
    try:
        RoundAccumulator(plan)  # validates the aggregation, optimizer and metric specs
        if task.kind == TaskKind.TRAINING:
            dp_budget.dp_setup(plan)  # and that its DP settings can be accounted
    except ValueError as e:
        raise errors.BadRequest(f"server_phase is invalid: {e}") from e
    return plan


def parse_client_plan(data: bytes, task: Task) -> plan_pb2.ClientOnlyPlan:
    """Parses and checks a client-only plan against its task."""
    plan = plan_pb2.ClientOnlyPlan()
    try:
        plan.ParseFromString(data)
    except DecodeError as e:
        raise errors.BadRequest(
            f"client_only_plan is not a serialized fcp.ClientOnlyPlan: {e}"
        ) from e
    if plan.kind != _PLAN_KIND[task.kind]:
        raise errors.BadRequest(
            f"client_only_plan kind is {plan_pb2.PlanKind.Enum.Name(plan.kind)}, "
            f"the task is {task.kind.value}"
        )
    return plan


def parse_initial_checkpoint(data: bytes, plan: plan_pb2.ServerPlan, max_bytes: int) -> ServerState:
    """Checks the builder's checkpoint against the plan and returns round 0's state."""
    try:
        return checkpoints.initial_server_state(plan, data, max_bytes=max_bytes)
    except (checkpoints.CheckpointError, ValueError) as e:
        raise errors.BadRequest(f"checkpoint does not match the plan: {e}") from e


def put_artifact(
    *,
    session: Session,
    blobs: BlobStore,
    pop: str,
    task_id: int,
    kind: str,
    data: bytes,
    max_bytes: int,
) -> None:
    """Validates and stores one artifact of a CREATED task.

    Raises:
        NotFound: Unknown task or artifact kind (eval tasks have no checkpoint).
        Conflict: The task is no longer CREATED.
        PayloadTooLarge / BadRequest: The artifact is too large or invalid.
    """
    task = tasks.get_task(session, pop, task_id)
    if kind not in required_kinds(task):
        raise errors.NotFound(f"task {pop}/{task_id} has no artifact {kind!r}")
    if task.status != TaskStatus.CREATED:
        raise errors.Conflict(
            f"task {pop}/{task_id} is {task.status.value}; artifacts can only be uploaded "
            "while it is CREATED"
        )
    if len(data) > max_bytes:
        raise errors.PayloadTooLarge(f"{kind} is {len(data)} bytes, the limit is {max_bytes}")
    if not data:
        raise errors.BadRequest(f"{kind} is empty")
    if kind == "server_phase":
        parse_server_plan(data, task)
    elif kind == "client_only_plan":
        parse_client_plan(data, task)
    else:
        _check_checkpoint(blobs, task, data, max_bytes)
    digest = hashlib.sha256(data).hexdigest()
    column = _SHA_COLUMN[kind]
    # The status read above may be stale: the digest is set only while the task is CREATED.
    if not transitions.update_task_while(session, task.id, TaskStatus.CREATED, **{column: digest}):
        raise errors.Conflict(
            f"task {pop}/{task_id} left CREATED meanwhile; its artifacts can no longer change"
        )
    set_committed_value(task, column, digest)
    # A name of its own: if this transaction then fails, nothing the row names has changed.
    # Stored gzip-compressed, as ODP rewrites artifacts, so downloads serve them as they are.
    name = blob_paths.uploaded_artifact_blob(pop, task_id, kind, digest)
    blobs.put(name, data, gzip=True, sha256=digest)


def _check_checkpoint(blobs: BlobStore, task: Task, data: bytes, max_bytes: int) -> None:
    if task.server_plan_sha256 is not None:
        plan = load_server_plan(blobs, task, max_bytes)
        parse_initial_checkpoint(data, plan, max_bytes)
        return
    try:  # The plan comes later: check the safetensors structure now, the rest at open.
        checkpoints.decode_tensors(data, max_bytes=max_bytes)
    except checkpoints.CheckpointError as e:
        raise errors.BadRequest(f"checkpoint is not a valid safetensors file: {e}") from e


def read_artifact(blobs: BlobStore, task: Task, kind: str, max_bytes: int) -> bytes:
    """The bytes of the artifact the task row names (by its recorded SHA-256).

    Raises:
        Conflict: The artifact is not recorded, missing or not the recorded bytes.
    """
    digest = getattr(task, _SHA_COLUMN[kind])
    pop, tid = task.population_name, task.task_id
    if digest is None:
        raise errors.Conflict(f"task {pop}/{tid} has no {kind} yet")
    names = (
        blob_paths.uploaded_artifact_blob(pop, tid, kind, digest),
        # Uploaded before artifacts had names of their own, or only published.
        blob_paths.artifact_blob(pop, tid, kind),
    )
    for name in names:
        try:
            data = blobs.get(name, max_bytes=max_bytes)
        except BlobNotFound:
            continue
        if hashlib.sha256(data).hexdigest() == digest:
            return data
    raise errors.Conflict(
        f"task {pop}/{tid}'s {kind} is missing from the blob store or differs from the "
        "recorded upload; upload it again"
    )


def load_server_plan(blobs: BlobStore, task: Task, max_bytes: int) -> plan_pb2.ServerPlan:
    """Reads and parses a task's server plan."""
    return parse_server_plan(read_artifact(blobs, task, "server_phase", max_bytes), task)


def validate_for_open(blobs: BlobStore, task: Task, max_bytes: int) -> OpenArtifacts:
    """Cross-checks a task's artifacts before it opens.

    Raises:
        Conflict: An artifact is missing.
        BadRequest: The artifacts do not agree with each other.
    """
    missing = missing_kinds(task)
    if missing:
        raise errors.Conflict(
            f"task {task.population_name}/{task.task_id} cannot open: missing {missing}"
        )
    contents = {kind: read_artifact(blobs, task, kind, max_bytes) for kind in required_kinds(task)}
    server_plan = parse_server_plan(contents["server_phase"], task)
    client_plan = parse_client_plan(contents["client_only_plan"], task)
    if client_plan.HasField("model") and client_plan.model != server_plan.model:
        raise errors.BadRequest("client_only_plan.model differs from server_phase.model")
    if task.kind == TaskKind.TRAINING and _algorithm(client_plan) != _algorithm(server_plan):
        raise errors.BadRequest(
            f"client_only_plan.algorithm {_Algo.Enum.Name(_algorithm(client_plan))} differs from "
            f"server_phase.algorithm {_Algo.Enum.Name(_algorithm(server_plan))}"
        )
    state = None
    if task.kind == TaskKind.TRAINING:
        state = parse_initial_checkpoint(contents["checkpoint"], server_plan, max_bytes)
    return OpenArtifacts(
        server_plan=server_plan, client_plan=client_plan, initial_state=state, contents=contents
    )


def unchanged_digests(task: Task) -> tuple[Any, ...]:
    """Conditions that the task row still records the artifact digests read from `task`."""
    return tuple(getattr(Task, column) == getattr(task, column) for column in _SHA_COLUMN.values())


def publish(blobs: BlobStore, task: Task, opened: OpenArtifacts) -> None:
    """Writes the validated artifacts at the names devices download (the task is now OPEN).

    Only an open whose compare-and-swap moved the task writes them, before its commit; if
    that commit fails the task stays CREATED and the next winning open rewrites them.
    """
    for kind, data in opened.contents.items():
        name = blob_paths.artifact_blob(task.population_name, task.task_id, kind)
        blobs.put(name, data, gzip=True, sha256=getattr(task, _SHA_COLUMN[kind]))


def _algorithm(plan: plan_pb2.ServerPlan | plan_pb2.ClientOnlyPlan) -> int:
    # UNKNOWN is the builder's default, FED_AVG.
    return int(plan.algorithm) or _Algo.FED_AVG


def check_eval_model(
    blobs: BlobStore, eval_plan: plan_pb2.ServerPlan, training: Task, max_bytes: int
) -> None:
    """Checks an eval plan evaluates the training task's model (its client checkpoints).

    Skipped when the training task has no server plan (canceled before it was uploaded): it
    never produces a result to evaluate.

    Raises:
        BadRequest: The models differ, so devices could not load the training checkpoints.
    """
    if training.server_plan_sha256 is None:
        return
    training_plan = load_server_plan(blobs, training, max_bytes)
    if eval_plan.HasField("model") and eval_plan.model != training_plan.model:
        raise errors.BadRequest(
            f"the eval plan's model differs from training task {training.population_name}/"
            f"{training.task_id}'s model, whose checkpoints it evaluates"
        )
