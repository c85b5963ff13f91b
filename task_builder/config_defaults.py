"""Defaults and bounds of a TaskConfig: the values a normalized config is filled with.

The defaults are those of ODP's task builder (`common.py`, `dp_utils.py`,
`learning_process_utils.py`, `task_utils.py`; see odp-federated-compute.md sections 1.6-1.11);
the size bounds are ours, so that one config cannot ask the server for unbounded work. This
module is pure Python (no TensorFlow) so that validation stays fast and testable.
"""

from typing import Final

from fcp_server.protos import task_builder_pb2

# --- ODP defaults (filled in when a field is unset or 0) --------------------------------------
LEARNING_ALGO: Final = task_builder_pb2.LearningAlgo.FED_AVG
CLIENT_OPTIMIZER: Final = task_builder_pb2.Optimizer.SGD
SERVER_OPTIMIZER: Final = task_builder_pb2.Optimizer.SGD
CLIENT_LEARNING_RATE: Final = 0.1
SERVER_LEARNING_RATE: Final = 1.0
BATCH_SIZE: Final = 3
# -1 means "every batch the device has", as `dataset.take(-1)`.
MAX_TRAINING_BATCHES_PER_CLIENT: Final = -1
NUM_EPOCHS: Final = 1
DP_AGGREGATOR: Final = task_builder_pb2.DpAggregator.FIXED_GAUSSIAN
# ODP's DEFAULT_TOTAL_POPULATION; the sampling rate of the accountant is report_goal / this.
POPULATION_SIZE: Final = 3_000_000
DP_DELTA: Final = 1.0 / POPULATION_SIZE
DP_EPSILON: Final = 10.0
# TFLaS (Bonawitz et al. 2019) selects 130% of the goal; only an UNSET rate gets it.
OVER_SELECTION_RATE: Final = 0.3
# Adaptive clipping (Andrew et al. 2019, arXiv 1905.03871), as TFF's gaussian_adaptive defaults.
INIT_CLIP_NORM: Final = 0.1
TARGET_UNCLIPPED_QUANTILE: Final = 0.5
CLIP_LEARNING_RATE: Final = 0.2
# TFF's default stddev of the clipped-count noise is clients_per_round / 20.
CLIPPED_COUNT_STDDEV_PER_CLIENT: Final = 0.05
CHECKPOINT_SELECTOR: Final = "every_1_round"
# The reference parses a lone tensor input as feature `x` and label `y`.
LABEL_NAME: Final = "y"
# Artifact-level constants of the reference task protos.
MIN_CLIENT_VERSION: Final = "0"
MAX_CLIENT_VERSION: Final = "999999999"
TRAINING_TRAFFIC_WEIGHT: Final = 100
FULL_EVAL_TRAFFIC_WEIGHT: Final = 10_000

# --- Validation limits ------------------------------------------------------------------------
# ODP caps epsilon at DEFAULT_DP_EPSILON and delta at 1 / DEFAULT_TOTAL_POPULATION.
MAX_DP_EPSILON: Final = DP_EPSILON
MAX_DP_DELTA: Final = DP_DELTA
# Our bounds (the reference has none); each keeps one task's server work finite.
MAX_POPULATION_NAME_LENGTH: Final = 64  # the reference's Spanner STRING(64) key
MAX_REPORT_GOAL: Final = 100_000
MAX_OVER_SELECTION_RATE: Final = 10.0
MAX_ROUNDS: Final = 1_000_000
MAX_BATCH_SIZE: Final = 100_000
MAX_EPOCHS: Final = 1_000
MAX_POPULATION_SIZE: Final = 10_000_000_000
MAX_URI_LENGTH: Final = 2_048
MAX_METRICS: Final = 20
MAX_CONFIG_BYTES: Final = 1 << 20

# ODP's METRICS_ALLOWLIST (common.py): the Keras metrics a task may ask for. `loss` is always
# reported and is not requested here.
METRIC_ALLOWLIST: Final = (
    "auc-roc",
    "auc-pr",
    "accuracy",
    "binary_accuracy",
    "binary_crossentropy",
    "binary_crossentropy_from_logits",
    "categorical_accuracy",
    "categorical_crossentropy",
    "categorical_crossentropy_from_logits",
    "mean",
    "mean_absolute_error",
    "mean_absolute_percentage_error",
    "mean_squared_error",
    "mean_squared_logarithmic_error",
    "precision",
    "recall",
    "root_mean_squared_error",
    "sparse_categorical_accuracy",
    "sparse_categorical_crossentropy",
    "sparse_categorical_crossentropy_from_logits",
)

ADAPTIVE_DP_TYPES: Final = frozenset(
    {task_builder_pb2.DpAggregator.ADAPTIVE_GAUSSIAN, task_builder_pb2.DpAggregator.ADAPTIVE_TREE}
)
TREE_DP_TYPES: Final = frozenset(
    {task_builder_pb2.DpAggregator.TREE_AGGREGATION, task_builder_pb2.DpAggregator.ADAPTIVE_TREE}
)
TRAINING_MODES: Final = frozenset(
    {task_builder_pb2.TaskMode.TRAINING_ONLY, task_builder_pb2.TaskMode.TRAINING_AND_EVAL}
)
EVAL_MODES: Final = frozenset(
    {task_builder_pb2.TaskMode.TRAINING_AND_EVAL, task_builder_pb2.TaskMode.EVAL_ONLY}
)
