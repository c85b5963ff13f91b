"""Loads a text-format TaskConfig, validates it and returns a normalized copy.

Step 1 of the build pipeline (ODP `task_builder_client` + `config_validator`, see
odp-federated-compute.md sections 1.2 and 1.6): the pbtxt is read from a local path, `file://`
or `gs://` URI, parsed once with `text_format`, checked by `config_validation.validate`, and
every default of `config_defaults` is written into a copy, so that later stages never guess
what an unset field means. Pure Python, no TensorFlow.
"""

import logging

from google.protobuf import text_format

from fcp_server.protos import task_builder_pb2
from task_builder import artifacts, config_validation
from task_builder import config_defaults as d
from task_builder.errors import TaskConfigError

_LOG = logging.getLogger(__name__)
_TC = task_builder_pb2


def parse_task_config(text: str | bytes) -> task_builder_pb2.TaskConfig:
    """Parses a text-format TaskConfig.

    Args:
      text: the pbtxt content (at most config_defaults.MAX_CONFIG_BYTES).

    Returns:
      The parsed (not yet validated) TaskConfig.

    Raises:
      TaskConfigError: when the text is too large, not UTF-8, or not a TaskConfig.
    """
    if len(text) > d.MAX_CONFIG_BYTES:
        raise TaskConfigError(
            f"[Invalid task config]: the config is {len(text)} bytes; at most "
            f"{d.MAX_CONFIG_BYTES} are allowed."
        )
    try:
        decoded = text.decode("utf-8") if isinstance(text, bytes) else text
        return text_format.Parse(decoded, task_builder_pb2.TaskConfig())
    except (UnicodeDecodeError, text_format.ParseError) as e:
        raise TaskConfigError(f"[Invalid task config]: cannot parse the TaskConfig: {e}") from e


def load_task_config(uri: str) -> task_builder_pb2.TaskConfig:
    """Reads and parses the TaskConfig at a local path, `file://` or `gs://` URI.

    Raises:
      TaskConfigError: when the file cannot be read or parsed.
    """
    try:
        data = artifacts.read_uri(uri, max_bytes=d.MAX_CONFIG_BYTES)
    except OSError as e:
        raise TaskConfigError(f"[Invalid task config]: cannot read {uri!r}: {e}") from e
    return parse_task_config(data)


def override_population(
    config: task_builder_pb2.TaskConfig, population_name: str | None
) -> task_builder_pb2.TaskConfig:
    """Returns a copy with `population_name` replaced (the CLI's --population_name)."""
    out = task_builder_pb2.TaskConfig()
    out.CopyFrom(config)
    if population_name:
        out.population_name = population_name
    return out


def validate_and_normalize(config: task_builder_pb2.TaskConfig) -> task_builder_pb2.TaskConfig:
    """Validates a TaskConfig and returns a copy with every default filled in.

    The noise multiplier stays as written: 0 means "calibrate to the target epsilon", which the
    DP step (dp_budget.check_dp_budget) does.

    Args:
      config: the TaskConfig as parsed; not modified.

    Returns:
      The normalized TaskConfig.

    Raises:
      TaskConfigError: when a rule of config_validation is broken.
    """
    config_validation.validate(config)
    out = task_builder_pb2.TaskConfig()
    out.CopyFrom(config)
    if out.mode == _TC.TaskMode.UNKNOWN:
        out.mode = _TC.TaskMode.TRAINING_ONLY
    _fill_policies(out)
    _fill_learning_process(out.federated_learning.learning_process)
    if not out.label_name:
        out.label_name = d.LABEL_NAME
    if out.mode in d.TRAINING_MODES:
        _fill_dp(out)
    if out.mode in d.EVAL_MODES:
        _fill_evaluation(out)
    return out


def _fill_policies(config: task_builder_pb2.TaskConfig) -> None:
    release = config.policies.model_release_policy
    release.dp_target_epsilon = release.dp_target_epsilon or d.DP_EPSILON
    release.dp_delta = release.dp_delta or d.DP_DELTA
    dataset = config.policies.dataset_policy
    dataset.batch_size = dataset.batch_size or d.BATCH_SIZE
    dataset.max_training_batches_per_client = (
        dataset.max_training_batches_per_client or d.MAX_TRAINING_BATCHES_PER_CLIENT
    )
    dataset.num_epochs = dataset.num_epochs or d.NUM_EPOCHS
    # Written out so that the Task's eligibility policies are explicit.
    config.policies.min_separation_policy.SetInParent()
    config.policies.data_availability_policy.SetInParent()


def _fill_learning_process(process: task_builder_pb2.LearningProcess) -> None:
    process.type = process.type or d.LEARNING_ALGO
    process.client_optimizer = process.client_optimizer or d.CLIENT_OPTIMIZER
    process.server_optimizer = process.server_optimizer or d.SERVER_OPTIMIZER
    process.client_learning_rate = process.client_learning_rate or d.CLIENT_LEARNING_RATE
    process.server_learning_rate = process.server_learning_rate or d.SERVER_LEARNING_RATE
    runtime = process.runtime_config
    # Presence, not value: an explicit 0 means "no over-selection" (the reference made it 0.3).
    if not runtime.HasField("over_selection_rate"):
        runtime.over_selection_rate = d.OVER_SELECTION_RATE


def _fill_dp(config: task_builder_pb2.TaskConfig) -> None:
    dp = config.differential_privacy
    dp.type = dp.type or d.DP_AGGREGATOR
    dp.population_size = dp.population_size or d.POPULATION_SIZE
    if dp.type in d.ADAPTIVE_DP_TYPES:
        goal = config.federated_learning.learning_process.runtime_config.report_goal
        dp.init_clip_norm = dp.init_clip_norm or d.INIT_CLIP_NORM
        dp.target_unclipped_quantile = dp.target_unclipped_quantile or d.TARGET_UNCLIPPED_QUANTILE
        dp.clip_learning_rate = dp.clip_learning_rate or d.CLIP_LEARNING_RATE
        dp.clipped_count_stddev = (
            dp.clipped_count_stddev or d.CLIPPED_COUNT_STDDEV_PER_CLIENT * goal
        )


def _fill_evaluation(config: task_builder_pb2.TaskConfig) -> None:
    ev = config.federated_learning.evaluation
    ev.checkpoint_selector = ev.checkpoint_selector or d.CHECKPOINT_SELECTOR
    if not ev.HasField("over_selection_rate"):
        ev.over_selection_rate = d.OVER_SELECTION_RATE
    ev.source_training_population = ev.source_training_population or config.population_name
    if config.mode == _TC.TaskMode.TRAINING_AND_EVAL and ev.source_training_task_id:
        # The server links the eval task to the training task created in the same request, so a
        # hand-typed id (the reference's samples assume 1) would be wrong as often as right.
        _LOG.warning(
            "ignoring evaluation.source_training_task_id=%d: in TRAINING_AND_EVAL the server "
            "links the eval task to the new training task",
            ev.source_training_task_id,
        )
        ev.source_training_task_id = 0
