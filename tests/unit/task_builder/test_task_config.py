"""Validation (every rule, exact messages), normalization and loading of TaskConfigs."""

import math
import pathlib

import pytest
from google.protobuf import text_format

from fcp_server.protos import task_builder_pb2
from task_builder import task_config
from task_builder.errors import TaskConfigError

PREFIX = "[Invalid task config]: "
LP = "federated_learning.learning_process"
EV = "federated_learning.evaluation"
ALLOWED = (
    "auc-roc, auc-pr, accuracy, binary_accuracy, binary_crossentropy, "
    "binary_crossentropy_from_logits, categorical_accuracy, categorical_crossentropy, "
    "categorical_crossentropy_from_logits, mean, mean_absolute_error, "
    "mean_absolute_percentage_error, mean_squared_error, mean_squared_logarithmic_error, "
    "precision, recall, root_mean_squared_error, sparse_categorical_accuracy, "
    "sparse_categorical_crossentropy, sparse_categorical_crossentropy_from_logits"
)

BASE = """
mode: TRAINING_AND_EVAL
population_name: "pop_1"
policies {
  min_separation_policy { minimum_separation: 1 }
  data_availability_policy { min_example_count: 5 }
  model_release_policy { num_max_training_rounds: 10 dp_target_epsilon: 5 dp_delta: 1e-7 }
  dataset_policy { batch_size: 8 }
}
federated_learning {
  learning_process {
    runtime_config { report_goal: 20 }
    metrics { name: "accuracy" }
  }
  evaluation { report_goal: 10 evaluation_traffic: 0.2 checkpoint_selector: "every_2_round" }
}
differential_privacy { type: FIXED_GAUSSIAN clip_norm: 1.0 noise_multiplier: 1.0 }
"""


def make(extra: str = "", base: str = BASE) -> task_builder_pb2.TaskConfig:
    """The base config with `extra` text merged over it (later fields win)."""
    config = text_format.Parse(base, task_builder_pb2.TaskConfig())
    text_format.Merge(extra, config)
    return config


def bad(key: str, value: str, entity: str, debug: str) -> str:
    return f"{PREFIX}key `{key}` has a bad value: `{value}` in `{entity}`. {debug}"


NONNEG = "{} must be a nonnegative number."
REQUIRED_INT = "{} is required and must be set to an integer strictly greater than zero."
CLIP = (
    "clip_norm is required and must be a positive float when using FIXED_GAUSSIAN or "
    "TREE_AGGREGATION DP Aggregator."
)
INIT_CLIP = (
    "init_clip_norm must be a positive float or be left empty when using ADAPTIVE_GAUSSIAN or "
    "ADAPTIVE_TREE DP Aggregator."
)
SELECTOR = (
    "checkpoint_selector must be in the format of every_k_round or every_k_hour, where k is a "
    "positive integer."
)
POP_CHARS = (
    "population_name must be at most 64 letters, digits, '_', '-' or '.', starting with a "
    "letter or digit."
)

RULES = [
    # population name
    (
        'population_name: ""',
        bad(
            "population_name",
            "",
            "task_config",
            "population_name is required and must be set to an non-empty string.",
        ),
    ),
    ('population_name: "a/b"', bad("population_name", "a/b", "task_config", POP_CHARS)),
    (f'population_name: "{"p" * 65}"', bad("population_name", "p" * 65, "task_config", POP_CHARS)),
    # mode
    (
        "mode: 9",
        bad(
            "mode",
            "9",
            "task_config",
            "mode must be one of TRAINING_ONLY, TRAINING_AND_EVAL, EVAL_ONLY.",
        ),
    ),
    (
        "mode: UNKNOWN",
        bad(
            "mode",
            "UNKNOWN",
            "task_config",
            "mode is required when an evaluation is configured: "
            "set TRAINING_AND_EVAL or EVAL_ONLY.",
        ),
    ),
    # policies
    (
        "policies { min_separation_policy { minimum_separation: -1 } }",
        bad(
            "minimum_separation",
            "-1",
            "policies.min_separation_policy",
            NONNEG.format("minimum_separation"),
        ),
    ),
    (
        "policies { data_availability_policy { min_example_count: -3 } }",
        bad(
            "min_example_count",
            "-3",
            "policies.data_availability_policy",
            NONNEG.format("min_example_count"),
        ),
    ),
    (
        "policies { model_release_policy { dp_target_epsilon: 10.5 } }",
        bad(
            "dp_target_epsilon",
            "10.5",
            "policies.model_release_policy",
            "dp_target_epsilon must be a float number between 0 and 10.000000",
        ),
    ),
    (
        "policies { model_release_policy { dp_target_epsilon: -1 } }",
        bad(
            "dp_target_epsilon",
            "-1.0",
            "policies.model_release_policy",
            "dp_target_epsilon must be a float number between 0 and 10.000000",
        ),
    ),
    (
        "policies { model_release_policy { dp_delta: 1e-6 } }",
        bad(
            "dp_delta",
            "1e-06",
            "policies.model_release_policy",
            "dp_delta must be a float number between 0 and 3.333333E-07",
        ),
    ),
    (
        "policies { model_release_policy { dp_delta: nan } }",
        bad(
            "dp_delta",
            "nan",
            "policies.model_release_policy",
            "dp_delta must be a float number between 0 and 3.333333E-07",
        ),
    ),
    (
        "policies { model_release_policy { num_max_training_rounds: 0 } }",
        bad(
            "num_max_training_rounds",
            "0",
            "policies.model_release_policy",
            REQUIRED_INT.format("num_max_training_rounds"),
        ),
    ),
    (
        "policies { model_release_policy { num_max_training_rounds: 1000001 } }",
        bad(
            "num_max_training_rounds",
            "1000001",
            "policies.model_release_policy",
            "num_max_training_rounds must be at most 1000000.",
        ),
    ),
    (
        "policies { dataset_policy { batch_size: -1 } }",
        bad("batch_size", "-1", "policies.dataset_policy", NONNEG.format("batch_size")),
    ),
    (
        "policies { dataset_policy { batch_size: 100001 } }",
        bad(
            "batch_size", "100001", "policies.dataset_policy", "batch_size must be at most 100000."
        ),
    ),
    (
        "policies { dataset_policy { max_training_batches_per_client: -2 } }",
        bad(
            "max_training_batches_per_client",
            "-2",
            "policies.dataset_policy",
            "max_training_batches_per_client must be -1 (all batches), 0 (default) or positive.",
        ),
    ),
    (
        "policies { dataset_policy { num_epochs: -1 } }",
        bad("num_epochs", "-1", "policies.dataset_policy", NONNEG.format("num_epochs")),
    ),
    (
        "policies { dataset_policy { num_epochs: 1001 } }",
        bad("num_epochs", "1001", "policies.dataset_policy", "num_epochs must be at most 1000."),
    ),
    # metrics
    (
        'federated_learning { learning_process { metrics { name: "f1" } } }',
        bad("name", "f1", f"{LP}.metrics[1]", f"Unknown metric; allowed metrics are: {ALLOWED}."),
    ),
    (
        'federated_learning { learning_process { metrics { name: "accuracy" } } }',
        bad("name", "accuracy", f"{LP}.metrics[1]", "Each metric may be listed once."),
    ),
    # learning process
    (
        "federated_learning { learning_process { type: 5 } }",
        bad("type", "5", LP, "type must be one of FED_AVG, FED_SGD."),
    ),
    (
        "federated_learning { learning_process { client_optimizer: 7 } }",
        bad("client_optimizer", "7", LP, "client_optimizer must be one of SGD, ADAM."),
    ),
    (
        "federated_learning { learning_process { server_optimizer: 7 } }",
        bad("server_optimizer", "7", LP, "server_optimizer must be one of SGD, ADAM."),
    ),
    (
        "federated_learning { learning_process { client_learning_rate: -0.1 } }",
        bad("client_learning_rate", "-0.1", LP, NONNEG.format("client_learning_rate")),
    ),
    (
        "federated_learning { learning_process { server_learning_rate: inf } }",
        bad("server_learning_rate", "inf", LP, NONNEG.format("server_learning_rate")),
    ),
    (
        "federated_learning { learning_process { server_momentum: 1.0 } }",
        bad("server_momentum", "1.0", LP, "server_momentum must be in [0, 1)."),
    ),
    (
        "federated_learning { learning_process { runtime_config { report_goal: 0 } } }",
        bad("report_goal", "0", f"{LP}.runtime_config", REQUIRED_INT.format("report_goal")),
    ),
    (
        "federated_learning { learning_process { runtime_config { report_goal: 100001 } } }",
        bad("report_goal", "100001", f"{LP}.runtime_config", "report_goal must be at most 100000."),
    ),
    (
        "federated_learning { learning_process { runtime_config { over_selection_rate: -0.5 } } }",
        bad(
            "over_selection_rate",
            "-0.5",
            f"{LP}.runtime_config",
            NONNEG.format("over_selection_rate"),
        ),
    ),
    (
        "federated_learning { learning_process { runtime_config { over_selection_rate: 11 } } }",
        bad(
            "over_selection_rate",
            "11.0",
            f"{LP}.runtime_config",
            "over_selection_rate must be at most 10.0.",
        ),
    ),
    (
        "federated_learning { learning_process { runtime_config { round_deadline_seconds: -1 } } }",
        bad(
            "round_deadline_seconds",
            "-1",
            f"{LP}.runtime_config",
            NONNEG.format("round_deadline_seconds"),
        ),
    ),
    (
        "federated_learning { learning_process { runtime_config { "
        f'example_selector_uri: "{"u" * 2049}" }} }} }}',
        bad(
            "example_selector_uri",
            "u" * 64 + "...",
            f"{LP}.runtime_config",
            "example_selector_uri must be at most 2048 chars.",
        ),
    ),
    # evaluation
    (
        "federated_learning { evaluation { report_goal: 0 } }",
        bad("report_goal", "0", EV, REQUIRED_INT.format("report_goal")),
    ),
    (
        "federated_learning { evaluation { over_selection_rate: -1 } }",
        bad("over_selection_rate", "-1.0", EV, NONNEG.format("over_selection_rate")),
    ),
    (
        'federated_learning { evaluation { checkpoint_selector: "every_0_round" } }',
        bad("checkpoint_selector", "every_0_round", EV, SELECTOR),
    ),
    (
        'federated_learning { evaluation { checkpoint_selector: "every_2_days" } }',
        bad("checkpoint_selector", "every_2_days", EV, SELECTOR),
    ),
    (
        "federated_learning { evaluation { evaluation_traffic: 1.5 } }",
        bad("evaluation_traffic", "1.5", EV, "evaluation_traffic must be a probability."),
    ),
    (
        'federated_learning { evaluation { source_training_population: "other" } }',
        bad(
            "source_training_population",
            "other",
            EV,
            "in TRAINING_AND_EVAL the evaluated training task is in the task's own population.",
        ),
    ),
    (
        "mode: EVAL_ONLY",
        bad(
            "source_training_task_id",
            "0",
            EV,
            "source_training_task_id is required and must be a positive number.",
        ),
    ),
    # differential privacy
    (
        "differential_privacy { type: 9 }",
        bad(
            "type",
            "9",
            "differential_privacy",
            "type must be one of FIXED_GAUSSIAN, TREE_AGGREGATION, "
            "ADAPTIVE_GAUSSIAN, ADAPTIVE_TREE.",
        ),
    ),
    (
        "differential_privacy { noise_multiplier: -1 }",
        bad("noise_multiplier", "-1.0", "differential_privacy", NONNEG.format("noise_multiplier")),
    ),
    (
        "differential_privacy { clip_norm: 0 }",
        bad("clip_norm", "0.0", "differential_privacy", CLIP),
    ),
    (
        "differential_privacy { type: UNKNOWN clip_norm: 0 }",
        bad("clip_norm", "0.0", "differential_privacy", CLIP),
    ),
    (
        "differential_privacy { type: TREE_AGGREGATION clip_norm: -2 }",
        bad("clip_norm", "-2.0", "differential_privacy", CLIP),
    ),
    (
        "differential_privacy { type: ADAPTIVE_GAUSSIAN init_clip_norm: -0.1 }",
        bad("init_clip_norm", "-0.1", "differential_privacy", INIT_CLIP),
    ),
    (
        "differential_privacy { type: ADAPTIVE_TREE target_unclipped_quantile: 1.0 }",
        bad(
            "target_unclipped_quantile",
            "1.0",
            "differential_privacy",
            "target_unclipped_quantile must be in (0, 1) or be left empty (0.5).",
        ),
    ),
    (
        "differential_privacy { type: ADAPTIVE_GAUSSIAN clip_learning_rate: -1 }",
        bad(
            "clip_learning_rate",
            "-1.0",
            "differential_privacy",
            NONNEG.format("clip_learning_rate"),
        ),
    ),
    (
        "differential_privacy { type: ADAPTIVE_GAUSSIAN clipped_count_stddev: -1 }",
        bad(
            "clipped_count_stddev",
            "-1.0",
            "differential_privacy",
            NONNEG.format("clipped_count_stddev"),
        ),
    ),
    (
        "differential_privacy { population_size: -5 }",
        bad("population_size", "-5", "differential_privacy", NONNEG.format("population_size")),
    ),
    (
        "differential_privacy { population_size: 19 }",
        bad(
            "population_size",
            "19",
            "differential_privacy",
            "population_size must be at least report_goal (the sampling rate is their ratio).",
        ),
    ),
]


@pytest.mark.parametrize(("extra", "message"), RULES, ids=[r[0][:60] for r in RULES])
def test_each_rule_rejects_with_the_reference_template(extra, message):
    config = make(extra)

    with pytest.raises(TaskConfigError) as info:
        task_config.validate_and_normalize(config)

    assert str(info.value) == message


def test_base_config_is_valid():
    out = task_config.validate_and_normalize(make())

    assert out.population_name == "pop_1"


@pytest.mark.parametrize("rate", [1.0, 5.0, 250.0])
def test_learning_rates_above_one_are_allowed(rate):
    out = task_config.validate_and_normalize(
        make(
            f"federated_learning {{ learning_process {{ client_learning_rate: {rate} "
            f"server_learning_rate: {rate} }} }}"
        )
    )

    lp = out.federated_learning.learning_process
    assert (lp.client_learning_rate, lp.server_learning_rate) == (rate, rate)


def test_eval_only_needs_neither_training_report_goal_nor_clip_norm():
    config = make(
        "mode: EVAL_ONLY federated_learning { evaluation { source_training_task_id: 3 } "
        "learning_process { runtime_config { report_goal: 0 } } } "
        "differential_privacy { clip_norm: 0 }"
    )

    out = task_config.validate_and_normalize(config)

    assert out.mode == task_builder_pb2.TaskMode.EVAL_ONLY
    assert out.federated_learning.evaluation.source_training_task_id == 3
    assert out.federated_learning.evaluation.source_training_population == "pop_1"
    # No DP defaults are invented for a task that releases no model.
    assert out.differential_privacy.population_size == 0


def test_adaptive_types_need_no_clip_norm():
    out = task_config.validate_and_normalize(
        make("differential_privacy { type: ADAPTIVE_GAUSSIAN clip_norm: 0 }")
    )

    dp = out.differential_privacy
    assert dp.init_clip_norm == pytest.approx(0.1)
    assert dp.target_unclipped_quantile == pytest.approx(0.5)
    assert dp.clip_learning_rate == pytest.approx(0.2)
    assert dp.clipped_count_stddev == pytest.approx(0.05 * 20)


MINIMAL = """
population_name: "p"
policies { model_release_policy { num_max_training_rounds: 3 } }
federated_learning { learning_process { runtime_config { report_goal: 4 } } }
differential_privacy { clip_norm: 0.5 }
"""


def test_normalization_fills_every_reference_default():
    config = make(base=MINIMAL)

    out = task_config.validate_and_normalize(config)

    tc = task_builder_pb2
    lp = out.federated_learning.learning_process
    assert out.mode == tc.TaskMode.TRAINING_ONLY
    assert (lp.type, lp.client_optimizer, lp.server_optimizer) == (
        tc.LearningAlgo.FED_AVG,
        tc.Optimizer.SGD,
        tc.Optimizer.SGD,
    )
    assert (lp.client_learning_rate, lp.server_learning_rate) == (0.1, 1.0)
    assert lp.runtime_config.over_selection_rate == pytest.approx(0.3)
    ds = out.policies.dataset_policy
    assert (ds.batch_size, ds.max_training_batches_per_client, ds.num_epochs) == (3, -1, 1)
    release = out.policies.model_release_policy
    assert release.dp_target_epsilon == 10.0
    assert release.dp_delta == pytest.approx(1 / 3e6)
    dp = out.differential_privacy
    assert dp.type == tc.DpAggregator.FIXED_GAUSSIAN
    assert dp.population_size == 3_000_000
    assert dp.noise_multiplier == 0  # calibrated later by the DP step
    assert out.label_name == "y"
    assert out.policies.HasField("min_separation_policy")
    # The caller's message is not modified.
    assert config.policies.dataset_policy.batch_size == 0


def test_explicit_zero_over_selection_stays_zero_and_unset_gets_default():
    zero = make(
        "federated_learning { learning_process { runtime_config { over_selection_rate: 0 } }"
        " evaluation { over_selection_rate: 0 } }"
    )
    unset = make()

    out_zero = task_config.validate_and_normalize(zero)
    out_unset = task_config.validate_and_normalize(unset)

    fl = out_zero.federated_learning
    assert fl.learning_process.runtime_config.over_selection_rate == 0
    assert fl.evaluation.over_selection_rate == 0
    fl = out_unset.federated_learning
    assert fl.learning_process.runtime_config.over_selection_rate == pytest.approx(0.3)
    assert fl.evaluation.over_selection_rate == pytest.approx(0.3)


def test_eval_defaults_and_server_linking_in_training_and_eval():
    config = make(
        'federated_learning { evaluation { checkpoint_selector: "" source_training_task_id: 1 } }'
    )

    out = task_config.validate_and_normalize(config)

    ev = out.federated_learning.evaluation
    assert ev.checkpoint_selector == "every_1_round"
    assert ev.source_training_population == "pop_1"
    # The server links the eval task to the training task it creates with it.
    assert ev.source_training_task_id == 0


def test_training_only_ignores_the_evaluation_section():
    out = task_config.validate_and_normalize(
        make("mode: TRAINING_ONLY federated_learning { evaluation { report_goal: 0 } }")
    )

    assert out.mode == task_builder_pb2.TaskMode.TRAINING_ONLY


def test_too_many_metrics():
    extra = "".join(f'metrics {{ name: "m{i}" }}' for i in range(20))
    config = make(f"federated_learning {{ learning_process {{ {extra} }} }}")

    with pytest.raises(TaskConfigError) as info:
        task_config.validate_and_normalize(config)

    assert str(info.value) == bad("metrics", "21", LP, "at most 20 metrics may be requested.")


def test_parse_error_is_a_config_error():
    with pytest.raises(
        TaskConfigError, match=r"^\[Invalid task config\]: cannot parse the TaskConfig"
    ):
        task_config.parse_task_config('population_name: "p" no_such_field: 1')


def test_oversized_config_is_refused():
    with pytest.raises(TaskConfigError, match="at most 1048576 are allowed"):
        task_config.parse_task_config(b"#" * (1 << 20 + 1))


def test_load_from_path_and_file_uri(tmp_path):
    path = tmp_path / "task.pbtxt"
    path.write_text(BASE)

    by_path = task_config.load_task_config(str(path))
    by_uri = task_config.load_task_config(path.as_uri())

    assert by_path == by_uri == make()


def test_load_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(TaskConfigError, match="cannot read"):
        task_config.load_task_config(str(tmp_path / "missing.pbtxt"))


def test_override_population_copies():
    config = make()

    out = task_config.override_population(config, "other")

    assert (out.population_name, config.population_name) == ("other", "pop_1")
    assert task_config.override_population(config, None) == config


_CONFIGS = pathlib.Path(__file__).parents[3] / "configs"


def test_the_example_configs_are_shipped():
    names = {p.stem for p in _CONFIGS.glob("*.pbtxt")}
    assert {"digits_demo_task", "digits_cnn_task", "dense_dict_task", "emnist_cnn_task"} <= names


@pytest.mark.parametrize("path", sorted(_CONFIGS.glob("*.pbtxt")), ids=lambda p: p.stem)
def test_shipped_example_configs_validate(path):
    out = task_config.validate_and_normalize(task_config.load_task_config(str(path)))

    assert out.population_name
    assert not math.isnan(out.policies.model_release_policy.dp_delta)
