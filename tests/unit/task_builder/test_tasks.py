"""TaskConfig -> Task protos: aggregation sizes, traffic weights, eligibility, selectors."""

import pytest
from google.protobuf import text_format

from fcp_server.protos import task_builder_pb2, task_pb2
from task_builder import task_config, tasks

CONFIG = """
mode: TRAINING_AND_EVAL
population_name: "pop"
policies {
  min_separation_policy { minimum_separation: 3 }
  data_availability_policy { min_example_count: 12 }
  model_release_policy { num_max_training_rounds: 40 }
}
federated_learning {
  learning_process { runtime_config { report_goal: 100 over_selection_rate: 0.25 } }
  evaluation { report_goal: 30 evaluation_traffic: 0.2 checkpoint_selector: "every_6_hour" }
}
differential_privacy { clip_norm: 1 }
"""


def normalized(extra: str = "") -> task_builder_pb2.TaskConfig:
    config = text_format.Parse(CONFIG, task_builder_pb2.TaskConfig())
    text_format.Merge(extra, config)
    return task_config.validate_and_normalize(config)


@pytest.mark.parametrize(
    ("goal", "rate", "expected"),
    [(100, 0.3, 130), (10, 0.3, 13), (2, 0.3, 2), (7, 0.0, 7), (20, 1.0, 40), (3, 0.1, 3)],
)
def test_max_aggregation_size_is_int_of_goal_times_one_plus_rate(goal, rate, expected):
    assert tasks.max_aggregation_size(goal, rate) == expected


@pytest.mark.parametrize(
    ("traffic", "weight"),
    [(0.2, 25), (0.5, 100), (0.0, 0), (1.0, 10_000), (0.1, 11), (0.8, 400)],
)
def test_eval_traffic_weight_follows_the_reference(traffic, weight):
    assert tasks.eval_traffic_weight(traffic) == weight


def test_traffic_weight_gives_eval_its_share_against_training():
    weight = tasks.eval_traffic_weight(0.2)

    assert weight / (weight + 100) == pytest.approx(0.2)


@pytest.mark.parametrize("bad", [-0.1, 1.1])
def test_eval_traffic_weight_rejects_non_probabilities(bad):
    with pytest.raises(ValueError):
        tasks.eval_traffic_weight(bad)


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        (
            "every_1_round",
            task_pb2.CheckPointSelector(
                iteration_selector=task_pb2.EveryKIterationsCheckpointSelector(size=1)
            ),
        ),
        (
            "every_25_round",
            task_pb2.CheckPointSelector(
                iteration_selector=task_pb2.EveryKIterationsCheckpointSelector(size=25)
            ),
        ),
        (
            "every_6_hour",
            task_pb2.CheckPointSelector(
                duration_selector=task_pb2.EveryKHoursCheckpointSelector(hours=6)
            ),
        ),
    ],
)
def test_checkpoint_selector_parsing(selector, expected):
    assert tasks.parse_checkpoint_selector(selector) == expected


@pytest.mark.parametrize("bad", ["every_0_round", "every_k_round", "every_1_day", "", "1_round"])
def test_checkpoint_selector_rejects_other_formats(bad):
    with pytest.raises(ValueError):
        tasks.parse_checkpoint_selector(bad)


def test_training_task():
    task = tasks.build_training_task(normalized())

    assert task.population_name == "pop"
    assert (task.total_iteration, task.min_aggregation_size, task.max_aggregation_size) == (
        40,
        100,
        125,
    )
    assert (task.min_client_version, task.max_client_version) == ("0", "999999999")
    assert task.info.traffic_weight == 100
    assert task.task_id == 0 and task.status == task_pb2.TaskStatus.UNKNOWN  # the server's
    policies = task.info.training_info.eligibility_task_info.eligibility_policies
    assert [p.WhichOneof("policy_type") for p in policies] == [
        "min_sep_policy",
        "data_availability_policy",
    ]
    assert policies[0].min_sep_policy.minimum_separation == 3
    assert policies[1].data_availability_policy.min_example_count == 12


def test_unset_over_selection_defaults_and_explicit_zero_stays():
    unset = tasks.build_training_task(
        normalized("federated_learning { learning_process { runtime_config { report_goal: 10 } } }")
    )
    config = normalized()
    config.federated_learning.learning_process.runtime_config.ClearField("over_selection_rate")
    config.federated_learning.learning_process.runtime_config.over_selection_rate = 0
    zero = tasks.build_training_task(config)

    assert unset.max_aggregation_size == 12  # report_goal 10, rate 0.25 from CONFIG
    assert zero.max_aggregation_size == zero.min_aggregation_size == 100


def test_eval_task_in_training_and_eval_is_linked_by_the_server():
    task = tasks.build_eval_task(normalized())

    assert (task.total_iteration, task.min_aggregation_size, task.max_aggregation_size) == (
        40,
        30,
        39,
    )
    assert task.info.traffic_weight == 25
    info = task.info.evaluation_info
    assert info.training_population_name == "pop"
    assert info.training_task_id == 0
    assert info.check_point_selector.duration_selector.hours == 6
    assert not task.info.HasField("training_info")


def test_eval_only_names_the_evaluated_training_task():
    config = normalized(
        "mode: EVAL_ONLY federated_learning { evaluation { source_training_task_id: 4 "
        'source_training_population: "train_pop" evaluation_traffic: 1.0 } }'
    )

    built = tasks.build_tasks(config)

    assert built.training is None
    assert built.evaluation is not None
    info = built.evaluation.info.evaluation_info
    assert (info.training_population_name, info.training_task_id) == ("train_pop", 4)
    assert built.evaluation.info.traffic_weight == 10_000


def test_build_tasks_follows_the_mode():
    both = tasks.build_tasks(normalized())
    training_only = tasks.build_tasks(normalized("mode: TRAINING_ONLY"))

    assert both.training is not None and both.evaluation is not None
    assert training_only.training is not None and training_only.evaluation is None


def test_attach_artifact_urls():
    task = tasks.build_training_task(normalized())
    building = task_builder_pb2.ArtifactBuilding(
        plan_url="gs://b/plan", client_plan_url="gs://b/client", checkpoint_url="gs://b/ckpt"
    )

    tasks.attach_artifact_urls(task, building)

    assert list(task.server_phase_url) == ["gs://b/plan"]
    assert list(task.client_only_plan_url) == ["gs://b/client"]
    assert list(task.init_checkpoint_url) == ["gs://b/ckpt"]
