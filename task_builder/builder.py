"""The build pipeline: BuildTaskRequest -> validated config, DP check, plans, registered tasks.

ODP `task_builder_core.build_task_group_request_handler` (odp-federated-compute.md section
1.5), top to bottom:
  1. validate and normalize the TaskConfig            (task_config)
  2. DP accounting; calibrate or check epsilon         (dp_budget)
  3. the Task protos                                    (tasks)
  4. load the model, build plans + checkpoint           (model_loading, plans; TensorFlow)
     warm start: the checkpoint carries a stored round's weights  (model_versions)
  5. artifact-only: write to the config's URLs          (artifacts)
     otherwise: create, upload, open on the server     (registration; cancelled on failure)
  6. the TaskReport                                     (report)
Errors are the task_builder.errors tree; `build_response` turns them into the
BuildTaskResponse.error_info the service and CLI return. TensorFlow is imported lazily.
"""

import dataclasses
import logging
from typing import Protocol

from fcp_server.protos import task_builder_pb2
from task_builder import artifacts, dp_budget, registration, report, task_config, tasks
from task_builder import config_defaults as d
from task_builder.errors import (
    ArtifactBuildError,
    BuildRequestError,
    ModelLoadError,
    TaskBuilderError,
    TaskManagementError,
)

_LOG = logging.getLogger(__name__)


class BuiltTaskPlans(artifacts.PlanArtifacts, Protocol):
    """What the pipeline reads of task_builder.plans.TaskPlans (kept TF-free here)."""

    @property
    def min_client_version(self) -> str:
        """The lowest device runtime version that has every flex op of the program."""

    @property
    def flex_ops(self) -> list[str]:
        """The select-TF ops the device program uses."""


class BuiltPlansLike(Protocol):
    """What the pipeline reads of task_builder.plans.BuiltPlans."""

    @property
    def training(self) -> BuiltTaskPlans | None:
        """The training plans, None for EVAL_ONLY."""

    @property
    def evaluation(self) -> BuiltTaskPlans | None:
        """The eval plans, None for TRAINING_ONLY."""


@dataclasses.dataclass(frozen=True)
class Prepared:
    """The outcome of the TF-free steps 1-3."""

    config: task_builder_pb2.TaskConfig  # normalized, with the noise multiplier to use
    accounting: dp_budget.DpAccounting | None  # None for EVAL_ONLY (no model is released)
    tasks: tasks.TaskProtos


@dataclasses.dataclass(frozen=True)
class BuildResult:
    """A successful build."""

    config: task_builder_pb2.TaskConfig  # normalized, with the noise multiplier used
    task_group: task_builder_pb2.TaskGroup  # registered tasks, or tasks with artifact URLs
    report: task_builder_pb2.TaskReport


def prepare(
    request: task_builder_pb2.BuildTaskRequest, report_out: task_builder_pb2.TaskReport
) -> Prepared:
    """Steps 1-3 (no TensorFlow): the normalized config, its DP accounting and Task protos.

    Fills `report_out` as it goes, so a DP rejection still reports the computed epsilon.

    Raises:
      TaskConfigError, DpBudgetError: for a bad config or a DP setup over budget.
    """
    config = task_config.validate_and_normalize(request.task_config)
    accounting = None
    if config.mode in d.TRAINING_MODES:
        flags = request.flags
        accounting = dp_budget.account(config, skip_dp_aggregator=flags.skip_dp_aggregator)
        report_out.CopyFrom(report.build_report(config, accounting))
        dp_budget.enforce(accounting, skip_dp_check=flags.skip_dp_check)
        # The plans must use the multiplier that was accounted (calibrated when it was unset).
        config.differential_privacy.noise_multiplier = accounting.noise_multiplier
    report_out.CopyFrom(report.build_report(config, accounting))
    return Prepared(config=config, accounting=accounting, tasks=tasks.build_tasks(config))


def check_warm_start(request: task_builder_pb2.BuildTaskRequest, mode: int) -> None:
    """Checks a requested warm start before any TensorFlow work (no-op without one).

    Raises:
      BuildRequestError: a field is missing or out of range, or the mode trains nothing.
    """
    if not request.HasField("warm_start"):
        return
    ws = request.warm_start
    if mode not in d.TRAINING_MODES:
        raise BuildRequestError("warm_start needs a training task; EVAL_ONLY trains nothing")
    if not ws.blob_url or not ws.population_name:
        raise BuildRequestError("warm_start needs blob_url and population_name")
    if ws.task_id <= 0:
        raise BuildRequestError(f"warm_start.task_id must be positive, got {ws.task_id}")
    if ws.HasField("round") and ws.round < 0:
        raise BuildRequestError(f"warm_start.round must be >= 0, got {ws.round}")


@dataclasses.dataclass(frozen=True)
class _Plans:
    built: BuiltPlansLike
    warm_start_from: str  # "<population>/<task_id> round <n>", "" without warm start


def _build_plans(
    request: task_builder_pb2.BuildTaskRequest, config: task_builder_pb2.TaskConfig
) -> _Plans:
    uri = request.saved_model.uri
    if not uri:
        raise ModelLoadError("saved_model.uri is required: the saved FunctionalModel to build from")
    # TensorFlow and TFF load only here, so validation and the service start stay light.
    from task_builder import model_loading, model_versions, plans

    model = model_loading.load_model(uri)
    initial_weights, started_from = None, ""
    if request.HasField("warm_start"):
        # Only the weights carry over; plans.build_plans documents what starts fresh.
        ws = request.warm_start
        version, initial_weights = model_versions.load_warm_start_weights(
            ws.blob_url,
            ws.population_name,
            ws.task_id,
            plans.build_model_spec(model),
            round_num=ws.round if ws.HasField("round") else None,
        )
        started_from = f"{ws.population_name}/{ws.task_id} round {version.round}"
    built = plans.build_plans(
        model,
        config,
        skip_dp_aggregator=request.flags.skip_dp_aggregator,
        skip_flex_ops_check=request.flags.skip_flex_ops_check,
        initial_weights=initial_weights,
    )
    return _Plans(built=built, warm_start_from=started_from)


def _plans_for(built: BuiltPlansLike, kind: str) -> BuiltTaskPlans:
    plans: BuiltTaskPlans | None = built.training if kind == "training" else built.evaluation
    if plans is None:
        raise ArtifactBuildError(f"the {kind} plans were not built")
    return plans


def _apply_versions(
    protos: tasks.TaskProtos, built: BuiltPlansLike
) -> list[task_builder_pb2.TaskReport.TaskVersion]:
    # Each task may only run on devices whose runtime has every flex op of its program.
    versions = []
    for kind, task in (("training", protos.training), ("evaluation", protos.evaluation)):
        if task is not None:
            plans = _plans_for(built, kind)
            task.min_client_version = plans.min_client_version
            versions.append(report.task_version(kind, plans.min_client_version, plans.flex_ops))
    return versions


def _write_artifacts(
    config: task_builder_pb2.TaskConfig, protos: tasks.TaskProtos, built: BuiltPlansLike
) -> task_builder_pb2.TaskGroup:
    artifacts.write_artifacts(config, built.training, built.evaluation)
    group = task_builder_pb2.TaskGroup()
    if protos.training is not None:
        tasks.attach_artifact_urls(
            protos.training, config.federated_learning.learning_process.artifact_building
        )
        group.training_task.CopyFrom(protos.training)
    if protos.evaluation is not None:
        tasks.attach_artifact_urls(
            protos.evaluation, config.federated_learning.evaluation.artifact_building
        )
        group.eval_task.CopyFrom(protos.evaluation)
    return group


def _register(
    server: registration.TaskManagementClient,
    config: task_builder_pb2.TaskConfig,
    protos: tasks.TaskProtos,
    built: BuiltPlansLike,
) -> task_builder_pb2.TaskGroup:
    linked = None
    if protos.training is not None:
        main = (protos.training, _plans_for(built, "training"))
        if protos.evaluation is not None:
            linked = (protos.evaluation, _plans_for(built, "evaluation"))
    else:
        assert protos.evaluation is not None  # EVAL_ONLY
        main = (protos.evaluation, _plans_for(built, "evaluation"))
    registered = registration.register_tasks(server, config.population_name, main, linked)
    return registration.task_group(registered)


def build_task_group(
    request: task_builder_pb2.BuildTaskRequest,
    *,
    artifact_only: bool,
    server: registration.TaskManagementClient | None,
    report_out: task_builder_pb2.TaskReport | None = None,
) -> BuildResult:
    """Runs the whole pipeline for one request.

    Args:
      request: the saved model URI, TaskConfig, experiment flags and optional warm start.
      artifact_only: write artifacts to the config's URLs and register nothing.
      server: the task-management client (required unless artifact_only).
      report_out: filled with the TaskReport as far as the build got (for error responses).

    Returns:
      The normalized config, the task group and the report.

    Raises:
      TaskBuilderError: any failure, after cancelling tasks this build created.
    """
    report_out = report_out if report_out is not None else task_builder_pb2.TaskReport()
    prepared = prepare(request, report_out)
    config, protos = prepared.config, prepared.tasks
    if artifact_only:
        artifacts.check_artifact_urls(config)
    elif server is None:
        raise TaskManagementError("no task management server is configured")
    check_warm_start(request, config.mode)
    planned = _build_plans(request, config)
    built = planned.built
    versions = _apply_versions(protos, built)
    report_out.CopyFrom(report.build_report(config, prepared.accounting, versions))
    report_out.warm_start_from = planned.warm_start_from
    if artifact_only:
        group = _write_artifacts(config, protos, built)
    else:
        assert server is not None
        group = _register(server, config, protos, built)
    final = task_builder_pb2.TaskReport()
    final.CopyFrom(report_out)
    return BuildResult(config=config, task_group=group, report=final)


def error_response(
    error: TaskBuilderError, task_report: task_builder_pb2.TaskReport | None = None
) -> task_builder_pb2.BuildTaskResponse:
    """A BuildTaskResponse carrying the error's type and message (and the partial report)."""
    response = task_builder_pb2.BuildTaskResponse(
        error_info=task_builder_pb2.ErrorInfo(
            error_type=task_builder_pb2.ErrorType.Enum.Name(error.error_type),
            error_message=str(error),
        )
    )
    if task_report is not None:
        response.task_report.CopyFrom(task_report)
    return response


def build_response(
    request: task_builder_pb2.BuildTaskRequest,
    *,
    artifact_only: bool,
    server: registration.TaskManagementClient | None,
) -> tuple[task_builder_pb2.BuildTaskResponse, int]:
    """Runs the pipeline and returns (BuildTaskResponse, HTTP status) for the service and CLI.

    Errors of the task_builder.errors tree become `error_info` with the error's HTTP status;
    anything else propagates (a bug: the service's top-level handler answers 500).
    """
    report_out = task_builder_pb2.TaskReport()
    try:
        result = build_task_group(
            request, artifact_only=artifact_only, server=server, report_out=report_out
        )
    except TaskBuilderError as e:
        _LOG.warning("build failed (%s): %s", type(e).__name__, e)
        return error_response(e, report_out), e.http_status
    response = task_builder_pb2.BuildTaskResponse(
        task_group=result.task_group, task_report=result.report
    )
    return response, 200
