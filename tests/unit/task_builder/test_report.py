"""The TaskReport: applied algorithms, metrics, DP hyperparameters, task versions."""

import math

import pytest
from google.protobuf import text_format

from fcp_server.protos import task_builder_pb2
from task_builder import report, task_config
from task_builder.dp_budget import DpAccounting

CONFIG = """
mode: TRAINING_AND_EVAL population_name: "p"
policies { model_release_policy { num_max_training_rounds: 12 } }
federated_learning {
  learning_process {
    type: FED_SGD client_optimizer: ADAM server_optimizer: SGD
    runtime_config { report_goal: 10 }
    metrics { name: "accuracy" } metrics { name: "auc-roc" }
  }
  evaluation { report_goal: 5 }
}
differential_privacy { type: TREE_AGGREGATION clip_norm: 0.5 }
"""

ACCOUNTING = DpAccounting(
    noise_multiplier=1.25,
    clip_norm=0.5,
    epsilon=3.5,
    delta=1e-7,
    target_epsilon=10.0,
    rounds=12,
    accountant="RDP",
    population_size=1000,
    sampling_probability=0.01,
    noise_calibrated=True,
)


def config(text: str = CONFIG) -> task_builder_pb2.TaskConfig:
    return task_config.validate_and_normalize(
        text_format.Parse(text, task_builder_pb2.TaskConfig())
    )


def test_applied_algorithms_name_the_normalized_choices():
    algos = report.applied_algorithms(config())

    assert (algos.learning_algo, algos.client_optimizer, algos.server_optimizer) == (
        "FED_SGD",
        "ADAM",
        "SGD",
    )
    assert algos.dp_aggregator == "TREE_AGGREGATION"


def test_metric_results_are_comma_joined():
    metrics = report.metric_results(config())

    assert (metrics.accepted_metrics, metrics.rejected_metrics) == ("accuracy,auc-roc", "")


def test_dp_hyperparameters_copy_the_accounting():
    dp = report.dp_hyperparameters(ACCOUNTING)

    assert dp.noise_multiplier == pytest.approx(1.25)
    assert dp.dp_epsilon == pytest.approx(3.5)
    assert dp.dp_delta == pytest.approx(1e-7)
    assert dp.dp_clip_norm == pytest.approx(0.5)
    assert dp.num_training_rounds == 12
    assert (dp.accountant, dp.population_size, dp.noise_calibrated) == ("RDP", 1000, True)
    assert dp.sampling_probability == 0.01


def test_build_report_and_text_output():
    versions = [report.task_version("training", "341912000", ["L2Loss", "AddN"])]

    built = report.build_report(config(), ACCOUNTING, versions)
    text = report.format_report(built)

    assert built.task_versions[0].flex_ops == ["AddN", "L2Loss"]
    assert text.startswith("Success! Tasks are built\n")
    parsed = text_format.Parse(text.split("\n", 1)[1], task_builder_pb2.TaskReport())
    assert parsed == built


def test_eval_only_report_has_no_training_algorithms_or_dp():
    eval_only = CONFIG.replace("TRAINING_AND_EVAL", "EVAL_ONLY").replace(
        "report_goal: 5", "report_goal: 5 source_training_task_id: 2"
    )

    built = report.build_report(config(eval_only), None)

    assert built.applied_algorithms == task_builder_pb2.TaskReport.AppliedAlgorithms()
    assert not built.HasField("dp_hyperparameters")


def test_infinite_epsilon_is_reported_as_inf():
    no_dp = DpAccounting(**{**ACCOUNTING.__dict__, "epsilon": math.inf, "accountant": "NONE"})

    text = report.format_report(report.build_report(config(), no_dp))

    assert "dp_epsilon: inf" in text
