"""The TaskReport of a build: algorithms applied, metrics, DP guarantee and client versions.

Step 6 of the build pipeline: ODP's TaskReport (odp-federated-compute.md section 1.4) plus the
fields this project adds in task_builder.proto (the accountant and sampling assumptions behind
epsilon, whether the noise was calibrated, and each task's minimum client version with the flex
ops that set it). The CLI prints it as text proto after "Success! Tasks are built". Pure Python.
"""

from collections.abc import Iterable, Sequence

from google.protobuf import text_format

from fcp_server.protos import task_builder_pb2
from task_builder import config_defaults as d
from task_builder.dp_budget import DpAccounting

SUCCESS_BANNER = "Success! Tasks are built"
_TC = task_builder_pb2


def applied_algorithms(
    config: task_builder_pb2.TaskConfig,
) -> task_builder_pb2.TaskReport.AppliedAlgorithms:
    """Names the learning algorithm, optimizers and DP aggregator of a normalized config."""
    if config.mode not in d.TRAINING_MODES:
        return _TC.TaskReport.AppliedAlgorithms()
    process = config.federated_learning.learning_process
    return _TC.TaskReport.AppliedAlgorithms(
        learning_algo=_TC.LearningAlgo.Enum.Name(process.type),
        client_optimizer=_TC.Optimizer.Enum.Name(process.client_optimizer),
        server_optimizer=_TC.Optimizer.Enum.Name(process.server_optimizer),
        dp_aggregator=_TC.DpAggregator.Enum.Name(config.differential_privacy.type),
    )


def metric_results(
    config: task_builder_pb2.TaskConfig,
) -> task_builder_pb2.TaskReport.MetricResults:
    """Lists the accepted metrics (comma-joined); unknown names never get here (they are errors)."""
    names = [m.name for m in config.federated_learning.learning_process.metrics]
    return _TC.TaskReport.MetricResults(accepted_metrics=",".join(names), rejected_metrics="")


def dp_hyperparameters(dp: DpAccounting) -> task_builder_pb2.TaskReport.DpHyperparameters:
    """Copies the DP accounting into the report's (float) fields."""
    return _TC.TaskReport.DpHyperparameters(
        dp_delta=dp.delta,
        dp_epsilon=dp.epsilon,
        noise_multiplier=dp.noise_multiplier,
        dp_clip_norm=dp.clip_norm,
        num_training_rounds=dp.rounds,
        accountant=dp.accountant,
        population_size=dp.population_size,
        sampling_probability=dp.sampling_probability,
        noise_calibrated=dp.noise_calibrated,
    )


def task_version(
    task: str, min_client_version: str, flex_ops: Iterable[str]
) -> task_builder_pb2.TaskReport.TaskVersion:
    """One task's minimum client version and the flex ops behind it."""
    return _TC.TaskReport.TaskVersion(
        task=task, min_client_version=min_client_version, flex_ops=sorted(flex_ops)
    )


def build_report(
    config: task_builder_pb2.TaskConfig,
    dp: DpAccounting | None,
    versions: Sequence[task_builder_pb2.TaskReport.TaskVersion] = (),
) -> task_builder_pb2.TaskReport:
    """Assembles the TaskReport of a normalized config.

    Args:
      config: the normalized TaskConfig.
      dp: the DP accounting, None for EVAL_ONLY (evaluation releases no model).
      versions: per built task, its minimum client version (empty before plans are built).
    """
    report = _TC.TaskReport(
        applied_algorithms=applied_algorithms(config),
        metric_results=metric_results(config),
        task_versions=list(versions),
    )
    if dp is not None:
        report.dp_hyperparameters.CopyFrom(dp_hyperparameters(dp))
    return report


def format_report(report: task_builder_pb2.TaskReport) -> str:
    """Returns the success banner followed by the report as text proto."""
    return f"{SUCCESS_BANNER}\n{text_format.MessageToString(report)}"
