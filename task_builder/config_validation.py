"""Validation of a raw TaskConfig: every rule of ODP's `config_validator`, mode-aware.

Each violated rule raises `TaskConfigError` with ODP's message template
"[Invalid task config]: key `{key}` has a bad value: `{value}` in `{entity}`. {debug}"
(odp-federated-compute.md section 1.6), where `entity` is the path of the message in the config.
Unlike the reference: EVAL_ONLY needs neither a training report goal nor a clip norm, learning
rates above 1 are allowed, unknown metric names are errors, training needs at least one round,
and sizes are bounded (config_defaults). Pure Python, no TensorFlow.
"""

import math
import re

from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

from fcp_server.protos import task_builder_pb2
from task_builder import config_defaults as d
from task_builder.errors import TaskConfigError

_TC = task_builder_pb2
_POPULATION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_SELECTOR_RE = re.compile(r"every_([0-9]+)_(round|hour)")
_LP = "federated_learning.learning_process"
_EVAL = "federated_learning.evaluation"
_DP = "differential_privacy"
_MRP = "policies.model_release_policy"


def config_error(key: str, value: object, entity: str, debug: str) -> TaskConfigError:
    """Returns a TaskConfigError whose message follows ODP's template."""
    return TaskConfigError(
        f"[Invalid task config]: key `{key}` has a bad value: `{value}` in `{entity}`. {debug}"
    )


def _nonneg(value: float, key: str, entity: str) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise config_error(key, value, entity, f"{key} must be a nonnegative number.")


def _at_most(value: float, limit: float, key: str, entity: str) -> None:
    if value > limit:
        raise config_error(key, value, entity, f"{key} must be at most {limit}.")


def _required_positive(value: int, key: str, entity: str, limit: int) -> None:
    if value <= 0:
        debug = f"{key} is required and must be set to an integer strictly greater than zero."
        raise config_error(key, value, entity, debug)
    _at_most(value, limit, key, entity)


def _enum(value: int, enum: EnumTypeWrapper, key: str, entity: str) -> None:
    # Proto3 enums are open: a number unknown to the schema parses, so check it here.
    names = [n for n in enum.keys() if n != "UNKNOWN"]  # noqa: SIM118 (not a dict)
    if value != 0 and value not in enum.values():
        raise config_error(key, value, entity, f"{key} must be one of {', '.join(names)}.")


def _uri(value: str, key: str, entity: str) -> None:
    if len(value) > d.MAX_URI_LENGTH:
        raise config_error(
            key, value[:64] + "...", entity, f"{key} must be at most {d.MAX_URI_LENGTH} chars."
        )


def _check_population(config: task_builder_pb2.TaskConfig) -> None:
    name = config.population_name
    if not name:
        debug = "population_name is required and must be set to an non-empty string."
        raise config_error("population_name", name, "task_config", debug)
    if len(name) > d.MAX_POPULATION_NAME_LENGTH or not _POPULATION_RE.fullmatch(name):
        debug = (
            f"population_name must be at most {d.MAX_POPULATION_NAME_LENGTH} letters, digits, "
            "'_', '-' or '.', starting with a letter or digit."
        )
        raise config_error("population_name", name, "task_config", debug)


def _check_mode(config: task_builder_pb2.TaskConfig) -> None:
    _enum(config.mode, _TC.TaskMode.Enum, "mode", "task_config")
    if config.mode == _TC.TaskMode.UNKNOWN and config.federated_learning.HasField("evaluation"):
        debug = (
            "mode is required when an evaluation is configured: set TRAINING_AND_EVAL or EVAL_ONLY."
        )
        raise config_error("mode", "UNKNOWN", "task_config", debug)


def _check_policies(config: task_builder_pb2.TaskConfig) -> None:
    policies = config.policies
    _nonneg(
        policies.min_separation_policy.minimum_separation,
        "minimum_separation",
        "policies.min_separation_policy",
    )
    _nonneg(
        policies.data_availability_policy.min_example_count,
        "min_example_count",
        "policies.data_availability_policy",
    )
    release = policies.model_release_policy
    eps = release.dp_target_epsilon
    if not (math.isfinite(eps) and 0 <= eps <= d.MAX_DP_EPSILON):
        debug = f"dp_target_epsilon must be a float number between 0 and {d.MAX_DP_EPSILON:f}"
        raise config_error("dp_target_epsilon", eps, _MRP, debug)
    delta = release.dp_delta
    if not (math.isfinite(delta) and 0 <= delta <= d.MAX_DP_DELTA):
        debug = f"dp_delta must be a float number between 0 and {d.MAX_DP_DELTA:E}"
        raise config_error("dp_delta", delta, _MRP, debug)
    # The reference accepts 0 rounds, which passes DP accounting and then never starts.
    _required_positive(
        release.num_max_training_rounds, "num_max_training_rounds", _MRP, d.MAX_ROUNDS
    )
    dataset = policies.dataset_policy
    _nonneg(dataset.batch_size, "batch_size", "policies.dataset_policy")
    _at_most(dataset.batch_size, d.MAX_BATCH_SIZE, "batch_size", "policies.dataset_policy")
    if dataset.max_training_batches_per_client < -1:
        debug = "max_training_batches_per_client must be -1 (all batches), 0 (default) or positive."
        raise config_error(
            "max_training_batches_per_client",
            dataset.max_training_batches_per_client,
            "policies.dataset_policy",
            debug,
        )
    _nonneg(dataset.num_epochs, "num_epochs", "policies.dataset_policy")
    _at_most(dataset.num_epochs, d.MAX_EPOCHS, "num_epochs", "policies.dataset_policy")


def _check_metrics(process: task_builder_pb2.LearningProcess) -> None:
    if len(process.metrics) > d.MAX_METRICS:
        debug = f"at most {d.MAX_METRICS} metrics may be requested."
        raise config_error("metrics", len(process.metrics), _LP, debug)
    seen: set[str] = set()
    for i, metric in enumerate(process.metrics):
        entity = f"{_LP}.metrics[{i}]"
        if metric.name not in d.METRIC_ALLOWLIST:
            debug = f"Unknown metric; allowed metrics are: {', '.join(d.METRIC_ALLOWLIST)}."
            raise config_error("name", metric.name, entity, debug)
        if metric.name in seen:
            raise config_error("name", metric.name, entity, "Each metric may be listed once.")
        seen.add(metric.name)


def _check_learning_process(config: task_builder_pb2.TaskConfig) -> None:
    process = config.federated_learning.learning_process
    _enum(process.type, _TC.LearningAlgo.Enum, "type", _LP)
    _enum(process.client_optimizer, _TC.Optimizer.Enum, "client_optimizer", _LP)
    _enum(process.server_optimizer, _TC.Optimizer.Enum, "server_optimizer", _LP)
    # Learning rates above 1 are legitimate (e.g. server SGD); the reference capped them at 1.
    for key in ("client_learning_rate", "server_learning_rate", "server_momentum"):
        _nonneg(getattr(process, key), key, _LP)
    if process.server_momentum >= 1:
        debug = "server_momentum must be in [0, 1)."
        raise config_error("server_momentum", process.server_momentum, _LP, debug)
    runtime = process.runtime_config
    entity = f"{_LP}.runtime_config"
    goal = runtime.report_goal
    if goal <= 0:
        debug = "report_goal is required and must be set to an integer strictly greater than zero."
        raise config_error("report_goal", goal, entity, debug)
    _at_most(goal, d.MAX_REPORT_GOAL, "report_goal", entity)
    _nonneg(runtime.over_selection_rate, "over_selection_rate", entity)
    _at_most(runtime.over_selection_rate, d.MAX_OVER_SELECTION_RATE, "over_selection_rate", entity)
    _nonneg(runtime.round_deadline_seconds, "round_deadline_seconds", entity)
    _uri(runtime.example_selector_uri, "example_selector_uri", entity)


def _check_evaluation(config: task_builder_pb2.TaskConfig) -> None:
    ev = config.federated_learning.evaluation
    debug = "report_goal is required and must be set to an integer strictly greater than zero."
    if ev.report_goal <= 0:
        raise config_error("report_goal", ev.report_goal, _EVAL, debug)
    _at_most(ev.report_goal, d.MAX_REPORT_GOAL, "report_goal", _EVAL)
    _nonneg(ev.over_selection_rate, "over_selection_rate", _EVAL)
    _at_most(ev.over_selection_rate, d.MAX_OVER_SELECTION_RATE, "over_selection_rate", _EVAL)
    if ev.checkpoint_selector and not _valid_selector(ev.checkpoint_selector):
        debug = (
            "checkpoint_selector must be in the format of every_k_round or every_k_hour, "
            "where k is a positive integer."
        )
        raise config_error("checkpoint_selector", ev.checkpoint_selector, _EVAL, debug)
    traffic = ev.evaluation_traffic
    if not (math.isfinite(traffic) and 0 <= traffic <= 1):
        raise config_error(
            "evaluation_traffic", traffic, _EVAL, "evaluation_traffic must be a probability."
        )
    _uri(ev.example_selector_uri, "example_selector_uri", _EVAL)
    if config.mode == _TC.TaskMode.EVAL_ONLY and ev.source_training_task_id <= 0:
        # TRAINING_AND_EVAL needs no id: the server links the eval task to the new training task.
        debug = "source_training_task_id is required and must be a positive number."
        raise config_error("source_training_task_id", ev.source_training_task_id, _EVAL, debug)
    source = ev.source_training_population
    if config.mode == _TC.TaskMode.TRAINING_AND_EVAL and source not in ("", config.population_name):
        debug = "in TRAINING_AND_EVAL the evaluated training task is in the task's own population."
        raise config_error("source_training_population", source, _EVAL, debug)


def _valid_selector(selector: str) -> bool:
    match = _SELECTOR_RE.fullmatch(selector)
    return match is not None and int(match.group(1)) > 0


def _check_dp(config: task_builder_pb2.TaskConfig) -> None:
    dp = config.differential_privacy
    _enum(dp.type, _TC.DpAggregator.Enum, "type", _DP)
    _nonneg(dp.noise_multiplier, "noise_multiplier", _DP)
    if dp.type in d.ADAPTIVE_DP_TYPES:
        if not (math.isfinite(dp.init_clip_norm) and dp.init_clip_norm >= 0):
            debug = (
                "init_clip_norm must be a positive float or be left empty when using "
                "ADAPTIVE_GAUSSIAN or ADAPTIVE_TREE DP Aggregator."
            )
            raise config_error("init_clip_norm", dp.init_clip_norm, _DP, debug)
        quantile = dp.target_unclipped_quantile
        if not (math.isfinite(quantile) and 0 <= quantile < 1):
            debug = "target_unclipped_quantile must be in (0, 1) or be left empty (0.5)."
            raise config_error("target_unclipped_quantile", quantile, _DP, debug)
        _nonneg(dp.clip_learning_rate, "clip_learning_rate", _DP)
        _nonneg(dp.clipped_count_stddev, "clipped_count_stddev", _DP)
    elif not (math.isfinite(dp.clip_norm) and dp.clip_norm > 0):
        debug = (
            "clip_norm is required and must be a positive float when using FIXED_GAUSSIAN or "
            "TREE_AGGREGATION DP Aggregator."
        )
        raise config_error("clip_norm", dp.clip_norm, _DP, debug)
    _nonneg(dp.population_size, "population_size", _DP)
    _at_most(dp.population_size, d.MAX_POPULATION_SIZE, "population_size", _DP)
    goal = config.federated_learning.learning_process.runtime_config.report_goal
    if dp.population_size and dp.population_size < goal:
        debug = "population_size must be at least report_goal (the sampling rate is their ratio)."
        raise config_error("population_size", dp.population_size, _DP, debug)


def validate(config: task_builder_pb2.TaskConfig) -> None:
    """Checks every rule for the config's mode; raises TaskConfigError at the first violation.

    Args:
      config: the TaskConfig as written (0 and unset mean "use the default").

    Raises:
      TaskConfigError: with ODP's message template, naming the key, value and section.
    """
    _check_population(config)
    _check_mode(config)
    _check_policies(config)
    _check_metrics(config.federated_learning.learning_process)
    training = config.mode != _TC.TaskMode.EVAL_ONLY
    if training:
        _check_learning_process(config)
        _check_dp(config)
    if config.mode in d.EVAL_MODES:
        _check_evaluation(config)
