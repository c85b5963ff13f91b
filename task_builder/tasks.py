"""Turns a normalized TaskConfig into the `Task` protos the server registers.

Step 3 of the build pipeline, as ODP's `task_utils.py` (odp-federated-compute.md section 1.11):
aggregation sizes from the report goal and over-selection, traffic weights (training 100, eval
relative to it so that P(eval) = evaluation_traffic), eligibility policies for training and the
checkpoint selector for evaluation. Task ids, statuses and artifact URLs are the server's; the
eval task's training_task_id is linked by the server for TRAINING_AND_EVAL. Pure Python.
"""

import dataclasses
import re

from fcp_server.protos import common_pb2, task_builder_pb2, task_pb2
from task_builder import config_defaults as d

_SELECTOR_RE = re.compile(r"every_([1-9][0-9]*)_(round|hour)")
# Guards int() against products like 0.2 * 100 / 0.8 = 25.000000000000004 or 24.999999999.
_ROUNDING_DIGITS = 9


def max_aggregation_size(report_goal: int, over_selection_rate: float) -> int:
    """Returns how many devices a round may assign: int(report_goal * (1 + rate))."""
    if report_goal <= 0 or over_selection_rate < 0:
        raise ValueError(
            f"bad report_goal {report_goal} or over_selection_rate {over_selection_rate}"
        )
    return int(round(report_goal * (1 + over_selection_rate), _ROUNDING_DIGITS))


def eval_traffic_weight(evaluation_traffic: float) -> int:
    """Returns the eval task's traffic weight next to training's 100.

    A weight w against 100 gives the eval task the share w / (w + 100) = evaluation_traffic,
    so w = 100 * t / (1 - t); t = 1 maps to 10000 (the reference's "all traffic").
    """
    if not 0 <= evaluation_traffic <= 1:
        raise ValueError(f"evaluation_traffic must be in [0, 1], got {evaluation_traffic}")
    if evaluation_traffic == 1.0:
        return d.FULL_EVAL_TRAFFIC_WEIGHT
    weight = evaluation_traffic * d.TRAINING_TRAFFIC_WEIGHT / (1 - evaluation_traffic)
    return int(round(weight, _ROUNDING_DIGITS))


def parse_checkpoint_selector(selector: str) -> task_pb2.CheckPointSelector:
    """Parses `every_<k>_round` / `every_<k>_hour` (k > 0) into a CheckPointSelector."""
    match = _SELECTOR_RE.fullmatch(selector)
    if match is None:
        raise ValueError(
            f"checkpoint_selector {selector!r} is not every_<k>_round or every_<k>_hour"
        )
    k, unit = int(match.group(1)), match.group(2)
    if unit == "round":
        return task_pb2.CheckPointSelector(
            iteration_selector=task_pb2.EveryKIterationsCheckpointSelector(size=k)
        )
    return task_pb2.CheckPointSelector(
        duration_selector=task_pb2.EveryKHoursCheckpointSelector(hours=k)
    )


def eligibility_policies(config: task_builder_pb2.TaskConfig) -> task_pb2.TrainingInfo:
    """Returns the training task's eligibility info: min-separation and data availability."""
    policies = config.policies
    return task_pb2.TrainingInfo(
        eligibility_task_info=common_pb2.EligibilityTaskInfo(
            eligibility_policies=[
                common_pb2.EligibilityPolicyEvalSpec(
                    id="min_separation", min_sep_policy=policies.min_separation_policy
                ),
                common_pb2.EligibilityPolicyEvalSpec(
                    id="data_availability",
                    data_availability_policy=policies.data_availability_policy,
                ),
            ]
        )
    )


def build_training_task(config: task_builder_pb2.TaskConfig) -> task_pb2.Task:
    """Returns the training Task of a normalized config."""
    runtime = config.federated_learning.learning_process.runtime_config
    return task_pb2.Task(
        population_name=config.population_name,
        total_iteration=config.policies.model_release_policy.num_max_training_rounds,
        min_aggregation_size=runtime.report_goal,
        max_aggregation_size=max_aggregation_size(runtime.report_goal, runtime.over_selection_rate),
        min_client_version=d.MIN_CLIENT_VERSION,
        max_client_version=d.MAX_CLIENT_VERSION,
        info=task_pb2.TaskInfo(
            traffic_weight=d.TRAINING_TRAFFIC_WEIGHT, training_info=eligibility_policies(config)
        ),
    )


def build_eval_task(config: task_builder_pb2.TaskConfig) -> task_pb2.Task:
    """Returns the evaluation Task of a normalized config.

    For EVAL_ONLY it names the evaluated training task by `source_training_task_id`; for
    TRAINING_AND_EVAL the id stays 0 and the server fills in the training task it creates in the
    same request.
    """
    ev = config.federated_learning.evaluation
    return task_pb2.Task(
        population_name=config.population_name,
        total_iteration=config.policies.model_release_policy.num_max_training_rounds,
        min_aggregation_size=ev.report_goal,
        max_aggregation_size=max_aggregation_size(ev.report_goal, ev.over_selection_rate),
        min_client_version=d.MIN_CLIENT_VERSION,
        max_client_version=d.MAX_CLIENT_VERSION,
        info=task_pb2.TaskInfo(
            traffic_weight=eval_traffic_weight(ev.evaluation_traffic),
            evaluation_info=task_pb2.EvaluationInfo(
                check_point_selector=parse_checkpoint_selector(ev.checkpoint_selector),
                training_population_name=ev.source_training_population or config.population_name,
                training_task_id=ev.source_training_task_id,
            ),
        ),
    )


@dataclasses.dataclass(frozen=True)
class TaskProtos:
    """The tasks a config's mode asks for (None where the mode has none)."""

    training: task_pb2.Task | None
    evaluation: task_pb2.Task | None


def build_tasks(config: task_builder_pb2.TaskConfig) -> TaskProtos:
    """Returns the training and/or eval Task protos of a normalized config's mode."""
    return TaskProtos(
        training=build_training_task(config) if config.mode in d.TRAINING_MODES else None,
        evaluation=build_eval_task(config) if config.mode in d.EVAL_MODES else None,
    )


def attach_artifact_urls(task: task_pb2.Task, building: task_builder_pb2.ArtifactBuilding) -> None:
    """Puts the config's artifact_building URLs on a task (artifact-only builds)."""
    task.server_phase_url[:] = [building.plan_url] if building.plan_url else []
    task.client_only_plan_url[:] = [building.client_plan_url] if building.client_plan_url else []
    task.init_checkpoint_url[:] = [building.checkpoint_url] if building.checkpoint_url else []
